/**
 * Changing the number of partitions of a live fleet's transition stream (`fleet streams repartition --to N`;
 * docs/contract.md, "Changing the number of partitions"). Nothing is lost and every deployment's entries stay in
 * version order for every consumer group:
 *
 * 1. It takes the outbox relays' advisory lock and holds it to the end, so that no relay appends meanwhile
 *    (transitions go on being applied; their outbox rows wait). The active relay is asked to hand the lock over
 *    (NOTIFY on `RELAY_HANDOVER_CHANNEL`): it marks what it appended, then releases the lock to this session, which
 *    waits for it (a waiter is granted a released advisory lock before any standby's try).
 * 2. It waits until every consumer group on every key of the old layout (and of the new one) has read and
 *    acknowledged everything there: nothing is in flight in a handler, nothing waits unread. A group still behind
 *    after the timeout makes it refuse, naming the groups, with nothing changed.
 * 3. It writes the new number to every key's layout (`layoutKey`): from then on a relay with the old number cannot
 *    append to any of them (one that lost its lock between its read and its append, for instance), and checks the
 *    groups again. On the keys of the new layout it records the boundary (`since`): the last entry an earlier layout
 *    wrote there, which a group made later starts after and the relay never republishes.
 * 4. Every group of the old partitions is made on each new one that lacks it, at the key's boundary: a group whose
 *    consumers are all stopped during the switch continues from it when they start again (at `$` it would skip what
 *    came between).
 * 5. It changes the record, only if it still holds the old number. Consumers see the change at their next round
 *    and start over on the new partitions; the next relay to lead reads it and publishes the waiting rows there.
 * 6. It releases the lock.
 */
import { Client } from 'pg';
import type { RedisConnection } from '../redis/connection';
import { OUTBOX_SQL, RELAY_LOCK_KEY, sessionOf, type Session } from '../entities/sql';
import { settleWithin, sleep } from '../util';
import { pairs } from './consumer';
import { xinfoGroups } from './stream-stats';
import {
  compareIds,
  layoutKey,
  MAX_STREAM_PARTITIONS,
  partitionKeys,
  partitionsRecordKey,
  readerStart,
  readLayout,
  readPartitions,
  repartitionsKey,
} from './partitions';

export interface RepartitionOptions {
  /** PostgreSQL URL: the procedure holds the relays' lock on a session of its own */
  readonly databaseUrl: string;
  readonly redis: RedisConnection;
  /** the stream's base key, `<prefix>:transitions` */
  readonly streamKey: string;
  /** the new number of partitions, 1-1024 */
  readonly to: number;
  /**
   * how long it waits for the groups to catch up once it holds the relays' lock (ms), and for the lock itself unless
   * `lockTimeoutMs` says otherwise
   */
  readonly timeoutMs: number;
  /** how long it waits for the active relay to hand its lock over (default `timeoutMs`) */
  readonly lockTimeoutMs?: number;
  /** progress, one line at a time: what it waits for, who is behind, what it did */
  readonly report: (line: string) => void;
  /** how often it looks at the groups again (default 250 ms), and asks the relay again (4 times that) */
  readonly pollMs?: number;
}

/** A consumer group that has not read and acknowledged everything on a key. */
export interface GroupBehind {
  readonly group: string;
  readonly key: string;
  /** entries not yet delivered to the group (null when Redis cannot tell) */
  readonly unread: number | null;
  /** entries delivered and not acknowledged */
  readonly pending: number;
}

export type RepartitionOutcome =
  | { readonly kind: 'unchanged'; readonly partitions: number }
  | { readonly kind: 'repartitioned'; readonly from: number; readonly to: number }
  | {
      readonly kind: 'refused';
      readonly reason: 'relay_lock' | 'groups_behind' | 'record_changed';
      readonly message: string;
      readonly behind: readonly GroupBehind[];
    };

/**
 * Sets the record KEYS[1] to ARGV[2] only if it holds ARGV[1] (absent counts as 1, as consumers read it), and counts
 * the change in KEYS[2]: 1, else 0.
 */
const SWITCH_RECORD = `
local recorded = redis.call('GET', KEYS[1])
if (recorded or '1') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('INCR', KEYS[2])
return 1
`;

export async function repartition(options: RepartitionOptions): Promise<RepartitionOutcome> {
  const { redis, streamKey, to, report } = options;
  if (!Number.isInteger(to) || to < 1 || to > MAX_STREAM_PARTITIONS)
    throw new RangeError(`to: must be a whole number from 1 to ${MAX_STREAM_PARTITIONS}, got ${to}`);
  const unchanged = (partitions: number): RepartitionOutcome => {
    report(`the stream ${streamKey} has ${partitions} partition(s) already: nothing to do`);
    return { kind: 'unchanged', partitions };
  };
  const before = await readPartitions(redis, streamKey);
  if (before === to) return unchanged(before);

  const client = new Client({
    connectionString: options.databaseUrl,
    application_name: 'lifecycle-fleet-repartition',
    connectionTimeoutMillis: 5000,
  });
  await client.connect();
  const session = sessionOf(client);
  try {
    const lockTimeoutMs = options.lockTimeoutMs ?? options.timeoutMs;
    if (!(await takeRelayLock(options, session, performance.now() + lockTimeoutMs))) {
      const message = `the active outbox relay did not hand its lock over within ${seconds(lockTimeoutMs)}: is every relay of this version? Nothing was changed.`;
      return { kind: 'refused', reason: 'relay_lock', message, behind: [] };
    }
    report("holding the outbox relays' lock: no relay appends until the partitions are switched (transitions are still applied; their rows wait)");
    // under the lock: another repartition may have finished meanwhile
    const from = await readPartitions(redis, streamKey);
    if (from === to) return unchanged(from);
    const oldKeys = partitionKeys(streamKey, from);
    const newKeys = partitionKeys(streamKey, to);
    const keys = [...new Set([...oldKeys, ...newKeys])];

    // the groups' time starts with the lock: how long the hand-over took is not theirs
    const deadline = performance.now() + options.timeoutMs;
    const behind = await waitCaughtUp(options, keys, deadline);
    if (behind.length > 0) return refusedBehind(options, behind);

    const layouts = await Promise.all(keys.map(async (key) => ({ key, fields: await redis.hgetall(layoutKey(key)) })));
    const made: Array<{ key: string; group: string }> = [];
    const restore = async () => {
      await Promise.all(made.map(({ key, group }) => redis.xgroup('DESTROY', key, group)));
      await Promise.all(layouts.map(({ key, fields }) => restoreLayout(redis, key, fields)));
    };
    try {
      await Promise.all(keys.map((key) => redis.hset(layoutKey(key), 'partitions', String(to))));
      // what a relay that had lost its lock appended before the fence: the groups read it under the old layout first
      const late = await waitCaughtUp(options, keys, deadline);
      if (late.length > 0) {
        await restore();
        return refusedBehind(options, late);
      }
      const republished = await republishLostOfOldLayout(redis, session, from, oldKeys);
      if (republished > 0)
        report(
          `${republished} transition(s) of the old layout were no longer on the stream (Redis lost them): they go out again on the new partitions, before anything newer`,
        );
      await Promise.all(newKeys.map((key) => markBoundary(redis, key)));
      made.push(...(await carryGroups(redis, oldKeys, newKeys)));
      const switched = Number(
        await redis.eval(SWITCH_RECORD, 2, partitionsRecordKey(streamKey), repartitionsKey(streamKey), String(from), String(to)),
      );
      if (switched !== 1) {
        await restore();
        const message = `the record ${partitionsRecordKey(streamKey)} no longer holds ${from} (a process recorded another number meanwhile): nothing was changed; run this again`;
        return { kind: 'refused', reason: 'record_changed', message, behind: [] };
      }
    } catch (err) {
      await restore().catch(() => undefined);
      throw err;
    }
    report(
      `recorded ${to} partition(s) at ${partitionsRecordKey(streamKey)} (was ${from}): consumers move to them at their next round, the next active relay publishes the waiting transitions there; set FLEET_STREAM_PARTITIONS=${to} for every process (one started with ${from} now refuses to start)`,
    );
    return { kind: 'repartitioned', from, to };
  } finally {
    await session.run(OUTBOX_SQL.unlock, [RELAY_LOCK_KEY]).catch(() => undefined);
    await client.end().catch(() => undefined);
  }
}

/**
 * Rows of the old layout marked published whose entries its keys no longer hold (Redis lost its last writes, or failed
 * over to a replica a little behind, while this waited under the relays' lock, so no relay could reconcile): marked
 * unpublished, so that the next relay publishes them on their new partitions, in id order, before anything newer.
 * After the switch no relay looks at the old layout's rows again. Returns how many.
 */
async function republishLostOfOldLayout(redis: RedisConnection, session: Session, from: number, oldKeys: readonly string[]): Promise<number> {
  const [parts, ms, seq] = [[] as string[], [] as string[], [] as string[]];
  for (const [n, key] of oldKeys.entries()) {
    const [last, layout] = await Promise.all([redis.xrevrange(key, '+', '-', 'COUNT', 1), readLayout(redis, key)]);
    const tail = last[0]?.[0] ?? '0-0';
    // what an earlier layout wrote on the key (before its `since`) was acknowledged by every group before that switch
    const [m, q] = (layout.since !== null && compareIds(layout.since, tail) > 0 ? layout.since : tail).split('-');
    parts.push(from === 1 ? '' : String(n));
    ms.push(m ?? '0');
    seq.push(q ?? '0');
  }
  return (await session.run(OUTBOX_SQL.unpublishPastTails, [parts, ms, seq])).affected;
}

/**
 * Takes the relays' lock: at once when no relay holds it, else by asking the active relay to hand it over (again
 * every 4 polls, should the request have come before this session waited, or while no relay listened) while this
 * session waits for it. False when the deadline passed first.
 */
async function takeRelayLock(options: RepartitionOptions, session: Session, deadline: number): Promise<boolean> {
  if ((await session.run(OUTBOX_SQL.tryLock, [RELAY_LOCK_KEY])).rows[0]?.locked === true) return true;
  options.report('asking the active outbox relay to hand its lock over');
  const remaining = Math.max(1, Math.ceil(deadline - performance.now()));
  await session.run(OUTBOX_SQL.lockTimeout, [`${remaining}ms`]);
  const waiting = session.run(OUTBOX_SQL.lock, [RELAY_LOCK_KEY]);
  waiting.catch(() => undefined);
  const asker = new Client({ connectionString: options.databaseUrl, application_name: 'lifecycle-fleet-repartition', connectionTimeoutMillis: 5000 });
  await asker.connect();
  try {
    for (;;) {
      await sessionOf(asker).run(OUTBOX_SQL.askHandover);
      if ((await settleWithin(waiting, (options.pollMs ?? 250) * 4)) === 'done') return true;
    }
  } catch (err) {
    if ((err as { code?: unknown }).code === '55P03') return false; // lock_not_available: lock_timeout passed
    throw err;
  } finally {
    await asker.end().catch(() => undefined);
    await session.run(OUTBOX_SQL.lockTimeout, ['0']).catch(() => undefined);
  }
}

/** Waits until no group is behind on any of `keys`, saying who is when that changes; returns who still is at the deadline. */
async function waitCaughtUp(options: RepartitionOptions, keys: readonly string[], deadline: number): Promise<GroupBehind[]> {
  let said = '';
  for (;;) {
    const behind = (await Promise.all(keys.map((key) => groupsBehind(options.redis, key)))).flat();
    if (behind.length === 0) return [];
    const text = describeBehind(behind);
    if (text !== said) options.report(`waiting for consumer groups to read and acknowledge everything: ${text}`);
    said = text;
    const left = deadline - performance.now();
    if (left <= 0) return behind;
    await sleep(Math.min(options.pollMs ?? 250, left));
  }
}

/**
 * The groups on `key` that have not read and acknowledged everything it holds: entries pending, or a position before
 * its last entry. With no relay appending, a group caught up stays so.
 */
export async function groupsBehind(redis: RedisConnection, key: string): Promise<GroupBehind[]> {
  const groups = await xinfoGroups(redis, key);
  if (groups.length === 0) return [];
  const last = (await redis.xrevrange(key, '+', '-', 'COUNT', 1))[0]?.[0] ?? null;
  return groups.flatMap((g) => {
    const unread = last !== null && compareIds(g.lastDeliveredId, last) < 0;
    if (g.pending === 0 && !unread) return [];
    return [{ group: g.name, key, unread: unread ? g.lag : 0, pending: g.pending }];
  });
}

function describeBehind(behind: readonly GroupBehind[]): string {
  return behind.map((b) => `group ${b.group} on ${b.key} (${b.unread ?? 'some'} unread, ${b.pending} pending)`).join('; ');
}

function refusedBehind(options: RepartitionOptions, behind: readonly GroupBehind[]): RepartitionOutcome {
  const groups = [...new Set(behind.map((b) => b.group))];
  const message =
    `consumer group(s) ${groups.join(', ')} did not read and acknowledge everything within ${seconds(options.timeoutMs)}: ${describeBehind(behind)}. ` +
    'Nothing was changed. Start their consumers (or let them catch up) and run this again; a group nobody reads any more ' +
    'must be deleted deliberately first, on every partition: XGROUP DESTROY <partition key> <group>.';
  return { kind: 'refused', reason: 'groups_behind', message, behind };
}

/**
 * The boundary of a key of the new layout: its last entry id and the count of entries ever added to it, both as of
 * now (no relay appends). Nothing recorded for a key that holds no stream.
 */
async function markBoundary(redis: RedisConnection, key: string): Promise<void> {
  let info: Record<string, unknown>;
  try {
    info = pairs((await redis.xinfo('STREAM', key)) as unknown[]);
  } catch (err) {
    if (!(err instanceof Error && /no such key/i.test(err.message))) throw err;
    await redis.hdel(layoutKey(key), 'since', 'entries');
    return;
  }
  await redis.hset(layoutKey(key), 'since', String(info['last-generated-id']), 'entries', String(Number(info['entries-added'] ?? 0)));
}

/**
 * Makes every group of the old keys on each new key that lacks it, at the key's boundary (its start when it has
 * none), with the count of entries up to there. Returns the groups it made.
 */
async function carryGroups(
  redis: RedisConnection,
  oldKeys: readonly string[],
  newKeys: readonly string[],
): Promise<Array<{ key: string; group: string }>> {
  const groups = [...new Set((await Promise.all(oldKeys.map((key) => xinfoGroups(redis, key)))).flat().map((g) => g.name))];
  const made: Array<{ key: string; group: string }> = [];
  for (const key of newKeys) {
    const start = await readerStart(redis, key, '0');
    for (const group of groups) {
      try {
        await redis.xgroup('CREATE', key, group, start.id, 'MKSTREAM', 'ENTRIESREAD', start.entriesRead ?? 0);
        made.push({ key, group });
      } catch (err) {
        if (!(err instanceof Error && err.message.includes('BUSYGROUP'))) throw err;
      }
    }
  }
  return made;
}

/** Puts a key's layout back as it was (`fields`; none: no layout). */
async function restoreLayout(redis: RedisConnection, key: string, fields: Record<string, string>): Promise<void> {
  await redis.del(layoutKey(key));
  const flat = Object.entries(fields).flat();
  if (flat.length > 0) await redis.hset(layoutKey(key), ...flat);
}

function seconds(ms: number): string {
  return `${Math.round(ms / 100) / 10} s`;
}
