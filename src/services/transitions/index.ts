export { TransitionService } from './service';
export type { ApplyItem, ApplyOptions, TransitionHooks, TransitionServiceOptions } from './options';
export { TransitionCoalescer, type CoalescerOptions } from './coalescer';
export type { ApplyResult, StampNoopReason } from './outcomes';
export type { LocalRelay } from './relay-wakeup';
export { OUTBOX_CHANNEL } from '../../entities/sql';
