export {
  TransitionService,
  type ApplyItem,
  type ApplyOptions,
  type TransitionHooks,
  type TransitionServiceOptions,
} from './service';
export { TransitionCoalescer, type CoalescerOptions } from './coalescer';
export type { ApplyResult, StampNoopReason } from './outcomes';
export type { LocalRelay } from './relay-wakeup';
export { OUTBOX_CHANNEL } from '../../entities/sql';
