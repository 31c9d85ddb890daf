/**
 * The stamp buffer (docs/architecture.md, "Heartbeats between flushes"): heartbeat and readiness stamps absorbed in
 * Redis, one command each, and written to PostgreSQL in batches, so a heartbeat costs no PostgreSQL commit.
 *
 * - **Absorb**: `ZADD <key> GT <ms> <member>` keeps the latest time per attempt (member `<attemptId>:<deploymentId>`,
 *   both of which the UPDATE checks) or per deployment (member `<deploymentId>`).
 * - **Flush**: read both sorted sets (oldest first), write each kind in ONE statement (src/entities/sql/stamps.ts,
 *   `STAMP_BATCH_SQL`: the same monotonic `GREATEST` UPDATE as the per-event path, over arrays), then remove only
 *   the members whose score is still the one read. A stamp absorbed during the flush stays for the next one; a
 *   flush that dies half-way leaves everything in Redis, and doing it again is harmless (the write only moves stamps
 *   forward). One flush runs at a time fleet-wide (a short Redis lock); two at once would still be harmless.
 * - **What a flush decides** (the per-event path's noops, decided here instead): a running attempt / ready
 *   deployment is stamped; one that exists but is not running / not ready is dropped (`not_running`, `not_ready`);
 *   one that does not exist is kept until its stamp is older than `notYetForMs` (the lifecycle worker's 30 s budget
 *   for stamps of what does not exist yet), then dropped with a warning (`not_found`).
 * - **Reads** overlay the buffered time on PostgreSQL's (the later of the two), one Redis round trip.
 *
 * Keys live under the BullMQ prefix (`<prefix>:{stamps}:...`, so a Redis user confined to `<prefix>:*` reaches them),
 * and share one hash tag: the prefix's when it has one (Redis hashes on the first `{...}`; a cluster requires one), else
 * `{stamps}`. Either way they sit in one slot, with every other key of the prefix when it has a tag.
 */
import { randomUUID } from 'node:crypto';
import type { RedisConnection } from '../queues/redis';
import type { DataSource } from 'typeorm';
import { Database, retryLockConflicts, STAMP_BATCH_SQL, STAMP_SQL } from '../entities/sql';
import { silentLogger, type Logger } from '../log';
import { createRedis, requireSlotPrefix } from '../queues/redis';
import { acquireLock, releaseLock } from '../queues/redis-lock';
import { rejectAfter, UUID_PATTERN } from '../util';

/** The Redis keys of a prefix's stamp buffer. */
export function stampKeys(prefix: string): { readonly heartbeat: string; readonly readiness: string; readonly lock: string } {
  return {
    heartbeat: `${prefix}:{stamps}:heartbeat`,
    readiness: `${prefix}:{stamps}:readiness`,
    lock: `${prefix}:{stamps}:flush-lock`,
  };
}

/** A heartbeat's member: both ids, because the write checks that the attempt belongs to the deployment. */
export function heartbeatMember(attemptId: string, deploymentId: string): string {
  return `${attemptId}:${deploymentId}`;
}

export function parseHeartbeatMember(member: string): { attemptId: string; deploymentId: string } | null {
  const [attemptId, deploymentId, ...rest] = member.split(':');
  if (attemptId === undefined || deploymentId === undefined || rest.length > 0) return null;
  return isUuid(attemptId) && isUuid(deploymentId) ? { attemptId, deploymentId } : null;
}

/** Members come from validated events, but the key is Redis's: one bad member must not fail a whole batch's cast. */
const isUuid = (s: string): boolean => UUID_PATTERN.test(s);

/**
 * What a flush does with one buffered stamp, given what its statement reported (`row`; undefined when the member
 * could not be sent, e.g. not two UUIDs): written (`stamped`); there but not running / not ready (`not_stampable`:
 * dropped, as the per-event path's noop was); not there yet (`keep`, while the stamp is no older than `horizon`);
 * still not there past it, or unreadable (`not_found`: dropped).
 */
export function fateOf(
  row: { readonly stamped: boolean; readonly found: boolean } | undefined,
  at: Date,
  horizon: number,
): 'stamped' | 'not_stampable' | 'keep' | 'not_found' {
  if (row === undefined) return 'not_found';
  if (row.stamped) return 'stamped';
  if (row.found) return 'not_stampable';
  return at.getTime() >= horizon ? 'keep' : 'not_found';
}

/** A stamp the flush statement did not report: it wrote it. */
const WRITTEN = Object.freeze({ stamped: true, found: true });

/** What one flush did. */
export interface FlushResult {
  /** buffered heartbeats read (attempts) */
  readonly heartbeats: number;
  /** buffered readiness stamps read (deployments) */
  readonly readiness: number;
  /** written: the attempt was running / the deployment ready */
  readonly stamped: number;
  /** removed without a write: not running / not ready, or still not found past `notYetForMs` */
  readonly dropped: number;
  /** left for a later flush: what they name does not exist yet */
  readonly kept: number;
  readonly ms: number;
}

/**
 * Test seams. They observe the flush and may delay it (to stage an interleaving); they never switch it onto
 * another path.
 */
export interface StampBufferHooks {
  /** after the stamps were written to PostgreSQL, before they are removed from Redis */
  readonly beforeRemove?: () => void | Promise<void>;
}

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
  /** stamps of each kind written per flush, oldest first (default 100,000; the rest wait for the next flush) */
  readonly maxPerFlush?: number;
  /** how long the flush lock is held at most (default 30 s) */
  readonly lockMs?: number;
  /** how long a flush waits for another process's flush to finish before it flushes anyway (default 10 s) */
  readonly lockWaitMs?: number;
  /** how long a read's overlay waits for Redis before it answers from PostgreSQL alone (default 500 ms) */
  readonly readTimeoutMs?: number;
  readonly logger?: Logger;
  readonly hooks?: StampBufferHooks;
}

/** Removes each (member, score) pair whose score is still the one given: a stamp absorbed since stays. */
const REMOVE_UNCHANGED = `local removed = 0
for i = 1, #ARGV, 2 do
  local current = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if current and tonumber(current) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
return removed`;

/** pairs removed per script call: one call holds Redis for a few milliseconds at most */
const REMOVE_CHUNK = 5000;

interface Buffered {
  readonly member: string;
  /** the score as Redis returned it, handed back to the removal script */
  readonly score: string;
  readonly at: Date;
}

export class StampBuffer {
  readonly keys: ReturnType<typeof stampKeys>;
  private readonly redis: RedisConnection;
  private readonly db: Database;
  private readonly log: Logger;
  private readonly notYetForMs: number;
  private readonly maxPerFlush: number;
  private readonly lockMs: number;
  private readonly lockWaitMs: number;
  readonly readTimeoutMs: number;
  private readonly hooks: StampBufferHooks;
  private readonly ownsRedis: boolean;
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
    this.db = options.db;
    this.keys = stampKeys(options.prefix ?? 'fleet');
    this.log = (options.logger ?? silentLogger).child({ component: 'stamp-buffer' });
    this.notYetForMs = options.notYetForMs ?? 30_000;
    this.maxPerFlush = options.maxPerFlush ?? 100_000;
    this.lockMs = options.lockMs ?? 30_000;
    this.lockWaitMs = options.lockWaitMs ?? 10_000;
    this.readTimeoutMs = options.readTimeoutMs ?? 500;
    this.hooks = options.hooks ?? {};
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
   * Writes everything buffered to PostgreSQL (at most one statement per kind) and removes what it wrote or
   * dropped, unless it was absorbed again meanwhile. `now` decides which stamps of what does not exist are old
   * enough to drop. A statement that loses a lock conflict runs again (`retryLockConflicts`). Throws when Redis or
   * PostgreSQL fail; nothing is lost then, and the next flush does it again.
   */
  async flush(now: Date): Promise<FlushResult> {
    const started = performance.now();
    const token = randomUUID();
    const locked = await this.lock(token);
    try {
      const [heartbeats, readiness] = await this.read();
      let stamped = 0;
      let kept = 0;
      const remove: { heartbeat: Buffered[]; readiness: Buffered[] } = { heartbeat: [], readiness: [] };
      const notRunning: string[] = [];
      const notFound: string[] = [];
      const horizon = now.getTime() - this.notYetForMs;
      const classify = (kind: 'heartbeat' | 'readiness', b: Buffered, row: { stamped: boolean; found: boolean } | undefined) => {
        const fate = fateOf(row, b.at, horizon);
        if (fate === 'keep') {
          kept++;
          return;
        }
        remove[kind].push(b);
        if (fate === 'stamped') stamped++;
        else (fate === 'not_found' ? notFound : notRunning).push(b.member);
      };

      if (heartbeats.length > 0) {
        const valid = heartbeats.map((b) => ({ b, ids: parseHeartbeatMember(b.member) }));
        const rows = valid.filter((v) => v.ids !== null);
        const params = [rows.map((v) => v.ids?.attemptId), rows.map((v) => v.ids?.deploymentId), rows.map((v) => v.b.at)];
        const { rows: written } = await retryLockConflicts(() => this.db.run(STAMP_BATCH_SQL.heartbeats, params), {
          what: 'the heartbeat flush',
          log: this.log,
        });
        // only the stamps it did not write come back
        const unwritten = new Map(written.map((r) => [heartbeatMember(r.attempt_id, r.deployment_id), r]));
        for (const { b, ids } of valid) classify('heartbeat', b, ids === null ? undefined : (unwritten.get(b.member) ?? WRITTEN));
      }
      if (readiness.length > 0) {
        const valid = readiness.filter((b) => isUuid(b.member));
        const params = [valid.map((b) => b.member), valid.map((b) => b.at)];
        const { rows: written } = await retryLockConflicts(() => this.db.run(STAMP_BATCH_SQL.readiness, params), {
          what: 'the readiness flush',
          log: this.log,
        });
        const unwritten = new Map(written.map((r) => [r.deployment_id, r]));
        for (const b of readiness) classify('readiness', b, isUuid(b.member) ? (unwritten.get(b.member) ?? WRITTEN) : undefined);
      }

      await this.hooks.beforeRemove?.();
      await this.removeUnchanged(this.keys.heartbeat, remove.heartbeat);
      await this.removeUnchanged(this.keys.readiness, remove.readiness);

      if (notFound.length > 0) {
        this.log.warn(
          { count: notFound.length, members: notFound.slice(0, 20), notYetForMs: this.notYetForMs },
          'stamps dropped: what they name still does not exist (not_found)',
        );
      }
      const result: FlushResult = {
        heartbeats: heartbeats.length,
        readiness: readiness.length,
        stamped,
        dropped: notRunning.length + notFound.length,
        kept,
        ms: Math.round(performance.now() - started),
      };
      this.log.debug({ ...result, notRunningOrNotReady: notRunning.length, notFound: notFound.length, locked }, 'stamps flushed');
      return result;
    } finally {
      if (locked) await releaseLock(this.redis, this.keys.lock, token);
    }
  }

  /**
   * Writes one attempt's buffered heartbeat to PostgreSQL now (the orphan path: liveness is judged from
   * PostgreSQL, so a heartbeat still in Redis must reach it first). Returns the time written, or null when none
   * was buffered.
   */
  async flushAttempt(attemptId: string, deploymentId: string): Promise<Date | null> {
    const member = heartbeatMember(attemptId, deploymentId);
    const score = await this.redis.zscore(this.keys.heartbeat, member);
    if (score === null) return null;
    const at = new Date(Number(score));
    const { affected } = await this.db.run(STAMP_SQL.heartbeat, [attemptId, deploymentId, at]);
    // not stamped (not running): left for the flush to decide, as any other
    if (affected === 1) await this.removeUnchanged(this.keys.heartbeat, [{ member, score, at }]);
    return at;
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
   * Both at once, in one round trip (a pipeline of two ZMSCOREs), within `readTimeoutMs`: what the read model
   * overlays on PostgreSQL's stamps. Throws when Redis does not answer in time.
   */
  async latest(query: {
    readonly readiness?: readonly string[];
    readonly heartbeats?: ReadonlyArray<{ attemptId: string; deploymentId: string }>;
  }): Promise<{ readiness: Map<string, Date>; heartbeats: Map<string, Date> }> {
    const deploymentIds = query.readiness ?? [];
    const attempts = query.heartbeats ?? [];
    const result = { readiness: new Map<string, Date>(), heartbeats: new Map<string, Date>() };
    if (deploymentIds.length === 0 && attempts.length === 0) return result;
    const pipeline = this.redis.pipeline();
    if (deploymentIds.length > 0) pipeline.zmscore(this.keys.readiness, ...deploymentIds);
    if (attempts.length > 0) pipeline.zmscore(this.keys.heartbeat, ...attempts.map((a) => heartbeatMember(a.attemptId, a.deploymentId)));
    const replies = (await rejectAfter(pipeline.exec(), this.readTimeoutMs, 'buffered stamps')) ?? [];
    const scores = replies.map(([err, value]) => {
      if (err !== null) throw err;
      return value as Array<string | null>;
    });
    const fill = (into: Map<string, Date>, keys: readonly string[], values: Array<string | null> | undefined) =>
      keys.forEach((key, i) => {
        const score = values?.[i];
        if (score !== null && score !== undefined) into.set(key, new Date(Number(score)));
      });
    fill(result.readiness, deploymentIds, deploymentIds.length > 0 ? scores[0] : undefined);
    fill(
      result.heartbeats,
      attempts.map((a) => a.attemptId),
      attempts.length > 0 ? scores[deploymentIds.length > 0 ? 1 : 0] : undefined,
    );
    return result;
  }

  /** Everything buffered, oldest first, up to `maxPerFlush` of each kind (one round trip). */
  private async read(): Promise<[Buffered[], Buffered[]]> {
    const replies = (await this.redis
      .pipeline()
      .zrange(this.keys.heartbeat, 0, this.maxPerFlush - 1, 'WITHSCORES')
      .zrange(this.keys.readiness, 0, this.maxPerFlush - 1, 'WITHSCORES')
      .exec()) ?? [];
    const parse = (reply: [Error | null, unknown] | undefined): Buffered[] => {
      if (reply === undefined) return [];
      if (reply[0] !== null) throw reply[0];
      const flat = reply[1] as string[];
      const out: Buffered[] = [];
      for (let i = 0; i + 1 < flat.length; i += 2) {
        const member = flat[i] as string;
        const score = flat[i + 1] as string;
        out.push({ member, score, at: new Date(Number(score)) });
      }
      return out;
    };
    return [parse(replies[0]), parse(replies[1])];
  }

  private async removeUnchanged(key: string, stamps: readonly Buffered[]): Promise<void> {
    for (let i = 0; i < stamps.length; i += REMOVE_CHUNK) {
      const args = stamps.slice(i, i + REMOVE_CHUNK).flatMap((b) => [b.member, b.score]);
      await this.redis.eval(REMOVE_UNCHANGED, 1, key, ...args);
    }
  }

  /**
   * Closes the connection the buffer owns (none when it was given one). Buffered stamps stay in Redis for the next
   * flush, by any process. Safe to call twice.
   */
  close(): Promise<void> {
    this.closing ??= this.ownsRedis ? this.redis.quit().then(() => undefined, () => this.redis.disconnect()) : Promise.resolve();
    return this.closing;
  }

  /** Takes the flush lock, waiting up to `lockWaitMs` for another process's flush; false: flush unlocked. */
  private async lock(token: string): Promise<boolean> {
    if (await acquireLock(this.redis, this.keys.lock, token, this.lockMs, this.lockWaitMs)) return true;
    // a flush is idempotent: running beside another costs work, never correctness
    this.log.debug({ lockWaitMs: this.lockWaitMs }, 'another flush held the lock too long; flushing anyway');
    return false;
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
