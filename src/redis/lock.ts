/**
 * A short Redis lock: `SET key token PX ttl NX`, released only by its holder (a crashed holder's lock expires). Used
 * where one process at a time should do something fleet-wide: the sweep scheduler's registration, the stamp flush.
 */
import { sleep } from '../util';
import type { RedisConnection } from './connection';

const RELEASE = `if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`;

/** Takes the lock, trying every 50-150 ms for up to `waitMs`; false when another holder kept it that long. */
export async function acquireLock(redis: RedisConnection, key: string, token: string, ttlMs: number, waitMs: number): Promise<boolean> {
  const deadline = Date.now() + waitMs;
  for (;;) {
    if ((await redis.set(key, token, 'PX', ttlMs, 'NX')) === 'OK') return true;
    if (Date.now() >= deadline) return false;
    await sleep(50 + Math.random() * 100);
  }
}

/** Releases the lock if this token still holds it; errors are ignored (the lock then expires). */
export async function releaseLock(redis: RedisConnection, key: string, token: string): Promise<void> {
  await redis.eval(RELEASE, 1, key, token).catch(() => undefined);
}
