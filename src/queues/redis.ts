import IORedis from 'ioredis';
import type { RedisOptions } from 'ioredis';

export type RedisRole =
  /** enqueues: a command fails after one reconnect try or 5 s, instead of waiting in memory for Redis forever */
  | 'producer'
  /** BullMQ workers and blocking readers: commands wait for the reconnect (BullMQ requires this) */
  | 'worker';

/**
 * A Redis connection for a role. Reconnects with capped exponential backoff either way; what differs is whether
 * a command issued while disconnected waits (worker) or fails at once (producer).
 */
export function createRedis(url: string, role: RedisRole, connectionName = `lifecycle-fleet-${role}`): IORedis {
  const options: RedisOptions = {
    connectionName,
    connectTimeout: 5000,
    retryStrategy: (times) => Math.min(50 * 2 ** times, 2000),
    ...(role === 'producer'
      ? { enableOfflineQueue: true, maxRetriesPerRequest: 1, commandTimeout: 5000 }
      : { enableOfflineQueue: true, maxRetriesPerRequest: null }),
  };
  return new IORedis(url, options);
}

/** Resolves when the connection is ready, or rejects after `timeoutMs`. */
export async function waitForRedis(redis: IORedis, timeoutMs = 10_000): Promise<void> {
  if (redis.status === 'ready') return;
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`Redis did not become ready within ${timeoutMs} ms`));
    }, timeoutMs);
    const onReady = () => {
      cleanup();
      resolve();
    };
    const cleanup = () => {
      clearTimeout(timer);
      redis.off('ready', onReady);
    };
    redis.on('ready', onReady);
  });
}
