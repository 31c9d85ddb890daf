/**
 * The stamp buffer's flush (docs/architecture.md, "Heartbeats between flushes"): what moves buffered stamps from
 * Redis to PostgreSQL. The buffer (buffer.ts) absorbs and reads; this writes.
 *
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
 * - **One attempt now** (`flushAttempt`): the orphan path writes one attempt's buffered heartbeat before it judges
 *   liveness from PostgreSQL.
 */
import { randomUUID } from 'node:crypto';
import type { RedisConnection } from '../../redis/connection';
import { retryLockConflicts, STAMP_BATCH_SQL, STAMP_SQL, type Database } from '../../entities/sql';
import type { Logger } from '../../log';
import { acquireLock, releaseLock } from '../../redis/lock';
import { heartbeatMember, isUuid, parseHeartbeatMember, type Kind, type StampKeys } from './keys';

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

/** What a flusher works with: the buffer's connection, keys and logger, and the flush settings of its options. */
export interface StampFlusherOptions {
  readonly redis: RedisConnection;
  readonly db: Database;
  readonly keys: StampKeys;
  readonly log: Logger;
  /** the flush settings, defaults applied (see StampBufferOptions) */
  readonly notYetForMs: number;
  readonly maxPerStatement: number;
  readonly lockMs: number;
  readonly lockWaitMs: number;
  readonly hooks: StampBufferHooks;
}

/** The flush of one stamp buffer (its `flush` and `flushAttempt`). */
export class StampFlusher {
  private readonly redis: RedisConnection;
  private readonly db: Database;
  private readonly keys: StampKeys;
  private readonly log: Logger;
  private readonly notYetForMs: number;
  private readonly maxPerStatement: number;
  private readonly lockMs: number;
  private readonly lockWaitMs: number;
  private readonly hooks: StampBufferHooks;

  constructor(options: StampFlusherOptions) {
    this.redis = options.redis;
    this.db = options.db;
    this.keys = options.keys;
    this.log = options.log;
    this.notYetForMs = options.notYetForMs;
    this.maxPerStatement = options.maxPerStatement;
    this.lockMs = options.lockMs;
    this.lockWaitMs = options.lockWaitMs;
    this.hooks = options.hooks;
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

  /** The next round of what a flush took: up to `maxPerStatement` of each kind, oldest first (one round trip). */
  private async read(): Promise<[Buffered[], Buffered[]]> {
    const replies =
      (await this.redis
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

  /** Takes the flush lock, waiting up to `lockWaitMs` for another process's flush; false: flush unlocked. */
  private async lock(token: string): Promise<boolean> {
    if (await acquireLock(this.redis, this.keys.lock, token, this.lockMs, this.lockWaitMs)) return true;
    // a flush is idempotent: running beside another costs work, never correctness
    this.log.debug({ lockWaitMs: this.lockWaitMs }, 'another flush held the lock too long; flushing anyway');
    return false;
  }
}
