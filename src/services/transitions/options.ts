/**
 * What a `TransitionService` takes: its options, the items of `applyMany` and their options, and the test hooks.
 */
import type { DataSource } from 'typeorm';
import type { Context } from '@opentelemetry/api';
import type { EndpointAllowList } from '../../events/endpoint-allow';
import type { LifecycleEvent } from '../../events/schemas';
import type { Logger } from '../../log';
import type { StampBuffer } from '../stamps';
import type { LocalRelay } from './relay-wakeup';

/**
 * Test hooks. They observe the production path and may delay it (to stage an interleaving) or throw (to stage a
 * failure at that point); they never switch the service onto another path.
 */
export interface TransitionHooks {
  /** the one-event path: after the snapshot was read and the event decided applied, before the write */
  readonly beforeUpdate?: (event: LifecycleEvent) => void | Promise<void>;
  /**
   * the one-event path: after the write of an applied event returned (on the optimistic try it has committed; on a
   * locked retry, before COMMIT), with whether its deployment's row was written
   */
  readonly afterWrite?: (event: LifecycleEvent, written: boolean) => void | Promise<void>;
  /** the one-event path: after a noop was decided, before the write of its eventId's claim */
  readonly beforeClaim?: (event: LifecycleEvent) => void | Promise<void>;
  /** group commit: after a batch's snapshot was read and decided, before its write (the events it decided) */
  readonly beforeBatchWrite?: (events: readonly LifecycleEvent[]) => void | Promise<void>;
}

/** One event of `applyMany`. */
export interface ApplyItem {
  readonly name: string;
  readonly data: unknown;
  readonly options?: ApplyOptions;
}

export interface ApplyOptions {
  /** used as the eventId when the payload carries none (the BullMQ jobId) */
  readonly fallbackEventId?: string;
  /**
   * when the event was produced (the job's timestamp): the time an orphan or expiry is judged as of. Stamps do not
   * use it: they record the service's clock when they are processed.
   */
  readonly producedAt?: Date;
  /**
   * The trace context the event continues (the job's, under BullMQ's worker span): the event gets a `transition
   * <name>` span under it, and its outbox row that span's `traceparent`. Default: the active context. Under no
   * span (tracing off), nothing is traced.
   */
  readonly traceContext?: Context;
}

export interface TransitionServiceOptions {
  readonly dataSource: DataSource;
  /** the clock; default `() => new Date()` */
  readonly now?: () => Date;
  /** version-check losses retried in-process before giving up with `ConflictError` (default 12) */
  readonly maxConflictRetries?: number;
  readonly logger?: Logger;
  readonly hooks?: TransitionHooks;
  /**
   * The outbox relay of this process, if it runs one: while it is the active relay, a commit wakes it directly
   * instead of with a NOTIFY (relay-wakeup.ts).
   */
  readonly relay?: LocalRelay;
  /** FLEET_ENDPOINT_ALLOW: an endpoint outside it fails the event as invalid (default: any endpoint) */
  readonly endpointAllow?: EndpointAllowList | null;
  /**
   * FLEET_ORPHAN_AFTER_S (default 90): `attempt.orphaned` applies only while the attempt's liveness is older than
   * the time the event was produced minus this (a heartbeat since makes it a noop `alive`)
   */
  readonly orphanAfterS?: number;
  /** FLEET_PROGRESS_DEADLINE_S (default 1800): likewise for `attempt.expired`, with the attempt's start (`not_due`) */
  readonly progressDeadlineS?: number;
  /**
   * The process's stamp buffer (default none: each stamp is one UPDATE). With it, heartbeat and readiness events
   * only absorb into Redis and complete as the noop `buffered`, and `attempt.orphaned` first writes the attempt's
   * buffered heartbeat to PostgreSQL, so an attempt whose latest heartbeat is still in Redis is never orphaned.
   */
  readonly stampBuffer?: StampBuffer;
}
