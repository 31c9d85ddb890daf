export { TransitionService, type ApplyOptions, type TransitionHooks, type TransitionServiceOptions } from './service';
export type { ApplyResult, StampNoopReason } from './outcomes';
export type { LocalRelay } from './relay-wakeup';
export { OUTBOX_CHANNEL } from '../../entities/sql';
