/**
 * `fleet tail`: prints transitions as they happen. Without a group it reads the stream directly from `--from`
 * (default `$`, only new entries); with `--group/--consumer` it reads through a consumer group, so a restarted tail
 * continues where it stopped.
 */
import type { RedisConnection } from '../queues/redis';
import { ResyncRequiredError } from '../errors';
import { printable } from '../util';
import { createRedis, describeRedis, describeServer, ServerWatch, type ServerReport } from '../queues/redis';
import { compareIds, parseEntry, streamCounts, TransitionConsumer, type TransitionEntry } from '../streams/consumer';

export interface TailOptions {
  readonly redisUrl: string;
  readonly streamKey: string;
  readonly group?: string;
  readonly consumer?: string;
  readonly from?: string;
  readonly json?: boolean;
  readonly write: (line: string) => void;
  /** resolves when the tail should stop (a signal, a closed stdout) */
  readonly stop: Promise<void>;
  /** where "lost Redis at ..., retrying" and "... is back" go (default: nowhere) */
  readonly report?: ServerReport;
}

/** One entry as a line for a terminal: what producers sent (a reason, an id) with its control characters escaped. */
export function formatEntry(entry: TransitionEntry, json: boolean): string {
  if (json) return printable(JSON.stringify(entry));
  const from = entry.from === '' ? '(new)' : entry.from;
  const attempt = entry.attemptId === '' ? '' : `  attempt ${entry.attemptId}`;
  return printable(`${entry.at}  ${entry.deploymentId}  v${entry.version}  ${from} -> ${entry.to}  ${entry.reason}${attempt}  [${entry.eventId}]`);
}

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
    const running = consumer.run();
    await Promise.race([running, options.stop]);
    await consumer.close();
    await running;
    return;
  }

  const redis = createRedis(options.redisUrl, 'worker', 'lifecycle-fleet-tail');
  if (options.report !== undefined) new ServerWatch(describeRedis(redis), options.report).attach(redis);
  let stopped = false;
  void options.stop.then(() => {
    stopped = true;
  });
  try {
    let last = options.from ?? '$';
    if (last === '$') {
      // pin "now" to an id before the first read: reading from `$` again after a read that found nothing would
      // skip whatever was added between the two reads
      last = (await redis.xrevrange(options.streamKey, '+', '-', 'COUNT', 1))[0]?.[0] ?? '0-0';
    } else {
      await refuseTrimmed(redis, options.streamKey, last);
    }
    while (!stopped) {
      const read = redis.xread('COUNT', 100, 'BLOCK', 1000, 'STREAMS', options.streamKey, last);
      read.catch(() => undefined); // a read the stop leaves behind fails when the connection is dropped
      // a read waiting for a Redis that is away would wait for its return: the stop does not wait for it
      const reply = await Promise.race([read, options.stop.then(() => null)]);
      for (const [id, fields] of reply?.[0]?.[1] ?? []) {
        print(parseEntry(id, fields));
        last = id;
      }
    }
  } catch (err) {
    if (!stopped) throw err; // cut short by the stop: not an error
  } finally {
    redis.disconnect();
  }
}

async function refuseTrimmed(redis: RedisConnection, streamKey: string, from: string): Promise<void> {
  const first = (await redis.xrange(streamKey, '-', '+', 'COUNT', 1))[0]?.[0];
  const counts = await streamCounts(redis, streamKey).catch(() => null);
  if (first === undefined || counts === null) return;
  const { added, length } = counts;
  if (added > length && compareIds(from, first) < 0) throw new ResyncRequiredError(streamKey, from, first);
}
