/**
 * Reading the transition stream without a consumer group (`fleet tail` without `--group`, the HTTP watch's one reader
 * per process and its catch-ups): every partition read directly, from positions of its own. A follower never starts
 * before a key's layout boundary (what an earlier number of partitions wrote there), refuses a start whose entries
 * were trimmed (ResyncRequiredError), and when the number of partitions changes (`fleet streams repartition`) reads
 * the old partitions to their end, then the new ones. Its position is a cursor (`encodeCursor`): every partition's
 * last id, with the layout it belongs to.
 */
import { CursorError, LayoutMissedError, ResyncRequiredError } from '../errors';
import { isCluster, type RedisConnection } from '../redis/connection';
import { sleep } from '../util';
import { pairs } from './consumer-reader';
import { compareIds, idBefore, MAX_STREAM_PARTITIONS, partitionKeys, readerStart, readRecord } from './partitions';

/** Every partition's position: P, R (the stream's count of repartitions), and per partition in order the last id read. */
export interface StreamCursor {
  readonly p: number;
  /**
   * absent only in the cursors `fleet tail` printed before `r` existed, after any number of repartitions: read as the
   * current layout when P matches (an old cursor made before a repartition back to the same P, 2 -> 4 -> 2, is
   * then taken as the current layout's: the limit of old cursors), else as the first (R = 0)
   */
  readonly r?: number;
  readonly ids: readonly string[];
}

/** The partitions a follower reads: their number P, the count R of repartitions that made it, their keys in order. */
export interface StreamLayout {
  readonly partitions: number;
  readonly repartitions: number;
  readonly keys: readonly string[];
}

const ENTRY_ID = /^\d+(-\d+)?$/;

/**
 * The opaque form of a cursor: base64url of `{"p":P,"r":R,"ids":[...]}`. `r` is always written: without it a cursor
 * cannot tell its layout from a later one with the same P (2 -> 4 -> 2), and would skip what came between.
 */
export function encodeCursor(cursor: StreamCursor): string {
  return Buffer.from(JSON.stringify({ p: cursor.p, r: cursor.r ?? 0, ids: cursor.ids })).toString('base64url');
}

/** A plain stream id (`$`, `0`, `<ms>` or `<ms>-<seq>`), applied to every partition; anything else is a cursor. */
export function isStreamId(from: string): boolean {
  return /^(\$|0|\d+(-\d+)?)$/.test(from);
}

/** How a refused cursor is named in the message: the option or field it came in, and what it should have been. */
export interface CursorWords {
  readonly field: string;
  readonly expected: string;
  /** what to do instead of a cursor of a layout that cannot be followed */
  readonly restart: string;
}

const TAIL_WORDS: CursorWords = {
  field: '--from',
  expected: 'a stream id like 1763900000000-0, 0, $ or a cursor printed by fleet tail',
  restart: 'start from a stream id, 0 or $ instead',
};

/** Reads a cursor, or throws CursorError (`bad_cursor`) saying what is wrong with it. */
export function decodeCursor(text: string, words: CursorWords = TAIL_WORDS): StreamCursor {
  let parsed: unknown;
  try {
    parsed = /^[A-Za-z0-9_-]+$/.test(text) ? JSON.parse(Buffer.from(text, 'base64url').toString('utf8')) : undefined;
  } catch {
    parsed = undefined;
  }
  const { p, r, ids } = (typeof parsed === 'object' && parsed !== null ? parsed : {}) as { p?: unknown; r?: unknown; ids?: unknown };
  if (
    typeof p !== 'number' ||
    !Number.isInteger(p) ||
    p < 1 ||
    p > MAX_STREAM_PARTITIONS ||
    (r !== undefined && (typeof r !== 'number' || !Number.isSafeInteger(r) || r < 0)) ||
    !Array.isArray(ids) ||
    ids.length !== p ||
    !ids.every((id): id is string => typeof id === 'string' && ENTRY_ID.test(id))
  ) {
    throw new CursorError('bad_cursor', `${words.field}: must be ${words.expected}, got "${text.slice(0, 80)}"`);
  }
  return r === undefined ? { p, ids } : { p, r, ids };
}

/** One entry a follower read: its partition (index and key), its id and its fields as on the stream. */
export interface FollowedEntry {
  readonly partition: number;
  readonly key: string;
  readonly id: string;
  readonly fields: readonly string[];
}

/** What one read brought: entries in each partition's order, or (with none) the new layout it moved to. */
export interface FollowStep {
  readonly entries: readonly FollowedEntry[];
  /** set when the read moved to a new layout (a repartition): its positions are `positions()` now */
  readonly layout: StreamLayout | null;
}

export interface StreamFollowerOptions {
  /** the connection it reads on (not closed by the follower); a blocking read holds it */
  readonly redis: RedisConnection;
  /** the base key, `<prefix>:transitions` */
  readonly streamKey: string;
  /** entries per partition and read (default 100) */
  readonly count?: number;
  /** how long a blocking read waits for entries (default 1000 ms) */
  readonly blockMs?: number;
  /**
   * The partitions of a layout worth reading (default: every one): the others are neither read nor checked for
   * trimming, and keep their positions (a watch of some deployments needs only their partitions)
   */
  readonly only?: (partitions: number) => ReadonlySet<number>;
  /** who reads, in messages (default `this reader`) */
  readonly reader?: string;
  /** how a refused cursor is named in messages (default: `fleet tail`'s `--from`) */
  readonly words?: CursorWords;
}

/**
 * Whether a read checks, after it read, that no partition lost to trimming what came after its position
 * (ResyncRequiredError rather than a silent gap):
 * - `true`: after every read (one XINFO STREAM per partition read, sent together): a catch-up, which may be far behind;
 * - `'when-behind'`: only after a read in which some partition came back full (`count` entries): the reader is
 *   behind. A partition trimmed past a position holds only entries after it, at least MAXLEN of them (`MAXLEN ~`
 *   trims no further; FLEET_STREAM_MAXLEN is 1000 or more, a read 100): its read comes back full. A reader at the
 *   head (the live feed, almost always) pays nothing;
 * - `false` (default): never.
 */
export type Verify = boolean | 'when-behind';

/** What one XREAD read: per stream key, its entries (null: nothing). */
type XReadReply = Array<[string, Array<[string, string[]]>]> | null;

export class StreamFollower {
  private current: StreamLayout = { partitions: 1, repartitions: 0, keys: [] };
  /** per key, the id after which it reads: each partition is in order, so each deployment is */
  private readonly last = new Map<string, string>();
  private reading: readonly string[] = [];

  constructor(private readonly options: StreamFollowerOptions) {}

  get layout(): StreamLayout {
    return this.current;
  }

  /** Every partition's position, in partition order. */
  positions(): string[] {
    return this.current.keys.map((key) => this.last.get(key) ?? '0-0');
  }

  /** Every partition's position, as `fleet tail --from` and `GET /api/watch?after=` take it. */
  cursor(): string {
    return encodeCursor({ p: this.current.partitions, r: this.current.repartitions, ids: this.positions() });
  }

  /**
   * Reads the record and gives every partition its position: `$` (now, the default), `0` (everything each partition
   * retains, trimmed or not), a stream id (every partition from there; refused when trimming took what came after
   * it), never before a partition's layout boundary; or a cursor (every partition's own, of the current
   * layout or of the one before it, whose partitions are then read to their end first). Throws CursorError for a
   * cursor it cannot use, ResyncRequiredError when a partition no longer holds what comes after its position.
   */
  async start(from: string = '$'): Promise<void> {
    const { redis, streamKey } = this.options;
    const words = this.options.words ?? TAIL_WORDS;
    const recorded = await readRecord(redis, streamKey);
    const cursor = isStreamId(from) ? null : decodeCursor(from, words);
    let layout: StreamLayout = { ...recorded, keys: partitionKeys(streamKey, recorded.partitions) };
    // without `r` (a cursor fleet tail printed before `r` existed): the current layout if P matches, else the first
    const r = cursor === null ? recorded.repartitions : (cursor.r ?? (cursor.p === recorded.partitions ? recorded.repartitions : 0));
    if (cursor !== null && (cursor.p !== recorded.partitions || r !== recorded.repartitions)) {
      // the layout before the current one can be followed: its partitions are read to their end, then the current ones
      if (r !== recorded.repartitions - 1) throw this.unfollowable(cursor, recorded, words);
      layout = { partitions: cursor.p, repartitions: r, keys: partitionKeys(streamKey, cursor.p) };
    }
    const positions = new Map<string, string>();
    const read = this.readable(layout);
    for (const [n, key] of layout.keys.entries()) {
      let position = cursor?.ids[n] ?? from;
      if (position === '$') {
        // pin "now" to an id before the first read: reading from `$` again after a read that found nothing would
        // skip whatever was added between the two reads
        position = (await redis.xrevrange(key, '+', '-', 'COUNT', 1))[0]?.[0] ?? '0-0';
      } else {
        // a cursor of the layout before keeps its positions: the boundaries written since are the new layout's
        if (layout.repartitions === recorded.repartitions) position = (await readerStart(redis, key, position)).id;
        if (cursor === null && (from === '0' || from === '0-0')) {
          // everything the key retains: from just before its first entry, never from a start trimming took away (a
          // cursor's 0-0 is no such start: its partition, empty when the cursor was made, may have lost entries since)
          const floor = (await trimmedOf(redis, key))?.floor;
          if (floor !== undefined && compareIds(position, floor) < 0) position = floor;
        } else if (read.has(key)) {
          await refuseTrimmed(redis, key, position);
        }
      }
      positions.set(key, position);
    }
    this.current = layout;
    this.reading = [...read];
    this.last.clear();
    for (const [key, id] of positions) this.last.set(key, id);
  }

  /**
   * One read: the entries after every partition's position (a blocking read waits up to `blockMs` for some), moving
   * the positions past them. When the record says the stream was repartitioned, reads the old partitions to their
   * end, then moves to the new ones (a step with no entries and the new layout). Throws LayoutMissedError when the
   * stream was repartitioned twice or more since the last look.
   */
  async read(how: { block: boolean; verify?: Verify }): Promise<FollowStep> {
    const { redis, streamKey } = this.options;
    const now = await readRecord(redis, streamKey);
    const { partitions, repartitions } = this.current;
    if (now.repartitions > repartitions + 1) {
      throw new LayoutMissedError(streamKey, now.repartitions - repartitions, this.options.reader ?? 'this reader');
    }
    if (now.repartitions !== repartitions || now.partitions !== partitions) {
      // nothing more comes to the old partitions (the record changes only once the relays are fenced off them),
      // and nothing to the new ones before the record changed
      const rest = await this.readOnce(false, how.verify ?? false);
      if (rest.length > 0) return { entries: rest, layout: null };
      await this.moveTo(now);
      return { entries: [], layout: this.current };
    }
    const entries = await this.readOnce(how.block && !this.spread(), how.verify ?? false);
    if (entries.length === 0 && how.block && this.spread()) await sleep(200);
    return { entries, layout: null };
  }

  private unfollowable(cursor: StreamCursor, recorded: { partitions: number; repartitions: number }, words: CursorWords): CursorError {
    const { streamKey } = this.options;
    if (cursor.r === undefined) {
      return new CursorError(
        'repartitioned',
        `${words.field}: the cursor is for ${cursor.p} partition(s), but the stream ${streamKey} has ${recorded.partitions}: ${words.restart}`,
      );
    }
    return new CursorError(
      'repartitioned',
      `${words.field}: the cursor is for ${cursor.p} partition(s) after ${cursor.r} repartition(s), but the stream ${streamKey} has ${recorded.partitions} after ${recorded.repartitions}: its entries in between cannot be read in each deployment's order; ${words.restart}`,
    );
  }

  /** The keys of a layout worth reading (`only`), as a set. */
  private readable(layout: StreamLayout): Set<string> {
    const only = this.options.only?.(layout.partitions);
    return new Set(only === undefined ? layout.keys : layout.keys.filter((_, n) => only.has(n)));
  }

  /** The new layout's partitions, each from where it was, never before its layout boundary. */
  private async moveTo(now: { partitions: number; repartitions: number }): Promise<void> {
    const keys = partitionKeys(this.options.streamKey, now.partitions);
    const starts = await Promise.all(keys.map((key) => readerStart(this.options.redis, key, this.last.get(key) ?? '0')));
    const layout = { ...now, keys };
    for (const [n, key] of keys.entries()) this.last.set(key, starts[n]?.id ?? '0');
    this.current = layout;
    this.reading = [...this.readable(layout)];
  }

  /**
   * On a Redis Cluster with several partitions their keys are in different slots, which one XREAD cannot span: each
   * is read in turn without blocking, pausing 200 ms when none had any.
   */
  private spread(): boolean {
    return isCluster(this.options.redis) && this.reading.length > 1;
  }

  /** One read over the partitions it reads; moves their positions past what it brought. */
  private async readOnce(block: boolean, verify: Verify): Promise<FollowedEntry[]> {
    const { redis } = this.options;
    const keys = this.reading;
    if (keys.length === 0) return [];
    const limit = this.options.count ?? 100;
    const count = String(limit);
    const before = keys.map((key) => this.last.get(key) ?? '0-0');
    const replies: XReadReply[] = this.spread()
      ? await Promise.all(keys.map((key, n) => redis.call('XREAD', 'COUNT', count, 'STREAMS', key, before[n] ?? '0-0') as Promise<XReadReply>))
      : [
          (await redis.call(
            'XREAD',
            'COUNT',
            count,
            ...(block ? ['BLOCK', String(this.options.blockMs ?? 1000)] : []),
            'STREAMS',
            ...keys,
            ...before,
          )) as XReadReply,
        ];
    const behind = (): boolean => replies.some((reply) => reply?.some(([, read]) => read.length >= limit) ?? false);
    if (verify === true || (verify === 'when-behind' && behind())) {
      await Promise.all(keys.map((key, n) => refuseTrimmed(redis, key, before[n] ?? '0-0')));
    }
    const partitionOfKey = new Map(this.current.keys.map((key, n) => [key, n]));
    const entries: FollowedEntry[] = [];
    for (const reply of replies) {
      for (const [key, read] of reply ?? []) {
        const partition = partitionOfKey.get(key) ?? 0;
        for (const [id, fields] of read) entries.push({ partition, key, id, fields });
        const lastId = read[read.length - 1]?.[0];
        if (lastId !== undefined) this.last.set(key, lastId);
      }
    }
    return entries;
  }
}

/**
 * What a key lost to trimming, or null when it lost nothing (entries-added is its length) or does not exist:
 * `first`, its first entry still there (all gone: its last id), and `floor`, the id just before it (all gone: its
 * last id), the earliest position from which a reader misses nothing it retains.
 */
async function trimmedOf(redis: RedisConnection, streamKey: string): Promise<{ first: string; floor: string } | null> {
  const info = await (redis.xinfo('STREAM', streamKey) as Promise<unknown[]>).then(pairs, () => null);
  if (info === null) return null; // no such key: nothing was there to lose
  const added = Number(info['entries-added'] ?? 0);
  const length = Number(info.length ?? 0);
  if (added <= length) return null;
  const first = (length > 0 ? info['recorded-first-entry-id'] : info['last-generated-id']) as string | undefined;
  if (first === undefined) return null;
  return { first, floor: length > 0 ? idBefore(first) : first };
}

/**
 * ResyncRequiredError when the key lost, to trimming, entries after `from`: it dropped entries (added > length) and
 * `from` lies before the id just before its first entry (or, all gone, before its last id). Nothing can lie between
 * that id and the first entry, so a reader there misses nothing; one further back may have lost entries (a position
 * whose own entry was the last one trimmed counts too, unless it is that id: the reader is told to resync rather
 * than risk a gap).
 */
export async function refuseTrimmed(redis: RedisConnection, streamKey: string, from: string): Promise<void> {
  const trimmed = await trimmedOf(redis, streamKey);
  if (trimmed !== null && compareIds(from, trimmed.floor) < 0) throw new ResyncRequiredError(streamKey, from, trimmed.first);
}
