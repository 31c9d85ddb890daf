/**
 * `fleet tail`: prints transitions as they happen, from every partition of the stream (each deployment's in order).
 * Without a group it reads the stream directly from `--from` (default `$`, only new entries; an id applies to every
 * partition, or a cursor that a tail printed when it stopped: every partition's position); with `--group/--consumer`
 * it reads through a consumer group, so a restarted tail continues where it stopped. A reader never starts before a
 * key's layout boundary (what an earlier number of partitions wrote there), and when the number of partitions changes
 * (`fleet streams repartition`) it reads the old partitions to their end, then the new ones: src/streams/stream-follower.ts.
 */
import type { RedisConnection } from '../redis/connection';
import { printable } from '../util';
import { createRedis, describeRedis, describeServer, ServerWatch, type ServerReport } from '../redis/connection';
import { TransitionConsumer, parseEntry, type TransitionEntry } from '../streams/consumer';
import { StreamFollower } from '../streams/stream-follower';

export { CursorError as TailCursorError } from '../errors';
export { decodeCursor, encodeCursor, isStreamId, type StreamCursor as TailCursor } from '../streams/stream-follower';

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

/** One entry as a line for a terminal: what producers sent (a reason, an id) with its control characters escaped. */
export function formatEntry(entry: TransitionEntry, json: boolean): string {
  if (json) return printable(JSON.stringify(entry));
  const from = entry.from === '' ? '(new)' : entry.from;
  const attempt = entry.attemptId === '' ? '' : `  attempt ${entry.attemptId}`;
  return printable(`${entry.at}  ${entry.deploymentId}  v${entry.version}  ${from} -> ${entry.to}  ${entry.reason}${attempt}  [${entry.eventId}]`);
}

/** How long a stopping tail waits for the read in flight (a read blocks for 1 s) before it drops its connection. */
const STOP_GRACE_MS = 1000;

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

/** A tail without a group: reads every partition directly, from positions of its own (a StreamFollower), until the stop. */
class StreamTail {
  private readonly redis: RedisConnection;
  private stopped = false;
  private readonly stopping: Promise<typeof STOPPED>;
  private readonly follower: StreamFollower;
  /** every partition has a position: the tail has a cursor of where it is */
  private positioned = false;

  constructor(
    private readonly options: TailOptions,
    private readonly print: (entry: TransitionEntry) => void,
  ) {
    this.redis = createRedis(options.redisUrl, 'worker', 'lifecycle-fleet-tail');
    if (options.report !== undefined) new ServerWatch(describeRedis(this.redis), options.report).attach(this.redis);
    this.follower = new StreamFollower({ redis: this.redis, streamKey: options.streamKey, reader: 'this tail' });
    this.stopping = options.stop.then(() => {
      this.stopped = true;
      return STOPPED;
    });
  }

  async run(): Promise<void> {
    const { options, follower } = this;
    try {
      if ((await this.untilStopped(follower.start(options.from ?? '$'))) === STOPPED) return;
      this.positioned = true;
      while (!this.stopped) {
        const step = await this.untilStopped(follower.read({ block: true }));
        if (step === STOPPED) return;
        for (const entry of step.entries) this.print(parseEntry(entry.id, entry.fields));
      }
    } catch (err) {
      if (!this.stopped) {
        this.positioned = false; // a tail that failed has no position to resume from
        throw err;
      } // cut short by the stop: not an error
    } finally {
      this.redis.disconnect();
      if (options.onCursor !== undefined && this.positioned) options.onCursor(follower.cursor());
    }
  }

  /**
   * Every read races the stop: one waiting for a Redis that is away or frozen would wait for its return. What the
   * stop leaves behind fails when the connection is dropped.
   */
  private untilStopped<T>(command: Promise<T>): Promise<T | typeof STOPPED> {
    command.catch(() => undefined);
    return Promise.race([command, this.stopping]);
  }
}
