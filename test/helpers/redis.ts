import { randomBytes } from 'node:crypto';
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
