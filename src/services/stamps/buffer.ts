/**
 * The stamp buffer (docs/architecture.md, "Heartbeats between flushes"): heartbeat and readiness stamps absorbed in
 * Redis, one command each, and written to PostgreSQL in batches, so a heartbeat costs no PostgreSQL commit.
 *
 * - **Absorb**: `ZADD <key> GT <ms> <member>` keeps the latest time per attempt (member `<attemptId>:<deploymentId>`,
 *   both of which the UPDATE checks) or per deployment (member `<deploymentId>`).
 * - **Flush**: first *take* what is buffered: each kind's sorted set is renamed to its `:flushing` key (O(1); merged
 *   into it, `AGGREGATE MAX`, if a flush that died half-way left one), so stamps absorbed from then on gather in a
 *   new set for the next flush. Then *drain* the taken set, in rounds of up to `maxPerStatement` stamps of each kind:
 *   read, write each kind in ONE statement (src/entities/sql/stamps.ts, `STAMP_BATCH_SQL`: the same monotonic
 *   `GREATEST` UPDATE as the per-event path, over arrays), remove only the members whose score is still the one
 *   read, until it is empty. **The bound**: every stamp absorbed before a flush starts is decided by that flush,
 *   however many there are and whenever they came, so each reaches PostgreSQL at the first tick after it was
 *   absorbed. (Issue 27: a flush that took "the oldest N" from the absorbing set never took an attempt that
 *   heartbeated late in every interval, since each heartbeat raised its score.) A flush that dies half-way leaves
 *   what it had not written in Redis, and doing it again is harmless (the write only moves stamps forward). One
 *   flush runs at a time fleet-wide (a short Redis lock); two at once would still be harmless.
 * - **What a flush decides** (the per-event path's noops, decided here instead): a running attempt / ready
 *   deployment is stamped; one that exists but is not running / not ready is dropped (`not_running`, `not_ready`);
 *   one that does not exist is kept (moved back into the absorbing set, for the next flush) until its stamp is older
 *   than `notYetForMs` (the lifecycle worker's 30 s budget for stamps of what does not exist yet), then dropped with
 *   a warning (`not_found`).
 * - **Reads** overlay the buffered time on PostgreSQL's (the latest of the absorbing and the taken set's, and
 *   PostgreSQL's), one Redis round trip.
 *
 * Keys live under the BullMQ prefix (`<prefix>:{stamps}:...`, so a Redis user confined to `<prefix>:*` reaches them),
 * and share one hash tag: the prefix's when it has one (Redis hashes on the first `{...}`; a cluster requires one), else
 * `{stamps}`. Either way they sit in one slot, with every other key of the prefix when it has a tag.
 */
import { randomUUID } from 'node:crypto';
import type { RedisConnection } from '../../redis/connection';
import type { DataSource } from 'typeorm';
import { Database, retryLockConflicts, STAMP_BATCH_SQL, STAMP_SQL } from '../../entities/sql';
import { silentLogger, type Logger } from '../../log';
import { createRedis, requireSlotPrefix } from '../../redis/connection';
import { acquireLock, releaseLock } from '../../redis/lock';
import { rejectAfter, UUID_PATTERN } from '../../util';

/** The two kinds of stamp. */
type Kind = 'heartbeat' | 'readiness';

/** The Redis keys of a prefix's stamp buffer: each kind's absorbing set, the set a flush took, and the flush lock. */
export function stampKeys(prefix: string): {
  readonly heartbeat: string;
  readonly readiness: string;
  readonly heartbeatFlushing: string;
  readonly readinessFlushing: string;
  readonly lock: string;
} {
  return {
    heartbeat: `${prefix}:{stamps}:heartbeat`,
    readiness: `${prefix}:{stamps}:readiness`,
    heartbeatFlushing: `${prefix}:{stamps}:heartbeat:flushing`,
    readinessFlushing: `${prefix}:{stamps}:readiness:flushing`,
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
  /** rounds of the drain: each read up to `maxPerStatement` stamps of each kind and wrote them in one statement per kind */
  readonly rounds: number;
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

/**
 * Takes what is buffered for a flush. KEYS are (absorbing, flushing) pairs: each absorbing set is renamed to its
 * flushing key, or merged into it (the later time of each member) when a flush that died half-way left one.
 */
const TAKE = `for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('EXISTS', KEYS[i + 1]) == 1 then
      redis.call('ZUNIONSTORE', KEYS[i + 1], 2, KEYS[i + 1], KEYS[i], 'AGGREGATE', 'MAX')
      redis.call('DEL', KEYS[i])
    else
      redis.call('RENAME', KEYS[i], KEYS[i + 1])
    end
  end
end
return 0`;

/**
 * Removes from KEYS[1] each (member, score) pair whose score is still the one given: a stamp absorbed since stays.
 * With KEYS[2], each removed member is put back there (`ZADD GT`: a later stamp there wins): a kept stamp.
 */
const REMOVE_UNCHANGED = `for i = 1, #ARGV, 2 do
  local current = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if current and tonumber(current) == tonumber(ARGV[i + 1]) then
    if KEYS[2] then redis.call('ZADD', KEYS[2], 'GT', current, ARGV[i]) end
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return 0`;

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
  private readonly maxPerStatement: number;
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
    this.maxPerStatement = Math.max(1, options.maxPerStatement ?? 100_000);
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
   * Writes everything buffered when it starts to PostgreSQL (one statement per kind per `maxPerStatement` stamps)
   * and removes what it wrote or dropped, unless it was absorbed again meanwhile. `now` decides which stamps of what
   * does not exist are old enough to drop. A statement that loses a lock conflict runs again
   * (`retryLockConflicts`). Throws when Redis or PostgreSQL fail; what was not written stays in
   * Redis then, and the next flush does it.
   */
  async flush(now: Date): Promise<FlushResult> {
    const started = performance.now();
    const token = randomUUID();
    const locked = await this.lock(token);
    try {
      const horizon = now.getTime() - this.notYetForMs;
      const total = { heartbeats: 0, readiness: 0, rounds: 0, stamped: 0, kept: 0 };
      const notRunning: string[] = [];
      const notFound: string[] = [];
      await this.redis.eval(TAKE, 4, this.keys.heartbeat, this.keys.heartbeatFlushing, this.keys.readiness, this.keys.readinessFlushing);
      for (;;) {
        const [heartbeats, readiness] = await this.read();
        if (heartbeats.length === 0 && readiness.length === 0) break;
        const round = await this.writeRound(heartbeats, readiness, horizon);
        total.heartbeats += heartbeats.length;
        total.readiness += readiness.length;
        total.rounds++;
        total.stamped += round.stamped;
        total.kept += round.kept.heartbeat.length + round.kept.readiness.length;
        notRunning.push(...round.notRunning);
        notFound.push(...round.notFound);

        // Every round removes what it read, so the taken set empties: only another flush's take (once, at its start)
        // changes a score there, and the round after this one writes the new score.
        await this.hooks.beforeRemove?.();
        for (const kind of ['heartbeat', 'readiness'] as const) {
          await this.removeUnchanged(this.flushingKey(kind), round.remove[kind]);
          await this.removeUnchanged(this.flushingKey(kind), round.kept[kind], this.keys[kind]);
        }
      }

      if (notFound.length > 0) {
        this.log.warn(
          { count: notFound.length, members: notFound.slice(0, 20), notYetForMs: this.notYetForMs },
          'stamps dropped: what they name still does not exist (not_found)',
        );
      }
      const result: FlushResult = {
        heartbeats: total.heartbeats,
        readiness: total.readiness,
        rounds: total.rounds,
        stamped: total.stamped,
        dropped: notRunning.length + notFound.length,
        kept: total.kept,
        ms: Math.round(performance.now() - started),
      };
      this.log.debug({ ...result, notRunningOrNotReady: notRunning.length, notFound: notFound.length, locked }, 'stamps flushed');
      return result;
    } finally {
      if (locked) await releaseLock(this.redis, this.keys.lock, token);
    }
  }

  /** One round of a flush: at most one statement per kind, and each stamp's fate. */
  private async writeRound(heartbeats: readonly Buffered[], readiness: readonly Buffered[], horizon: number) {
    const remove: Record<Kind, Buffered[]> = { heartbeat: [], readiness: [] };
    const kept: Record<Kind, Buffered[]> = { heartbeat: [], readiness: [] };
    const notRunning: string[] = [];
    const notFound: string[] = [];
    let stamped = 0;
    const classify = (kind: Kind, b: Buffered, row: { stamped: boolean; found: boolean } | undefined) => {
      const fate = fateOf(row, b.at, horizon);
      if (fate === 'keep') {
        kept[kind].push(b);
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
    return { remove, kept, notRunning, notFound, stamped };
  }

  /**
   * Writes one attempt's buffered heartbeat to PostgreSQL now (the orphan path: liveness is judged from
   * PostgreSQL, so a heartbeat still in Redis must reach it first). Returns the time written, or null when none
   * was buffered.
   */
  async flushAttempt(attemptId: string, deploymentId: string): Promise<Date | null> {
    const member = heartbeatMember(attemptId, deploymentId);
    // absorbed, or taken by a flush under way
    const keys = [this.keys.heartbeat, this.keys.heartbeatFlushing] as const;
    const replies = (await this.redis.pipeline().zscore(keys[0], member).zscore(keys[1], member).exec()) ?? [];
    const found = keys.flatMap((key, i) => {
      const [err, score] = replies[i] ?? [null, null];
      if (err !== null) throw err;
      return typeof score === 'string' ? [{ key, stamp: { member, score, at: new Date(Number(score)) } }] : [];
    });
    if (found.length === 0) return null;
    const at = new Date(Math.max(...found.map((f) => f.stamp.at.getTime())));
    const { affected } = await this.db.run(STAMP_SQL.heartbeat, [attemptId, deploymentId, at]);
    // not stamped (not running): left for the flush to decide, as any other
    if (affected === 1) for (const { key, stamp } of found) await this.removeUnchanged(key, [stamp]);
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

  /** The next round of what a flush took: up to `maxPerStatement` of each kind, oldest first (one round trip). */
  private async read(): Promise<[Buffered[], Buffered[]]> {
    const replies = (await this.redis
      .pipeline()
      .zrange(this.keys.heartbeatFlushing, 0, this.maxPerStatement - 1, 'WITHSCORES')
      .zrange(this.keys.readinessFlushing, 0, this.maxPerStatement - 1, 'WITHSCORES')
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

  private flushingKey(kind: Kind): string {
    return kind === 'heartbeat' ? this.keys.heartbeatFlushing : this.keys.readinessFlushing;
  }

  /** Removes each stamp still at the score read (see REMOVE_UNCHANGED), putting it back into `keepIn` if given. */
  private async removeUnchanged(key: string, stamps: readonly Buffered[], keepIn?: string): Promise<void> {
    const keys = keepIn === undefined ? [key] : [key, keepIn];
    for (let i = 0; i < stamps.length; i += REMOVE_CHUNK) {
      const args = stamps.slice(i, i + REMOVE_CHUNK).flatMap((b) => [b.member, b.score]);
      await this.redis.eval(REMOVE_UNCHANGED, keys.length, ...keys, ...args);
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
