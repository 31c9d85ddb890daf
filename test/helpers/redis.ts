import { randomBytes } from 'node:crypto';
import { Queue } from 'bullmq';
import IORedis from 'ioredis';
import { testEnv } from './env';

/** A BullMQ prefix of a test's own, so tests never see each other's queues. */
export function uniquePrefix(): string {
  return `t${randomBytes(5).toString('hex')}`;
}

export function testRedis(): IORedis {
  return new IORedis(testEnv().redisUrl, { maxRetriesPerRequest: null });
}

/** Deletes every key under a prefix. */
export async function dropPrefix(prefix: string): Promise<void> {
  const redis = testRedis();
  try {
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
      cursor = next;
      if (keys.length > 0) await redis.del(...keys);
    } while (cursor !== '0');
  } finally {
    redis.disconnect();
  }
}

/**
 * What enqueueing leaves in a BullMQ queue: its jobs in any state, its event stream's entries (every add writes
 * one), and any key that is not one of the queue's own (a job's hash, logs, lock). Not the key space as a whole: a
 * Queue writes its `meta` key when its connection is ready, whatever is added, so "no key at all" is a race.
 */
export async function enqueueTraces(redis: IORedis, queue: Queue): Promise<{ jobs: number; events: number; otherKeys: string[] }> {
  // counted over the test's own connection: the queue's may be a producer's, whose 5 s command timeout a starved
  // test process can pass while the answer waits in its socket (seen on a machine at load 16)
  const counter = new Queue(queue.name, { connection: redis, prefix: queue.opts.prefix });
  const counts = await counter.getJobCounts().finally(() => counter.close());
  const own = new Set(Object.values(queue.keys));
  const otherKeys: string[] = [];
  let cursor = '0';
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', `${queue.toKey('')}*`, 'COUNT', 1000);
    cursor = next;
    otherKeys.push(...keys.filter((k) => !own.has(k)));
  } while (cursor !== '0');
  return { jobs: Object.values(counts).reduce((sum, n) => sum + n, 0), events: await redis.xlen(queue.toKey('events')), otherKeys: otherKeys.sort() };
}
