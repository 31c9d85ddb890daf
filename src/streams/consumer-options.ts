/**
 * The options of a `TransitionConsumer` (with the version store it keeps by default), and what its parts
 * (./consumer-*.ts) share.
 */
import type { RedisConnection, ServerWatch } from '../redis/connection';
import type { Logger } from '../log';
import type { TransitionEntry } from './stream-entry';

/** Remembers the highest version handled per deployment. The default keeps it in memory. */
export interface VersionStore {
  get(deploymentId: string): number | undefined | Promise<number | undefined>;
  /**
   * Records a handled version. It must never lower what is remembered (keep the maximum, e.g. `GREATEST` in SQL):
   * a handler call that outlived its consumer's lease records its version after the partition's next owner may
   * have recorded higher ones, and a lowered memory would let a republished copy of those through again.
   */
  set(deploymentId: string, version: number): void | Promise<void>;
}

export function memoryVersionStore(): VersionStore {
  const seen = new Map<string, number>();
  return { get: (id) => seen.get(id), set: (id, v) => void seen.set(id, Math.max(v, seen.get(id) ?? v)) };
}

export interface TransitionConsumerOptions {
  /** Redis URL (a connection is made and owned) or an ioredis connection with `maxRetriesPerRequest: null` */
  readonly redis: string | RedisConnection;
  /** `<FLEET_PREFIX>:transitions`: the stream's base key; the consumer finds the partitions itself */
  readonly streamKey: string;
  readonly group: string;
  readonly consumer: string;
  /** where a new group starts: `$` (default, new entries only), `0` (everything retained), or a stream id */
  readonly startId?: string;
  readonly handler: (entry: TransitionEntry) => Promise<void> | void;
  /** entries per read (default 100) */
  readonly batchSize?: number;
  /** how long a read blocks waiting for new entries (default 2000 ms); bounds how fast `close()` returns */
  readonly blockMs?: number;
  /** reports this consumer's connection lost and back (once per outage); default: a watch logging to `logger` */
  readonly redisWatch?: ServerWatch;
  /**
   * No longer used: a consumer that died leaves its partitions' leases to expire (`leaseMs`), and their next owner
   * takes over every entry it left pending, first. Accepted so that existing callers compile.
   */
  readonly claimIdleMs?: number;
  /**
   * How long a partition's lease lasts without renewal (default 10 s): how soon the partitions of a consumer that
   * died (or was cut off, or paused) go to another. It renews every `leaseMs / 5`, and stops handling a partition
   * `leaseMs / 4` before its lease could expire. A handler call should take less than that margin: one that outlives
   * it is not fenced.
   */
  readonly leaseMs?: number;
  readonly versions?: VersionStore;
  readonly logger?: Logger;
  /**
   * Called when this consumer takes a partition over (`acquired`, including at start), hands one over or stops
   * (`released`: everything it read is acknowledged or left pending), or stops handling one because its lease was
   * lost (`lost`): a hook for the caller's own metrics (e.g. a counter of rebalances); it must not throw.
   */
  readonly onPartitionChange?: (change: { readonly partition: number; readonly change: 'acquired' | 'released' | 'lost' }) => void;
  /** test hook: called before each renewal round; false skips it (a paused process, a cut-off host) */
  readonly beforeRenew?: () => boolean;
  /** a monotonic clock in ms for the lease deadlines (default `performance.now`); tests inject one */
  readonly monotonicNow?: () => number;
}

/** What the parts of one `TransitionConsumer` share: its options, its connection to Redis and its log, and its stop. */
export interface ConsumerContext {
  readonly options: TransitionConsumerOptions;
  readonly redis: RedisConnection;
  readonly log: Logger;
  /** close() was called */
  readonly isStopped: () => boolean;
  /** waits `ms`, or less when the consumer is closed meanwhile */
  readonly pause: (ms: number) => Promise<void>;
}
