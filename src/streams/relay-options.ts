/**
 * The options of an `OutboxRelay`.
 */
import type { Logger } from '../log';
import type { RedisConnection, ServerWatch } from '../redis/connection';

export interface OutboxRelayOptions {
  /** PostgreSQL URL: the relay opens one dedicated session for its lock, LISTEN and its queries */
  readonly databaseUrl: string;
  /** Redis URL (a connection is made and owned) or an ioredis connection */
  readonly redis: string | RedisConnection;
  /** the stream's base key, `<prefix>:transitions` (the stream itself with one partition) */
  readonly streamKey: string;
  /**
   * partitions of the stream (`FLEET_STREAM_PARTITIONS`, default 1): see `partitionKey` for their keys. Recorded
   * when nothing is; when the record names another number (changed by `fleet streams repartition`), the relay
   * publishes to that many and warns that this one is stale.
   */
  readonly partitions?: number;
  /** approximate stream retention (`MAXLEN ~`), default 1,000,000 */
  readonly maxLen?: number;
  /** rows per cycle (default 500) */
  readonly batchSize?: number;
  /** fallback polling when no NOTIFY arrives (default 1000 ms) */
  readonly pollIntervalMs?: number;
  /**
   * how long appended rows may stay unmarked while no new commit comes (default 20 ms): their mark rides on the
   * next cycle's read, in one statement, when one comes sooner
   */
  readonly markDelayMs?: number;
  /** how often a standby tries to become the leader (default 1000 ms) */
  readonly standbyRetryMs?: number;
  /** published rows are deleted after this long (default 24 h) */
  readonly retentionMs?: number;
  /** processed_events rows are deleted after this long (default 7 days): the window in which a redelivered
   * eventId is still recognised as a duplicate */
  readonly processedRetentionMs?: number;
  readonly logger?: Logger;
  /**
   * The process's view of its Redis: connection errors are reported once per outage through it (default: a watch
   * of this component's own, logging to `logger`).
   */
  readonly redisWatch?: ServerWatch;
  /** the process's view of PostgreSQL: connection errors reported once per outage, and its return (default: none) */
  readonly pgWatch?: ServerWatch;
  /** metrics hook: rows published by one cycle */
  readonly onPublished?: (count: number) => void;
  /**
   * Durable appends (FLEET_DURABLE_ENQUEUE): a batch's rows are marked published only once its stream entries are
   * on this many Redis replicas (`WAIT`); until then the relay appends nothing more, and waits again each cycle
   * (default: off, rows are marked once the master has the entries)
   */
  readonly durable?: { readonly replicas: number; readonly timeoutMs: number } | null;
  /** test hook: after a cycle read its rows and chose their partitions, before it appends them */
  readonly beforeXadd?: (ids: readonly string[]) => void | Promise<void>;
  /** test hook: after the XADD pipeline succeeded, before the rows are marked published */
  readonly afterXadd?: (ids: readonly string[]) => void | Promise<void>;
}
