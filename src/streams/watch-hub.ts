/**
 * The HTTP watch's one reader per process (docs/architecture.md, "Watch over HTTP"): a `WatchHub` reads the
 * transition stream once, per partition, from the live position (a StreamFollower started at `$` when the first
 * watcher comes), and hands each entry to every watcher. A watcher with a cursor behind the live position catches
 * up first: from Redis (its own follower, on the hub's second connection, without blocking) until its position is
 * inside the ring of recent entries the hub keeps, then from the ring, then it joins the live feed; each switch
 * happens in the tick that checked it, so nothing is missed or repeated. Each deployment lives in one partition and
 * each partition is read in order, so each deployment's entries arrive in version order.
 */
import { CursorError, LayoutMissedError, ResyncRequiredError } from '../errors';
import type { Logger } from '../log';
import type { RedisConnection } from '../redis/connection';
import { partitionOf } from '../util/partition-of';
import { compareIds, partitionKeys, readRecord } from './partitions';
import { encodeCursor, StreamFollower, type CursorWords, type FollowStep, type StreamLayout } from './stream-follower';
import { watchEntry, WatchRing, type WatchEntry } from './watch-ring';

export type { WatchEntry } from './watch-ring';

export interface WatchFilter {
  /** only these deployments (lower-case UUIDs); absent: every one */
  readonly deploymentIds?: ReadonlySet<string>;
  /** only entries whose `to` is one of these; absent: every state */
  readonly states?: ReadonlySet<string>;
}

/** Why a watch ended (other than its subscriber closing it). */
export type WatchEnd =
  /** the watch cannot go on from its position: backfill from the transitions API, then watch without a cursor */
  | {
      readonly reason: 'resync';
      readonly resync: 'trimmed' | 'repartitioned' | 'bad_cursor';
      readonly message: string;
      /** per partition key of the stream now, its first entry still there */
      readonly positions: Readonly<Record<string, string>>;
    }
  /** the hub closed: the process stops */
  | { readonly reason: 'closing' }
  /** the hub's reader failed: watch again from the last cursor */
  | { readonly reason: 'interrupted'; readonly message: string };

export interface WatchSubscriber {
  /** a cursor (or a plain stream id, as `fleet tail --from` takes it); absent or `$`: from now */
  readonly after?: string;
  /** where `after` came from, in messages about it (default `after`) */
  readonly afterName?: string;
  readonly filter?: WatchFilter;
  /** an entry that passed the filter, and the cursor after it; false: hold a catch-up until `drained()` */
  onEntry(entry: WatchEntry, cursor: string): boolean;
  /** a watch from now (without `after`, or `$`) is live from here (its start position) */
  onPositioned?(cursor: string): void;
  onEnd(end: WatchEnd): void;
  /** resolves when the subscriber takes entries again (default: at once) */
  drained?(): Promise<void>;
}

export interface WatchSubscription {
  /** the watch's position now (null before it has one) */
  cursor(): string | null;
  /** ends the watch (the subscriber left); safe to call twice */
  close(): void;
}

export interface WatchHubOptions {
  /** the base key, `<prefix>:transitions` */
  readonly streamKey: string;
  /** a new connection to the fleet's Redis with this name: the hub makes two, the live reader's (it blocks) and the catch-ups' */
  readonly connect: (name: string) => RedisConnection;
  readonly logger?: Logger;
  /** recent entries kept for watchers joining the live feed (default 4096) */
  readonly ringSize?: number;
  /** entries per partition and read (default 100) */
  readonly count?: number;
  /** how long the live read blocks (default 1000 ms) */
  readonly blockMs?: number;
}

/** One watcher: its subscriber, and where it is. */
interface Watcher {
  readonly spec: WatchSubscriber;
  readonly match: (entry: WatchEntry) => boolean;
  /** the partitions of a layout that hold its deployments (undefined: it watches all) */
  readonly reads: ((partitions: number) => ReadonlySet<number>) | undefined;
  layout: StreamLayout | null;
  /** its positions while they differ from the feed's; null: the feed's (it has had every entry the feed read) */
  own: string[] | null;
  done: boolean;
}

/** What a watch's `after` (and `Last-Event-ID`) takes, in messages: the route's 400 and a watch's resync say the same. */
export const WATCH_CURSOR_EXPECTED = 'a cursor (the id of an event of this watch) or a stream id like 1763900000000-0 or 0';

const WORDS = (field: string): CursorWords => ({ field, expected: WATCH_CURSOR_EXPECTED, restart: 'backfill, then watch again without a cursor' });

export class WatchHub {
  private feed: Feed | null = null;
  private closed = false;

  constructor(private readonly options: WatchHubOptions) {}

  /** Watchers open now: all, those on the live feed (the others are catching up or starting), and catch-ups waiting for their client. */
  get watchers(): { open: number; live: number; waiting: number } {
    return { open: this.feed?.watchers.size ?? 0, live: this.feed?.joinedCount ?? 0, waiting: this.feed?.waiting ?? 0 };
  }

  /** Starts the hub's reader with the first watcher; a watcher after the close ends at once (`closing`). */
  subscribe(spec: WatchSubscriber): WatchSubscription {
    const ids = spec.filter?.deploymentIds;
    const states = spec.filter?.states;
    const memo = new Map<number, ReadonlySet<number>>();
    const watcher: Watcher = {
      spec,
      match: (e) => (ids === undefined || ids.has(e.deploymentId)) && (states === undefined || states.has(e.to)),
      reads: ids === undefined ? undefined : (p) => memo.get(p) ?? memo.set(p, new Set([...ids].map((id) => partitionOf(id, p)))).get(p) ?? new Set(),
      layout: null,
      own: null,
      done: false,
    };
    if (this.closed) {
      watcher.done = true;
      queueMicrotask(() => spec.onEnd({ reason: 'closing' }));
      return { cursor: () => null, close: () => undefined };
    }
    const feed = (this.feed ??= new Feed(this.options, (failed) => {
      if (this.feed === failed) this.feed = null;
    }));
    feed.add(watcher);
    return { cursor: () => feed.cursorOf(watcher), close: () => feed.remove(watcher) };
  }

  /** Ends every watch (`closing`) and closes the reader's connections; safe to call twice. */
  async close(): Promise<void> {
    this.closed = true;
    const feed = this.feed;
    this.feed = null;
    await feed?.close();
  }
}

/** The running reader: its connections, its follower, the ring and the watchers. A failed feed is replaced by the next watcher. */
class Feed {
  readonly watchers = new Set<Watcher>();
  private readonly joined = new Set<Watcher>();
  private readonly live: RedisConnection;
  private readonly catchUps: RedisConnection;
  private readonly follower: StreamFollower;
  private readonly ready: Promise<void>;
  private running: Promise<void> = Promise.resolve();
  private layout: StreamLayout = { partitions: 1, repartitions: 0, keys: [] };
  private positions: string[] = [];
  private ring: WatchRing | null = null;
  private cached: string | null = null;
  private ticks: Array<() => void> = [];
  private stopped = false;
  /** catch-ups waiting for their client to take what they sent */
  waiting = 0;

  constructor(
    private readonly options: WatchHubOptions,
    private readonly onFailed: (feed: Feed) => void,
  ) {
    this.live = options.connect('lifecycle-fleet-watch');
    this.catchUps = options.connect('lifecycle-fleet-watch-catch-up');
    this.follower = new StreamFollower({ redis: this.live, streamKey: options.streamKey, count: options.count, blockMs: options.blockMs });
    this.ready = this.follower.start('$').then(() => {
      this.layout = this.follower.layout;
      this.positions = this.follower.positions();
      this.ring = new WatchRing(options.ringSize ?? 4096, { layout: this.layout, positions: this.positions });
      options.logger?.info({ partitions: this.layout.partitions }, 'watch: reading the transition stream for the watchers of this process');
      this.running = this.run();
    });
    this.ready.catch((err: unknown) => this.fail(err));
  }

  get joinedCount(): number {
    return this.joined.size;
  }

  add(watcher: Watcher): void {
    this.watchers.add(watcher);
    const { after } = watcher.spec;
    // `$` is now, as without `after`: the watch gets its start position (onPositioned) to resume from
    this.ready
      .then(() => (after === undefined || after === '$' ? this.joinNow(watcher) : this.catchUp(watcher, after)))
      .catch((err: unknown) => this.end(watcher, err));
  }

  remove(watcher: Watcher): void {
    watcher.done = true;
    this.watchers.delete(watcher);
    this.joined.delete(watcher);
  }

  cursorOf(watcher: Watcher): string | null {
    const { layout, own } = watcher;
    if (layout === null || watcher.done) return null;
    return own === null ? this.cursor() : encodeCursor({ p: layout.partitions, r: layout.repartitions, ids: own });
  }

  async close(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    for (const watcher of [...this.watchers]) this.finish(watcher, { reason: 'closing' });
    this.wake();
    this.live.disconnect();
    this.catchUps.disconnect();
    await this.running;
  }

  /** The feed's position: every partition's last id read. */
  private cursor(): string {
    return (this.cached ??= encodeCursor({ p: this.layout.partitions, r: this.layout.repartitions, ids: this.positions }));
  }

  /** The live read: one follower, blocking, handing every entry to the joined watchers. */
  private async run(): Promise<void> {
    try {
      while (!this.stopped) {
        // checked for trimming only when it is behind (a read came back full): at the head it costs nothing
        const step = await this.follower.read({ block: true, verify: 'when-behind' });
        if (this.stopped) return;
        this.take(step);
      }
    } catch (err) {
      if (!this.stopped) this.fail(err);
    }
  }

  private take(step: FollowStep): void {
    const ring = this.ring;
    if (ring === null) return;
    for (const e of step.entries) {
      this.positions[e.partition] = e.id;
      this.cached = null;
      const entry = watchEntry(e);
      ring.push({ kind: 'entry', partition: e.partition, id: e.id, entry });
      for (const watcher of this.joined) {
        this.offer(watcher, e.partition, e.id, entry);
        if (watcher.own !== null && watcher.own.every((id, n) => id === this.positions[n])) watcher.own = null;
      }
    }
    if (step.layout !== null) {
      // every watcher had the old partitions to their end: all are where the feed is
      this.layout = step.layout;
      this.positions = this.follower.positions();
      this.cached = null;
      ring.push({ kind: 'layout', layout: this.layout, positions: [...this.positions] });
      for (const watcher of this.joined) Object.assign(watcher, { layout: this.layout, own: null });
      this.options.logger?.info({ partitions: this.layout.partitions }, 'watch: the stream was repartitioned; reading its new partitions');
    }
    this.wake();
  }

  /**
   * Hands one entry to a watcher if it is new to it and passes its filter; moves its position. False: it wants no
   * more for now (a catch-up waits for `drained`).
   */
  private offer(watcher: Watcher, partition: number, id: string, entry: WatchEntry): boolean {
    if (watcher.done) return true;
    const own = watcher.own;
    if (own !== null) {
      if (compareIds(id, own[partition] ?? '0-0') <= 0) return true; // a catch-up read ahead of the feed had it
      own[partition] = id;
    }
    if (!watcher.match(entry)) return true;
    const layout = watcher.layout ?? this.layout;
    return watcher.spec.onEntry(entry, own === null ? this.cursor() : encodeCursor({ p: layout.partitions, r: layout.repartitions, ids: own }));
  }

  private joinNow(watcher: Watcher): void {
    if (watcher.done || this.stopped) return;
    watcher.layout = this.layout;
    watcher.own = null;
    this.joined.add(watcher);
    watcher.spec.onPositioned?.(this.cursor());
  }

  /** From `after`: Redis until the ring reaches back to the watcher, then the ring, then the live feed. */
  private async catchUp(watcher: Watcher, after: string): Promise<void> {
    let follower = this.catchUpFollower(watcher);
    await follower.start(after);
    Object.assign(watcher, { layout: follower.layout, own: follower.positions() });
    while (!watcher.done && !this.stopped) {
      const layout = watcher.layout ?? this.layout;
      const point = this.ring?.entryPoint({ layout, positions: watcher.own ?? this.positions }, watcher.reads?.(layout.partitions)) ?? null;
      if (point !== null) {
        watcher.own = point.positions;
        if (await this.replay(watcher, point.seq)) return;
        // the ring moved past it while it waited: from Redis again, from where it is
        follower = this.catchUpFollower(watcher);
        await follower.start(this.cursorOf(watcher) ?? after);
        // never before a layout boundary: the follower's positions are the watcher's, or past them
        Object.assign(watcher, { layout: follower.layout, own: follower.positions() });
        continue;
      }
      const step = await follower.read({ block: false, verify: true });
      for (const e of step.entries) {
        if (!this.offer(watcher, e.partition, e.id, watchEntry(e))) await this.drained(watcher);
      }
      if (step.layout !== null) Object.assign(watcher, { layout: step.layout, own: follower.positions() });
      if (step.entries.length === 0 && step.layout === null) await this.tick(1000);
    }
  }

  /** From the ring at `seq` to its end, then live; false when the ring dropped what it needed while it waited. */
  private async replay(watcher: Watcher, seq: number): Promise<boolean> {
    const ring = this.ring;
    for (let s = seq; ring !== null;) {
      if (watcher.done || this.stopped) return true;
      if (s < ring.first) return false;
      if (s === ring.next) {
        // the ring's end is the feed's position: live from here, in this tick
        if (watcher.own !== null && watcher.own.every((id, n) => id === this.positions[n])) watcher.own = null;
        this.joined.add(watcher);
        return true;
      }
      const item = ring.at(s++);
      if (item.kind === 'layout') Object.assign(watcher, { layout: item.layout, own: [...item.positions] });
      else if (!this.offer(watcher, item.partition, item.id, item.entry)) await this.drained(watcher);
    }
    return true;
  }

  private catchUpFollower(watcher: Watcher): StreamFollower {
    const { streamKey, count } = this.options;
    return new StreamFollower({
      redis: this.catchUps,
      streamKey,
      count: count ?? 100,
      reader: 'this watch',
      words: WORDS(watcher.spec.afterName ?? 'after'),
      ...(watcher.reads === undefined ? {} : { only: watcher.reads }),
    });
  }

  private async drained(watcher: Watcher): Promise<void> {
    this.waiting++;
    try {
      await watcher.spec.drained?.();
    } finally {
      this.waiting--;
    }
  }

  /** Resolves at the feed's next read, or after `ms`. */
  private tick(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.ticks.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  private wake(): void {
    const ticks = this.ticks;
    this.ticks = [];
    for (const wake of ticks) wake();
  }

  /**
   * The reader failed: every watcher ends (a resync when it missed a layout or fell behind what the stream keeps,
   * else interrupted), and the hub lets go of it.
   */
  private fail(err: unknown): void {
    if (this.stopped) return;
    this.options.logger?.warn({ err: err instanceof Error ? err.message : String(err) }, 'watch: the reader stopped; its watchers end');
    this.onFailed(this);
    const watchers = [...this.watchers];
    void Promise.all(watchers.map((watcher) => this.end(watcher, this.failureOf(watcher, err), 'this watch fell behind'))).finally(() => {
      this.stopped = true;
      this.wake();
      this.live.disconnect();
      this.catchUps.disconnect();
    });
  }

  /**
   * What the reader's failure is to one watcher. The reader fell behind what the stream keeps (ResyncRequiredError:
   * a read found trimmed what came after its position): a resync for a watcher whose own position in that partition
   * is gone too (every watcher where the feed is); one whose position is still there (not yet positioned, or ahead
   * of the feed) resumes from its cursor (interrupted).
   */
  private failureOf(watcher: Watcher, err: unknown): unknown {
    if (!(err instanceof ResyncRequiredError)) return err;
    const n = watcher.layout?.keys.indexOf(err.streamKey) ?? -1;
    const position = n < 0 ? undefined : (watcher.own ?? this.positions)[n];
    if (position !== undefined && compareIds(position, err.firstRetained) < 0) return err;
    return new Error(
      `the watch's reader fell behind what ${err.streamKey} keeps and stopped; this watch's position is still there: resume from its cursor`,
    );
  }

  /** Ends a watcher for an error: a resync for a position it cannot go on from (`field` names it), else interrupted. */
  private async end(watcher: Watcher, err: unknown, field = watcher.spec.afterName ?? 'after'): Promise<void> {
    if (watcher.done) return;
    if (this.stopped) return this.finish(watcher, { reason: 'closing' });
    const resync = resyncOf(err, field);
    if (resync === null) {
      this.options.logger?.warn({ err: err instanceof Error ? err.message : String(err) }, 'watch: a watcher ended on an error');
      return this.finish(watcher, { reason: 'interrupted', message: err instanceof Error ? err.message : String(err) });
    }
    this.remove(watcher); // nothing more for it while the positions are read
    const positions = await firstPositions(this.catchUps, this.options.streamKey).catch(() => ({}));
    watcher.spec.onEnd({ reason: 'resync', ...resync, positions });
  }

  private finish(watcher: Watcher, end: WatchEnd): void {
    if (watcher.done) return;
    this.remove(watcher);
    watcher.spec.onEnd(end);
  }
}

/** The resync an error means, or null for one that is not about the watcher's position. */
function resyncOf(err: unknown, field: string): { resync: 'trimmed' | 'repartitioned' | 'bad_cursor'; message: string } | null {
  if (err instanceof ResyncRequiredError) {
    return {
      resync: 'trimmed',
      message: `${field}: ${err.streamKey} no longer holds what came after this position (it now starts at ${err.firstRetained}): read what you missed from the transitions API, then watch again without a cursor`,
    };
  }
  if (err instanceof CursorError) return { resync: err.reason, message: err.message };
  if (err instanceof LayoutMissedError) return { resync: 'repartitioned', message: err.message };
  return null;
}

/** Per partition key of the stream's current layout, its first entry (keys without entries are left out). */
async function firstPositions(redis: RedisConnection, streamKey: string): Promise<Record<string, string>> {
  const { partitions } = await readRecord(redis, streamKey);
  const keys = partitionKeys(streamKey, partitions);
  const firsts = await Promise.all(keys.map((key) => redis.xrange(key, '-', '+', 'COUNT', 1)));
  const out: Record<string, string> = {};
  for (const [n, key] of keys.entries()) {
    const id = firsts[n]?.[0]?.[0];
    if (id !== undefined) out[key] = id;
  }
  return out;
}
