/**
 * `fleet tail`: prints transitions as they happen, from every partition of the stream (each deployment's in order).
 * Without a group it reads the stream directly from `--from` (default `$`, only new entries; an id applies to every
 * partition, or a cursor that a tail printed when it stopped: every partition's position); with `--group/--consumer`
 * it reads through a consumer group, so a restarted tail continues where it stopped. A reader never starts before a
 * key's layout boundary (what an earlier number of partitions wrote there), and when the number of partitions changes
 * (`fleet streams repartition`) it reads the old partitions to their end, then the new ones.
 */
import type { RedisConnection } from '../redis/connection';
import { ResyncRequiredError } from '../errors';
import { printable, sleep } from '../util';
import { createRedis, describeRedis, describeServer, isCluster, ServerWatch, type ServerReport } from '../redis/connection';
import { compareIds, parseEntry, streamCounts, TransitionConsumer, type TransitionEntry } from '../streams/consumer';
import { MAX_STREAM_PARTITIONS, partitionKeys, readerStart, readRecord } from '../streams/partitions';

export interface TailOptions {
  readonly redisUrl: string;
  readonly streamKey: string;
  readonly group?: string;
  readonly consumer?: string;
  readonly from?: string;
  readonly json?: boolean;
  readonly write: (line: string) => void;
  /** resolves when the tail should stop (a signal, a closed stdout): it returns within about a second, Redis there or not */
  readonly stop: Promise<void>;
  /** where "lost Redis at ..., retrying" and "... is back" go (default: nowhere) */
  readonly report?: ServerReport;
  /** without a group: given, when the tail stops, the cursor of every partition's position (for `from`) */
  readonly onCursor?: (cursor: string) => void;
}

/** A `--from` that cannot be used: a malformed cursor, or one for another number of partitions. */
export class TailCursorError extends Error {}

/** Every partition's position: P and, per partition in order, the id of the last entry read. */
export interface TailCursor {
  readonly p: number;
  readonly ids: readonly string[];
}

const ENTRY_ID = /^\d+(-\d+)?$/;

/** The opaque form of a cursor: base64url of `{"p":P,"ids":[...]}`. */
export function encodeCursor(cursor: TailCursor): string {
  return Buffer.from(JSON.stringify({ p: cursor.p, ids: cursor.ids })).toString('base64url');
}

/** A plain stream id (`$`, `0`, `<ms>` or `<ms>-<seq>`), applied to every partition; anything else is a cursor. */
export function isStreamId(from: string): boolean {
  return /^(\$|0|\d+(-\d+)?)$/.test(from);
}

/** Reads a cursor, or throws TailCursorError saying what is wrong with it. */
export function decodeCursor(text: string): TailCursor {
  let parsed: unknown;
  try {
    parsed = /^[A-Za-z0-9_-]+$/.test(text) ? JSON.parse(Buffer.from(text, 'base64url').toString('utf8')) : undefined;
  } catch {
    parsed = undefined;
  }
  const { p, ids } = (typeof parsed === 'object' && parsed !== null ? parsed : {}) as { p?: unknown; ids?: unknown };
  if (
    typeof p !== 'number' ||
    !Number.isInteger(p) ||
    p < 1 ||
    p > MAX_STREAM_PARTITIONS ||
    !Array.isArray(ids) ||
    ids.length !== p ||
    !ids.every((id): id is string => typeof id === 'string' && ENTRY_ID.test(id))
  ) {
    throw new TailCursorError(`--from: must be a stream id like 1763900000000-0, 0, $ or a cursor printed by fleet tail, got "${text.slice(0, 80)}"`);
  }
  return { p, ids };
}

/** One entry as a line for a terminal: what producers sent (a reason, an id) with its control characters escaped. */
export function formatEntry(entry: TransitionEntry, json: boolean): string {
  if (json) return printable(JSON.stringify(entry));
  const from = entry.from === '' ? '(new)' : entry.from;
  const attempt = entry.attemptId === '' ? '' : `  attempt ${entry.attemptId}`;
  return printable(`${entry.at}  ${entry.deploymentId}  v${entry.version}  ${from} -> ${entry.to}  ${entry.reason}${attempt}  [${entry.eventId}]`);
}

/** How long a stopping tail waits for the read in flight (a read blocks for 1 s) before it drops its connection. */
const STOP_GRACE_MS = 1000;

/** What an XREAD read: per stream key, its entries. */
type Read = Array<[string, Array<[string, string[]]>]>;
/** An XREAD's reply (null: nothing) */
type XReadReply = Read | null;

/** What a command cut short by the stop resolves to. */
const STOPPED = Symbol('stopped');

export async function tail(options: TailOptions): Promise<void> {
  const print = (entry: TransitionEntry) => options.write(formatEntry(entry, options.json === true));
  if (options.group !== undefined) return tailGroup(options, options.group, print);
  await new StreamTail(options, print).run();
}

/** A tail through a consumer group: it continues where the group's last tail of this consumer stopped. */
async function tailGroup(options: TailOptions, group: string, print: (entry: TransitionEntry) => void): Promise<void> {
  const consumer = new TransitionConsumer({
    redis: options.redisUrl,
    streamKey: options.streamKey,
    group,
    consumer: options.consumer ?? `tail-${process.pid}`,
    startId: options.from ?? '$',
    blockMs: 1000,
    handler: print,
    ...(options.report !== undefined ? { redisWatch: new ServerWatch(describeServer('Redis', options.redisUrl), options.report) } : {}),
  });
  // the run rejects only before the stop (a resync, a bug); once closed, it ends without an error
  await Promise.race([consumer.run(), options.stop]);
  // A frozen Redis never answers the read in flight: the close stops waiting for it after the grace and drops the
  // connection (ioredis lets go of the read when it destroys the socket, 2 s later; the tail does not wait for
  // that). An entry printed but not acknowledged is read again by the next tail of this consumer.
  await consumer.close(STOP_GRACE_MS);
}

/** A tail without a group: reads every partition directly, from positions of its own, until the stop. */
class StreamTail {
  private readonly redis: RedisConnection;
  private stopped = false;
  private readonly stopping: Promise<typeof STOPPED>;
  private partitions = 1;
  private repartitions = 0;
  private keys: string[] = [];
  /** per partition, the id after which it reads: each partition is in order, so each deployment is */
  private readonly last = new Map<string, string>();
  /** every partition has a position: the tail has a cursor of where it is */
  private positioned = false;

  constructor(
    private readonly options: TailOptions,
    private readonly print: (entry: TransitionEntry) => void,
  ) {
    this.redis = createRedis(options.redisUrl, 'worker', 'lifecycle-fleet-tail');
    if (options.report !== undefined) new ServerWatch(describeRedis(this.redis), options.report).attach(this.redis);
    this.stopping = options.stop.then(() => {
      this.stopped = true;
      return STOPPED;
    });
  }

  async run(): Promise<void> {
    const { options, redis } = this;
    try {
      if ((await this.start()) === STOPPED) return;
      this.positioned = true;
      while (!this.stopped) {
        const now = await this.untilStopped(readRecord(redis, options.streamKey));
        if (now === STOPPED) return;
        if (now.repartitions > this.repartitions + 1) {
          throw new Error(
            `the stream ${options.streamKey} was repartitioned ${now.repartitions - this.repartitions} times since this tail last looked: the entries of the layouts in between cannot be printed in each deployment's order; start it again`,
          );
        }
        if (now.repartitions !== this.repartitions || now.partitions !== this.partitions) {
          if ((await this.followRepartition(now)) === STOPPED) return;
          continue;
        }
        const reply = await this.untilStopped(this.read(this.keys, !this.spread()));
        if (reply === STOPPED) return;
        const shown = this.show(reply);
        if (this.spread() && shown === 0 && (await this.untilStopped(sleep(200))) === STOPPED) return;
      }
    } catch (err) {
      if (!this.stopped) {
        this.positioned = false; // a tail that failed has no position to resume from
        throw err;
      } // cut short by the stop: not an error
    } finally {
      redis.disconnect();
      if (options.onCursor !== undefined && this.positioned) options.onCursor(this.cursor());
    }
  }

  /** Every partition's position, as `--from` takes it. */
  private cursor(): string {
    return encodeCursor({ p: this.partitions, ids: this.keys.map((key) => this.last.get(key) ?? '0-0') });
  }

  /**
   * Every command races the stop: one waiting for a Redis that is away or frozen would wait for its return. What the
   * stop leaves behind fails when the connection is dropped.
   */
  private untilStopped<T>(command: Promise<T>): Promise<T | typeof STOPPED> {
    command.catch(() => undefined);
    return Promise.race([command, this.stopping]);
  }

  /** Reads the record and gives every partition its position: from `--from` (an id, or a cursor), or now. */
  private async start(): Promise<void | typeof STOPPED> {
    const { options, redis } = this;
    const recorded = await this.untilStopped(readRecord(redis, options.streamKey));
    if (recorded === STOPPED) return STOPPED;
    ({ partitions: this.partitions, repartitions: this.repartitions } = recorded);
    this.keys = partitionKeys(options.streamKey, this.partitions);
    const cursor = options.from === undefined || isStreamId(options.from) ? null : decodeCursor(options.from);
    if (cursor !== null && cursor.p !== this.partitions) {
      throw new TailCursorError(
        `--from: the cursor is for ${cursor.p} partition(s), but the stream ${options.streamKey} has ${this.partitions}: start from a stream id, 0 or $ instead`,
      );
    }
    for (const [n, key] of this.keys.entries()) {
      let from = cursor?.ids[n] ?? options.from ?? '$';
      if (from === '$') {
        // pin "now" to an id before the first read: reading from `$` again after a read that found nothing would
        // skip whatever was added between the two reads
        const newest = await this.untilStopped(redis.xrevrange(key, '+', '-', 'COUNT', 1));
        if (newest === STOPPED) return STOPPED;
        from = newest[0]?.[0] ?? '0-0';
      } else {
        const start = await this.untilStopped(readerStart(redis, key, from));
        if (start === STOPPED) return STOPPED;
        from = start.id;
        if ((await this.untilStopped(refuseTrimmed(redis, key, from))) === STOPPED) return STOPPED;
      }
      this.last.set(key, from);
    }
  }

  /**
   * Repartitioned: nothing more comes to the old partitions (the record changes only once the relays are fenced off
   * them), and nothing to the new ones before the record changed. Reads the old ones to their end, then the new ones
   * from where each was, never before its layout boundary.
   */
  private async followRepartition(now: { partitions: number; repartitions: number }): Promise<void | typeof STOPPED> {
    for (;;) {
      const rest = await this.untilStopped(this.read(this.keys, false));
      if (rest === STOPPED) return STOPPED;
      if (this.show(rest) === 0) break;
    }
    ({ partitions: this.partitions, repartitions: this.repartitions } = now);
    this.keys = partitionKeys(this.options.streamKey, this.partitions);
    for (const key of this.keys) {
      const start = await this.untilStopped(readerStart(this.redis, key, this.last.get(key) ?? '0'));
      if (start === STOPPED) return STOPPED;
      this.last.set(key, start.id);
    }
  }

  /**
   * One blocking read over every partition. On a Redis Cluster with several partitions their keys are in different
   * slots, which one XREAD cannot span: each is read in turn without blocking, pausing 200 ms when none had any.
   */
  private spread(): boolean {
    return isCluster(this.redis) && this.keys.length > 1;
  }

  private read(from: readonly string[], block: boolean): Promise<Read> {
    const { redis } = this;
    const after = (key: string) => this.last.get(key) ?? '0-0';
    return this.spread()
      ? Promise.all(from.map((key) => redis.call('XREAD', 'COUNT', '100', 'STREAMS', key, after(key)) as Promise<XReadReply>)).then((replies) =>
          replies.flatMap((r) => r ?? []),
        )
      : (
          redis.call('XREAD', 'COUNT', '100', ...(block ? ['BLOCK', '1000'] : []), 'STREAMS', ...from, ...from.map(after)) as Promise<XReadReply>
        ).then((r) => r ?? []);
  }

  /** Prints what a read brought, moving each partition's position; how many entries. */
  private show(reply: Read): number {
    let shown = 0;
    for (const [key, entries] of reply) {
      for (const [id, fields] of entries) {
        this.print(parseEntry(id, fields));
        this.last.set(key, id);
        shown++;
      }
    }
    return shown;
  }
}

async function refuseTrimmed(redis: RedisConnection, streamKey: string, from: string): Promise<void> {
  const first = (await redis.xrange(streamKey, '-', '+', 'COUNT', 1))[0]?.[0];
  const counts = await streamCounts(redis, streamKey).catch(() => null);
  if (first === undefined || counts === null) return;
  const { added, length } = counts;
  if (added > length && compareIds(from, first) < 0) throw new ResyncRequiredError(streamKey, from, first);
}
