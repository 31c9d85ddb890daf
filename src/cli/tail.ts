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
  if (options.group !== undefined) {
    const consumer = new TransitionConsumer({
      redis: options.redisUrl,
      streamKey: options.streamKey,
      group: options.group,
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
    return;
  }

  const redis = createRedis(options.redisUrl, 'worker', 'lifecycle-fleet-tail');
  if (options.report !== undefined) new ServerWatch(describeRedis(redis), options.report).attach(redis);
  let stopped = false;
  const stopping: Promise<typeof STOPPED> = options.stop.then(() => {
    stopped = true;
    return STOPPED;
  });
  // Every command races the stop: one waiting for a Redis that is away or frozen would wait for its return. What the
  // stop leaves behind fails when the connection is dropped below.
  const untilStopped = <T>(command: Promise<T>): Promise<T | typeof STOPPED> => {
    command.catch(() => undefined);
    return Promise.race([command, stopping]);
  };
  // once every partition has a position: the cursor of where the tail is
  let positioned: (() => string) | null = null;
  try {
    const recorded = await untilStopped(readRecord(redis, options.streamKey));
    if (recorded === STOPPED) return;
    let { partitions, repartitions } = recorded;
    let keys = partitionKeys(options.streamKey, partitions);
    const cursor = options.from === undefined || isStreamId(options.from) ? null : decodeCursor(options.from);
    if (cursor !== null && cursor.p !== partitions) {
      throw new TailCursorError(
        `--from: the cursor is for ${cursor.p} partition(s), but the stream ${options.streamKey} has ${partitions}: start from a stream id, 0 or $ instead`,
      );
    }
    // per partition, the id after which it reads: each partition is in order, so each deployment is
    const last = new Map<string, string>();
    for (const [n, key] of keys.entries()) {
      let from = cursor?.ids[n] ?? options.from ?? '$';
      if (from === '$') {
        // pin "now" to an id before the first read: reading from `$` again after a read that found nothing would
        // skip whatever was added between the two reads
        const newest = await untilStopped(redis.xrevrange(key, '+', '-', 'COUNT', 1));
        if (newest === STOPPED) return;
        from = newest[0]?.[0] ?? '0-0';
      } else {
        const start = await untilStopped(readerStart(redis, key, from));
        if (start === STOPPED) return;
        from = start.id;
        if ((await untilStopped(refuseTrimmed(redis, key, from))) === STOPPED) return;
      }
      last.set(key, from);
    }
    positioned = () => encodeCursor({ p: partitions, ids: keys.map((key) => last.get(key) ?? '0-0') });
    // One blocking read over every partition. On a Redis Cluster with several partitions their keys are in different
    // slots, which one XREAD cannot span: each is read in turn without blocking, pausing 200 ms when none had any.
    const spread = () => isCluster(redis) && keys.length > 1;
    const after = (key: string) => last.get(key) ?? '0-0';
    const read = (from: readonly string[], block: boolean): Promise<Read> =>
      spread()
        ? Promise.all(from.map((key) => redis.call('XREAD', 'COUNT', '100', 'STREAMS', key, after(key)) as Promise<XReadReply>)).then((replies) =>
            replies.flatMap((r) => r ?? []),
          )
        : (redis.call('XREAD', 'COUNT', '100', ...(block ? ['BLOCK', '1000'] : []), 'STREAMS', ...from, ...from.map(after)) as Promise<XReadReply>).then(
            (r) => r ?? [],
          );
    const show = (reply: Read): number => {
      let shown = 0;
      for (const [key, entries] of reply) {
        for (const [id, fields] of entries) {
          print(parseEntry(id, fields));
          last.set(key, id);
          shown++;
        }
      }
      return shown;
    };
    while (!stopped) {
      const now = await untilStopped(readRecord(redis, options.streamKey));
      if (now === STOPPED) return;
      if (now.repartitions > repartitions + 1) {
        throw new Error(
          `the stream ${options.streamKey} was repartitioned ${now.repartitions - repartitions} times since this tail last looked: the entries of the layouts in between cannot be printed in each deployment's order; start it again`,
        );
      }
      if (now.repartitions !== repartitions || now.partitions !== partitions) {
        // repartitioned: nothing more comes to the old partitions (the record changes only once the relays are
        // fenced off them), and nothing to the new ones before the record changed. Read the old ones to their end,
        // then the new ones from where each was, never before its layout boundary.
        for (;;) {
          const rest = await untilStopped(read(keys, false));
          if (rest === STOPPED) return;
          if (show(rest) === 0) break;
        }
        ({ partitions, repartitions } = now);
        keys = partitionKeys(options.streamKey, partitions);
        for (const key of keys) {
          const start = await untilStopped(readerStart(redis, key, last.get(key) ?? '0'));
          if (start === STOPPED) return;
          last.set(key, start.id);
        }
        continue;
      }
      const reply = await untilStopped(read(keys, !spread()));
      if (reply === STOPPED) return;
      const shown = show(reply);
      if (spread() && shown === 0 && (await untilStopped(sleep(200))) === STOPPED) return;
    }
  } catch (err) {
    if (!stopped) {
      positioned = null; // a tail that failed has no position to resume from
      throw err;
    } // cut short by the stop: not an error
  } finally {
    redis.disconnect();
    if (options.onCursor !== undefined && positioned !== null) options.onCursor(positioned());
  }
}

async function refuseTrimmed(redis: RedisConnection, streamKey: string, from: string): Promise<void> {
  const first = (await redis.xrange(streamKey, '-', '+', 'COUNT', 1))[0]?.[0];
  const counts = await streamCounts(redis, streamKey).catch(() => null);
  if (first === undefined || counts === null) return;
  const { added, length } = counts;
  if (added > length && compareIds(from, first) < 0) throw new ResyncRequiredError(streamKey, from, first);
}
