import IORedis from 'ioredis';
import type { RedisOptions } from 'ioredis';
import { isTransient } from '../errors';

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
  const redis = new IORedis(url, options);
  // Never "Unhandled error event": a connection's errors are reported through its watch (silent until one is set).
  redis.on('error', () => undefined);
  return redis;
}

/** Where a connection goes, without its password: `Redis at 127.0.0.1:6379`. */
export function describeRedis(redis: IORedis): string {
  const o = redis.options;
  return o.path !== undefined && o.path !== null && o.path !== '' ? `Redis at ${o.path}` : `Redis at ${o.host ?? '127.0.0.1'}:${o.port ?? 6379}`;
}

/** `PostgreSQL at host:port` (or Redis) for a URL, without its credentials. */
export function describeServer(kind: 'Redis' | 'PostgreSQL', url: string): string {
  try {
    const u = new URL(url);
    return `${kind} at ${u.hostname}:${u.port === '' ? (kind === 'Redis' ? '6379' : '5432') : u.port}`;
  } catch {
    return kind;
  }
}

/** How a watch reports: a structured logger's warn/info, or a CLI's line on stderr. */
export type ServerReport = (level: 'warn' | 'info', message: string, fields: Record<string, unknown>) => void;

/** A report into a pino logger. */
export function logReport(log: { warn(o: object, m: string): void; info(o: object, m: string): void }): ServerReport {
  return (level, message, fields) => log[level](fields, message);
}

/**
 * One server as its users see it: up, or lost. The first connection error of an outage is reported once ("lost
 * Redis at host:port, retrying", with the error's code, never a stack or a password); the rest of the outage is
 * quiet; the first `ready` after it says it is back. Shared by every connection of a component to that server.
 */
export class ServerWatch {
  private down = false;

  constructor(
    readonly what: string,
    private readonly report: ServerReport,
  ) {}

  get isDown(): boolean {
    return this.down;
  }

  /** An error from a connection to the server: true when it was a connection error (and is reported here). */
  error(err: unknown): boolean {
    // a lost or refused connection, a reset, a timeout: the server is away, not the request wrong
    if (!isTransient(err)) return false;
    if (!this.down) {
      this.down = true;
      this.report('warn', `lost ${this.what}, retrying`, { server: this.what, code: errorCode(err) });
    }
    return true;
  }

  back(): void {
    if (!this.down) return;
    this.down = false;
    this.report('info', `${this.what} is back`, { server: this.what });
  }

  /** Routes a connection's errors and recoveries through this watch; other errors go to `other`. */
  attach(redis: IORedis, other: (err: Error) => void = () => undefined): this {
    redis.on('error', (err: Error) => {
      if (!this.error(err)) other(err);
    });
    redis.on('ready', () => this.back());
    return this;
  }
}

/** An error from an ioredis command (rather than from PostgreSQL's driver). */
export function isRedisError(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  return err.name === 'MaxRetriesPerRequestError' || err.name === 'ReplyError' || /max retries per request|Command timed out|Connection is closed|Stream isn't writeable/i.test(err.message);
}

function errorCode(err: unknown): string {
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'string') return code;
  return err instanceof Error ? err.message.slice(0, 120) : 'error';
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
