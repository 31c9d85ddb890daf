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
export function createRedis(
  url: string,
  role: RedisRole,
  connectionName = `lifecycle-fleet-${role}`,
  overrides: RedisOptions = {},
): IORedis {
  const options: RedisOptions = {
    connectionName,
    connectTimeout: 5000,
    retryStrategy: (times) => Math.min(50 * 2 ** times, 2000),
    ...(role === 'producer'
      ? { enableOfflineQueue: true, maxRetriesPerRequest: 1, commandTimeout: 5000 }
      : { enableOfflineQueue: true, maxRetriesPerRequest: null }),
    ...overrides,
  };
  return new IORedis(url, options);
}

/**
 * Redis ACL rules for a fleet user confined to its prefix (`ACL SETUSER <user> reset on ><password> ...rules`): keys
 * and pub/sub channels under `<prefix>:` only; every command but the `@dangerous` ones (FLUSHALL, KEYS, CONFIG,
 * CLIENT KILL/LIST, DEBUG, MONITOR, ACL, ...); plus INFO, which BullMQ reads for the server version and the relay for
 * the server's run_id; minus what reaches beyond the prefix although it is not `@dangerous`: switching databases,
 * and managing the server-wide script cache and function libraries. Enough for the lifecycle worker, the relay, the
 * sweep, the producer SDK, the HTTP surface and stream consumers (test/hardening.test.ts runs them under it).
 */
export function fleetAclRules(prefix: string): string[] {
  return [
    'resetkeys',
    `~${prefix}:*`,
    'resetchannels',
    `&${prefix}:*`,
    '+@all',
    '-@dangerous',
    '+info',
    '-select',
    '-move',
    '-function',
    '-script|flush',
    '-script|kill',
    '-script|debug',
  ];
}
