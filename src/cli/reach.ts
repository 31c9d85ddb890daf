/**
 * Reaching the servers a command needs: which ones (REDIS_URL and DATABASE_URL, or a running `fleet start`'s), and a
 * server that does not answer as one line naming it and exit code 4; bad input on the command line is exit code 2.
 */
import type { Endpoints } from '../app';
import type { FleetConfig } from '../config';
import { isTransient } from '../errors';
import { describeServer, isRedisError } from '../redis/connection';
import { isClusterUrl, parseClusterUrl } from '../util/redis-url';
import { runningLocalEndpoints } from './start';

/** Thrown for bad input on the command line: exit code 2. */
export class UsageError extends Error {}

/** A server the command needs did not answer: exit code 4, one line naming it (never its password). */
export class UnreachableError extends Error {}

/** A connection error from `server` as one readable line (exit code 4): the error's code, or what it means. */
export function unreachable(server: string, err: unknown): UnreachableError {
  const code = (err as { code?: unknown }).code;
  const message = err instanceof Error ? err.message : String(err);
  const why =
    typeof code === 'string'
      ? code
      : /timed out|timeout/i.test(message)
        ? 'no answer in time'
        : /max retries per request/i.test(message)
          ? 'no connection'
          : message;
  return new UnreachableError(`${server} is unreachable (${why})`);
}

/** Runs `fn`; a connection error (refused, reset, timed out) becomes one readable line and exit code 4. */
export async function reaching<T>(server: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw isTransient(err) ? unreachable(server, err) : err;
  }
}

/** The ports REDIS_URL names (a cluster URL's seed nodes each have one). */
function redisPorts(url: string): string[] {
  try {
    return isClusterUrl(url) ? parseClusterUrl(url).nodes.map((n) => String(n.port)) : [new URL(url).port];
  } catch {
    return [];
  }
}

/** Starts the fleet; a server that cannot be reached at start becomes one line naming it (which one: an ioredis
 * error, or one that carries Redis's port, is Redis's; any other is PostgreSQL's) and exit code 4. */
export async function starting<T>(endpoints: Endpoints, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (!isTransient(err)) throw err;
    const redis = isRedisError(err) || redisPorts(endpoints.redisUrl).includes(String((err as { port?: unknown }).port));
    throw unreachable(redis ? describeServer('Redis', endpoints.redisUrl) : describeServer('PostgreSQL', endpoints.databaseUrl), err);
  }
}

/**
 * REDIS_URL and DATABASE_URL, or else those of the local services a running `fleet start` brought up.
 */
export function resolveEndpoints(config: FleetConfig): Endpoints {
  if (config.redisUrl !== null && config.databaseUrl !== null) {
    return { redisUrl: config.redisUrl, databaseUrl: config.databaseUrl };
  }
  const local = runningLocalEndpoints();
  if (local !== undefined) {
    return { redisUrl: config.redisUrl ?? local.redisUrl, databaseUrl: config.databaseUrl ?? local.databaseUrl };
  }
  const missing = [config.redisUrl === null ? 'REDIS_URL' : null, config.databaseUrl === null ? 'DATABASE_URL' : null]
    .filter((v) => v !== null)
    .join(' and ');
  throw new UsageError(
    `${missing} not set, and no local fleet is running: set ${missing}, or run \`npm start\` (it starts local Redis and PostgreSQL) in another terminal`,
  );
}
