/**
 * The stamp buffer (docs/architecture.md, "Heartbeats between flushes"): heartbeat and readiness stamps absorbed in
 * Redis, one command each, and written to PostgreSQL in batches, so a heartbeat costs no PostgreSQL commit.
 *
 * - **Absorb**: `ZADD <key> GT <ms> <member>` keeps the latest time per attempt (member `<attemptId>:<deploymentId>`,
 *   both of which the UPDATE checks) or per deployment (member `<deploymentId>`).
 * - **Flush**: the buffered stamps taken, written in batches and removed, one flush at a time fleet-wide (flush.ts).
 * - **Reads** overlay the buffered time on PostgreSQL's (the latest of the absorbing and the taken set's, and
 *   PostgreSQL's), one Redis round trip.
 *
 * Where the keys live, and how a member is written: keys.ts.
 */
import type { RedisConnection } from '../../redis/connection';
import type { DataSource } from 'typeorm';
import { Database } from '../../entities/sql';
import { silentLogger, type Logger } from '../../log';
import { createRedis, requireSlotPrefix } from '../../redis/connection';
import { rejectAfter } from '../../util';
import { heartbeatMember, stampKeys, type StampKeys } from './keys';
import { StampFlusher, type FlushResult, type StampBufferHooks } from './flush';

export interface StampBufferOptions {
  /**
   * A Redis URL (the buffer owns a fail-fast connection to it: one retry, 5 s command timeout, auto-pipelined) or
   * an ioredis connection, which the buffer does not close
   */
  readonly redis: string | RedisConnection;
  readonly db: Database;
  /** BullMQ key prefix (default `fleet`) */
  readonly prefix?: string;
  /**
   * How long a stamp for an attempt or deployment that does not exist is kept, counted from the stamp's time
   * (default 30 s, the lifecycle worker's `stampRetryBudgetMs`): its create may still be on its way.
   */
  readonly notYetForMs?: number;
  /**
   * Stamps of each kind per statement (default 100,000). A flush writes everything buffered when it started, in as
   * many statements as that takes.
   */
  readonly maxPerStatement?: number;
  /** how long the flush lock is held at most (default 30 s; a flush that takes longer lets another run beside it) */
  readonly lockMs?: number;
  /** how long a flush waits for another process's flush to finish before it flushes anyway (default 10 s) */
  readonly lockWaitMs?: number;
  /** how long a read's overlay waits for Redis before it answers from PostgreSQL alone (default 500 ms) */
  readonly readTimeoutMs?: number;
  readonly logger?: Logger;
  readonly hooks?: StampBufferHooks;
}

export class StampBuffer {
  readonly keys: StampKeys;
  private readonly redis: RedisConnection;
  private readonly log: Logger;
  readonly readTimeoutMs: number;
  private readonly ownsRedis: boolean;
  private readonly flusher: StampFlusher;
  private closing: Promise<void> | null = null;
  /** the lifecycle worker's connection, when stamps go through it (`absorbThrough`) */
  private through: RedisConnection | null = null;

  constructor(options: StampBufferOptions) {
    requireSlotPrefix(options.redis, options.prefix ?? 'fleet', 'StampBuffer');
    this.ownsRedis = typeof options.redis === 'string';
    // auto-pipelining: the absorbs of a worker's concurrent jobs leave in one write (measured: fewer syscalls per job)
    this.redis =
      typeof options.redis === 'string'
        ? createRedis(options.redis, 'producer', 'lifecycle-fleet-stamps', { enableAutoPipelining: true })
        : options.redis;
    this.keys = stampKeys(options.prefix ?? 'fleet');
    this.log = (options.logger ?? silentLogger).child({ component: 'stamp-buffer' });
    this.readTimeoutMs = options.readTimeoutMs ?? 500;
    this.flusher = new StampFlusher({
      redis: this.redis,
      db: options.db,
      keys: this.keys,
      log: this.log,
      notYetForMs: options.notYetForMs ?? 30_000,
      maxPerStatement: Math.max(1, options.maxPerStatement ?? 100_000),
      lockMs: options.lockMs ?? 30_000,
      lockWaitMs: options.lockWaitMs ?? 10_000,
      hooks: options.hooks ?? {},
    });
  }

  /** Absorbs a heartbeat, keeping the latest time per attempt (see `absorb`). */
  absorbHeartbeat(attemptId: string, deploymentId: string, at: Date): Promise<void> {
    return this.absorb(this.keys.heartbeat, at.getTime(), heartbeatMember(attemptId, deploymentId));
  }

  /** Absorbs a readiness stamp, keeping the latest time per deployment (see `absorb`). */
  absorbReadiness(deploymentId: string, at: Date): Promise<void> {
    return this.absorb(this.keys.readiness, at.getTime(), deploymentId);
  }

  /**
   * Absorbs stamps through the lifecycle worker's own Redis connection from now on (null: back to the buffer's).
   * A worker's job completes with a command on that same connection, which Redis runs after everything sent before
   * it: so a stamp sent there ahead of the job's completion is in Redis before the job counts as done, without the
   * job waiting a round trip for it (measured: the heartbeat job rate next to BullMQ no-op jobs, bench `scale`).
   */
  absorbThrough(connection: RedisConnection | null): void {
    this.through = connection;
  }

  /**
   * One `ZADD key GT score member`. On the buffer's own connection it resolves once Redis has the stamp. Through a
   * worker's connection (`absorbThrough`) it resolves once the command is queued there, ahead of the job's
   * completion; should Redis refuse it (only if the key was changed to another type), the stamp is lost like a
   * heartbeat never sent, and the refusal is logged.
   */
  private absorb(key: string, score: number, member: string): Promise<void> {
    const through = this.through;
    if (through === null) return this.redis.zadd(key, 'GT', score, member).then(() => undefined);
    through.zadd(key, 'GT', score, member).catch((err: unknown) => this.log.error({ err, key }, 'a stamp was not absorbed: Redis refused it'));
    return Promise.resolve();
  }

  /**
   * Writes everything buffered when it starts to PostgreSQL and removes it from Redis, unless it was absorbed again
   * meanwhile; `now` decides which stamps of what does not exist are old enough to drop (`StampFlusher.flush`).
   */
  flush(now: Date): Promise<FlushResult> {
    return this.flusher.flush(now);
  }

  /** Writes one attempt's buffered heartbeat to PostgreSQL now, for the orphan path (`StampFlusher.flushAttempt`). */
  flushAttempt(attemptId: string, deploymentId: string): Promise<Date | null> {
    return this.flusher.flushAttempt(attemptId, deploymentId);
  }

  /** The buffered readiness time of each deployment that has one (one Redis command). */
  async latestReadiness(deploymentIds: readonly string[]): Promise<Map<string, Date>> {
    return (await this.latest({ readiness: deploymentIds })).readiness;
  }

  /** The buffered heartbeat time of each attempt that has one, keyed by attempt id (one Redis command). */
  async latestHeartbeat(attempts: ReadonlyArray<{ attemptId: string; deploymentId: string }>): Promise<Map<string, Date>> {
    return (await this.latest({ heartbeats: attempts })).heartbeats;
  }

  /**
   * Both at once, in one round trip (a pipeline of a ZMSCORE per kind and set: absorbing, and taken by a flush under
   * way; the later time wins), within `readTimeoutMs`: what the read model overlays on PostgreSQL's stamps. Throws
   * when Redis does not answer in time.
   */
  async latest(query: {
    readonly readiness?: readonly string[];
    readonly heartbeats?: ReadonlyArray<{ attemptId: string; deploymentId: string }>;
  }): Promise<{ readiness: Map<string, Date>; heartbeats: Map<string, Date> }> {
    const deploymentIds = query.readiness ?? [];
    const attempts = query.heartbeats ?? [];
    const result = { readiness: new Map<string, Date>(), heartbeats: new Map<string, Date>() };
    const queries = [
      { into: result.readiness, ids: deploymentIds, members: deploymentIds, keys: [this.keys.readiness, this.keys.readinessFlushing] },
      {
        into: result.heartbeats,
        ids: attempts.map((a) => a.attemptId),
        members: attempts.map((a) => heartbeatMember(a.attemptId, a.deploymentId)),
        keys: [this.keys.heartbeat, this.keys.heartbeatFlushing],
      },
    ].filter((query) => query.members.length > 0);
    if (queries.length === 0) return result;
    const pipeline = this.redis.pipeline();
    for (const query of queries) for (const key of query.keys) pipeline.zmscore(key, ...query.members);
    const replies = (await rejectAfter(pipeline.exec(), this.readTimeoutMs, 'buffered stamps')) ?? [];
    let reply = 0;
    for (const query of queries) {
      for (let k = 0; k < query.keys.length; k++) {
        const [err, value] = replies[reply++] ?? [null, []];
        if (err !== null) throw err;
        (value as Array<string | null>).forEach((score, i) => {
          const id = query.ids[i];
          if (score === null || id === undefined) return;
          const time = Number(score);
          const earlier = query.into.get(id);
          if (earlier === undefined || earlier.getTime() < time) query.into.set(id, new Date(time));
        });
      }
    }
    return result;
  }

  /**
   * Closes the connection the buffer owns (none when it was given one). Buffered stamps stay in Redis for the next
   * flush, by any process. Safe to call twice.
   */
  close(): Promise<void> {
    this.closing ??= this.ownsRedis
      ? this.redis.quit().then(
          () => undefined,
          () => this.redis.disconnect(),
        )
      : Promise.resolve();
    return this.closing;
  }
}

export interface CreateStampBufferOptions extends Omit<StampBufferOptions, 'redis' | 'db'> {
  /** the Redis the queues use (REDIS_URL) */
  readonly redisUrl: string;
  /** the process's data source */
  readonly dataSource: DataSource;
}

/** A stamp buffer for the composition root: one per process, on a fail-fast Redis connection of its own. */
export function createStampBuffer(options: CreateStampBufferOptions): StampBuffer {
  const { redisUrl, dataSource, ...rest } = options;
  return new StampBuffer({ ...rest, redis: redisUrl, db: new Database(dataSource) });
}
