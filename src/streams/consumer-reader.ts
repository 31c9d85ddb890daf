/**
 * How a `TransitionConsumer` reads a partition it owns (docs/architecture.md, "The stream consumer"): the group made
 * on the partition if missing (never before the key's layout boundary), then every entry left pending in the group
 * (claimed under the lease, in id order: what a previous owner read and did not acknowledge), then new entries, each
 * read only under the lease and only if nothing the group has not read was trimmed before it. A position trimmed away
 * is a resync (`ResyncRequiredError`); a read that spanned a reset connection is not trusted (`ReadInterrupted`).
 */
import { Cluster, type default as IORedis } from 'ioredis';
import type { RedisConnection } from '../redis/connection';
import { ResyncRequiredError } from '../errors';
import type { Logger } from '../log';
import type { EntryHandling } from './consumer-handling';
import type { ConsumerContext, TransitionConsumerOptions } from './consumer-options';
import type { Owned, PartitionOwnership, Session } from './consumer-ownership';
import { FENCED_CLAIM } from './leases';
import { compareIds, readerStart } from './partitions';
import { parseEntry, type TransitionEntry } from './stream-entry';

/**
 * Reads the next batch for the group only if the consumer still holds the partition's lease (KEYS[2] = ARGV[4]) and
 * the group cannot miss an entry by it: one atomic step, so nothing can be trimmed between the check and the read,
 * and no consumer that lost its lease reads on. Redis 7 counts the entries ever added to a stream and, per group, the
 * entries it has read (`entries-read`, which a read across a trimmed hole does not correct); the stream has dropped
 * `entries-added - length` entries, all from its head. If that is more than the group has read, some entry the group
 * never read is gone, and the next `>` read would silently skip it. A group whose count Redis does not know (created
 * at an id in the middle) counts as missing when its position is behind the first entry still held (conservative).
 * Returns `{'LOST'}`, `{'MISSED', last-delivered-id, first retained id}` or `{'OK', last-delivered-id, XREADGROUP reply}`.
 */
const READ_IF_CONTIGUOUS = `
if redis.call('GET', KEYS[2]) ~= ARGV[4] then return {'LOST'} end
local function field(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
  return nil
end
local stream = redis.call('XINFO', 'STREAM', KEYS[1])
local removed = field(stream, 'entries-added') - field(stream, 'length')
local first = field(stream, 'recorded-first-entry-id')
local last, read = '0-0', false
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(g, 'name') == ARGV[1] then
    last = field(g, 'last-delivered-id')
    read = field(g, 'entries-read')
  end
end
if removed > 0 then
  local missed
  if read then
    missed = removed > read
  else
    local lm, ls = string.match(last, '(%d+)-(%d+)')
    local fm, fs = string.match(first, '(%d+)-(%d+)')
    lm, ls, fm, fs = tonumber(lm), tonumber(ls), tonumber(fm), tonumber(fs)
    missed = lm < fm or (lm == fm and ls < fs)
  end
  if missed then return {'MISSED', last, first} end
end
return {'OK', last, redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')}
`;

/** The reads of one consumer, with the groups it made or found. */
export class PartitionReader {
  private readonly redis: RedisConnection;
  private readonly options: TransitionConsumerOptions;
  private readonly log: Logger;
  /** where groups created from now on start, when not `startId` (after the partitions changed) */
  private startOverride: string | null = null;
  /** partitions whose group this consumer made or found: from then on a missing group is a lost position */
  private readonly joined = new Set<string>();
  /**
   * Connections to Redis closed since start. ioredis sends a command that was in flight when its connection closed
   * again on the next one: a read whose reply was lost ran twice, and what the first run delivered waits unseen in
   * this consumer's pending list. A read that spans a close is therefore not trusted (see `delivering`).
   */
  private resets = 0;
  private readonly countReset = (): void => void this.resets++;
  private readonly watchNode = (node: IORedis): void => void node.on('close', this.countReset);

  constructor(
    consumer: ConsumerContext,
    private readonly leases: Pick<PartitionOwnership, 'holds' | 'lose'>,
    private readonly handling: Pick<EntryHandling, 'handleAll' | 'lastHandledVersions'>,
  ) {
    ({ redis: this.redis, options: this.options, log: this.log } = consumer);
    if (this.redis instanceof Cluster) {
      for (const node of this.redis.nodes('all')) this.watchNode(node);
      this.redis.on('+node', this.watchNode);
    } else {
      this.redis.on('close', this.countReset);
    }
  }

  /** Where groups made from now on start, instead of `startId` (after the partitions changed). */
  startNewGroupsAt(id: string): void {
    this.startOverride = id;
  }

  /** Stops counting the resets of a connection this consumer was lent. */
  detach(): void {
    if (this.redis instanceof Cluster) {
      this.redis.off('+node', this.watchNode);
      for (const node of this.redis.nodes('all')) node.off('close', this.countReset);
    } else {
      this.redis.off('close', this.countReset);
    }
  }

  /**
   * Runs a command that delivers entries to this consumer (XREADGROUP `>`). If a connection closed while it ran,
   * ioredis may have run it twice: the first run's entries sit in the group's pending list and the reply carries the
   * second run's, which come after them. Rejects then with `ReadInterrupted`: the partition's worker takes over its
   * pending entries again, in stream order, before anything new.
   */
  private async delivering<T>(command: () => Promise<T>): Promise<T> {
    const resets = this.resets;
    const reply = await command();
    if (this.resets !== resets) throw new ReadInterrupted();
    return reply;
  }

  /**
   * Every entry pending in the group on the partition, whoever read it, in id order: claimed, then handled before
   * anything newer. An entry that was trimmed before anyone acknowledged it is a resync.
   */
  async takeOverPending(session: Session, o: Owned): Promise<void> {
    const { group, consumer } = this.options;
    const count = this.options.batchSize ?? 100;
    for (let from = '-'; this.leases.holds(session, o);) {
      const pending = (await this.redis.xpending(o.key, group, from, '+', count)) as Array<[string, string, number, number]>;
      if (pending.length === 0) return;
      const ids = pending.map(([id]) => id);
      const claimed = (await this.redis.eval(FENCED_CLAIM, 2, o.key, o.leaseKey, o.token, group, consumer, ...ids)) as
        Array<[string, string[]]> | number;
      if (typeof claimed === 'number') {
        this.leases.lose(o, 'its lease was taken');
        return;
      }
      if (claimed.length < ids.length) {
        const held = new Set(claimed.map(([id]) => id));
        const gone = ids.filter((id) => !held.has(id));
        throw this.resync(o.key, gone[0] ?? from, gone[gone.length - 1] ?? from);
      }
      if (claimed.length > 0) this.log.info({ partition: o.n, claimed: claimed.length }, 'took over entries pending on the partition');
      await this.handling.handleAll(
        session,
        o,
        claimed.map(([id, fields]) => parseEntry(id, fields)),
      );
      from = `(${ids[ids.length - 1] ?? '0-0'}`;
    }
  }

  /** Makes the group on the partition if it is missing; one that vanished after this consumer saw it is a resync. */
  async ensureGroup(key: string): Promise<void> {
    const { group } = this.options;
    const startId = this.startOverride ?? this.options.startId ?? '$';
    if (this.joined.has(key)) {
      // back after an error: a group that vanished meanwhile (Redis lost its data) is a lost position. Making it anew
      // at startId would skip, without a word, whatever the relay republished before it.
      const groups = await this.redis.xinfo('GROUPS', key).catch((err: unknown) => {
        if (err instanceof Error && /no such key/i.test(err.message)) return [];
        throw err;
      });
      if (!(groups as unknown[][]).map(pairs).some((g) => g.name === group)) throw this.resync(key, '0-0', '0-0');
      return;
    }
    try {
      // never before the key's layout boundary: what precedes it was written under an earlier number of partitions
      // (`fleet streams repartition`), and its deployments' later entries are on other partitions now. Where the
      // count of entries up to the start is known (from the beginning: 0), tell Redis, so it can count what the
      // group misses.
      const start = await readerStart(this.redis, key, startId);
      if (start.entriesRead !== null) await this.redis.xgroup('CREATE', key, group, start.id, 'MKSTREAM', 'ENTRIESREAD', start.entriesRead);
      else await this.redis.xgroup('CREATE', key, group, start.id, 'MKSTREAM');
      this.log.info({ startId: start.id, stream: key }, 'created consumer group');
    } catch (err) {
      if (!(err instanceof Error) || !err.message.includes('BUSYGROUP')) throw err;
    }
    this.joined.add(key);
  }

  /**
   * Has the partition trimmed entries this group never read? Redis 7 counts entries added to the stream and entries
   * read by the group; when the stream has dropped more entries than the group has read, the group missed some.
   * (A group created at a position in the middle of the stream has no count; then any trimmed entry after its
   * position counts as missed, which is conservative.)
   */
  async checkTrimmed(key: string): Promise<void> {
    const { group } = this.options;
    const stream = pairs((await this.redis.xinfo('STREAM', key)) as unknown[]);
    const removed = Number(stream['entries-added'] ?? 0) - Number(stream.length ?? 0);
    if (removed <= 0) return;
    const firstRetained = typeof stream['recorded-first-entry-id'] === 'string' ? stream['recorded-first-entry-id'] : null;
    const mine = ((await this.redis.xinfo('GROUPS', key)) as unknown[][]).map(pairs).find((g) => g.name === group);
    const lastDelivered = typeof mine?.['last-delivered-id'] === 'string' ? mine['last-delivered-id'] : '0-0';
    if (firstRetained === null || compareIds(lastDelivered, firstRetained) >= 0) return;
    const entriesRead = mine?.['entries-read'];
    const missed = typeof entriesRead === 'number' || typeof entriesRead === 'string' ? removed - Number(entriesRead) : removed;
    if (missed > 0) throw this.resync(key, lastDelivered, firstRetained);
  }

  /** The error that ends the run when a position is gone (logged), with the versions handled so far. */
  resync(key: string, from: string, firstRetained: string): ResyncRequiredError {
    const err = new ResyncRequiredError(key, from, firstRetained, this.handling.lastHandledVersions());
    this.log.error({ from, firstRetained }, err.message);
    return err;
  }

  /**
   * New entries of the partition for the group, read only under the lease and only if they follow on from what the
   * group has read (READ_IF_CONTIGUOUS): a position trimmed away while this consumer ran (a slow handler, a long
   * retry) rejects with `ResyncRequiredError` before anything past the hole is handled. Null when the lease is gone.
   */
  async readNew(session: Session, o: Owned): Promise<TransitionEntry[] | null> {
    const { group, consumer } = this.options;
    const reply = (await this.delivering(() =>
      this.redis.eval(READ_IF_CONTIGUOUS, 2, o.key, o.leaseKey, group, consumer, String(this.options.batchSize ?? 100), o.token),
    )) as [string, string?, (Array<[string, Array<[string, string[]]>]> | null | string)?];
    const [status, last = '0-0', read] = reply;
    if (status === 'LOST') {
      this.leases.lose(o, 'its lease was taken');
      return null;
    }
    if (status === 'MISSED') throw this.resync(o.key, last, typeof read === 'string' ? read : last);
    o.position = last;
    if (!this.leases.holds(session, o)) return null;
    const raw = Array.isArray(read) ? (read[0]?.[1] ?? []) : [];
    return raw.map(([id, fields]) => parseEntry(id, fields));
  }
}

/** A read that spanned a reset connection, which ioredis may have run twice: read the pending list again. */
export class ReadInterrupted extends Error {
  constructor() {
    super('the connection to Redis was reset during a read');
    this.name = 'ReadInterrupted';
  }
}

/** A stream's counters (`XINFO STREAM`): entries ever added to it, and entries it holds now. */
export async function streamCounts(redis: RedisConnection, streamKey: string): Promise<{ readonly added: number; readonly length: number }> {
  const info = pairs((await redis.xinfo('STREAM', streamKey)) as unknown[]);
  return { added: Number(info['entries-added'] ?? 0), length: Number(info.length ?? 0) };
}

/** A flat `XINFO` reply (`[name, value, name, value, ...]`) as an object. */
export function pairs(flat: unknown[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (let i = 0; i + 1 < flat.length; i += 2) out[String(flat[i])] = flat[i + 1];
  return out;
}
