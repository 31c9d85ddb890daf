import IORedis, { Cluster } from 'ioredis';
import type { ClusterOptions, RedisOptions } from 'ioredis';
import { FleetError, isLockConflict, isTransient } from '../errors';
import { isClusterUrl, parseClusterUrl, prefixHashTag } from '../util/redis-url';

/** A connection the fleet talks to Redis through: one server, or a Redis Cluster (REDIS_URL `redis+cluster://`). */
export type RedisConnection = IORedis | Cluster;

/** Where each connection createRedis made goes (a Cluster keeps its seed nodes private). */
const destinations = new WeakMap<RedisConnection, string>();

export type RedisRole =
  /** enqueues: a command fails after one reconnect try or 5 s, instead of waiting in memory for Redis forever */
  | 'producer'
  /** BullMQ workers and blocking readers: commands wait for the reconnect (BullMQ requires this) */
  | 'worker';

/**
 * The one Redis connection factory: a connection for a role, to one server or (for a `redis+cluster://` URL) to a
 * Redis Cluster through ioredis' `Cluster`, with the same options on each node's connection. Reconnects with capped
 * exponential backoff either way; what differs is whether a command issued while disconnected waits (worker) or
 * fails at once (producer).
 */
export function createRedis(url: string, role: RedisRole, connectionName = `lifecycle-fleet-${role}`, overrides: RedisOptions = {}): RedisConnection {
  const backoff = (times: number): number => Math.min(50 * 2 ** times, 2000);
  const options: RedisOptions = {
    connectionName,
    connectTimeout: 5000,
    retryStrategy: backoff,
    ...(role === 'producer'
      ? { enableOfflineQueue: true, maxRetriesPerRequest: 1, commandTimeout: 5000 }
      : { enableOfflineQueue: true, maxRetriesPerRequest: null }),
    ...overrides,
  };
  let redis: RedisConnection;
  if (isClusterUrl(url)) {
    const cluster = parseClusterUrl(url);
    // the cluster's own options; what only a single server's connection takes stays out of the nodes' options
    const { retryStrategy: _retry, enableOfflineQueue, enableAutoPipelining, ...nodeOptions } = options;
    const clusterOptions: ClusterOptions = {
      clusterRetryStrategy: backoff,
      enableOfflineQueue,
      enableAutoPipelining,
      enableReadyCheck: true,
      redisOptions: {
        ...nodeOptions,
        username: cluster.username,
        password: cluster.password,
        ...(cluster.tls ? { tls: {} } : {}),
      },
    };
    redis = new Cluster(
      cluster.nodes.map((n) => ({ host: n.host, port: n.port })),
      clusterOptions,
    );
    destinations.set(redis, `Redis Cluster at ${cluster.nodes.map((n) => hostPort(n.host, n.port)).join(',')}`);
  } else {
    redis = new IORedis(url, options);
  }
  // Never "Unhandled error event": a connection's errors are reported through its watch (silent until one is set).
  redis.on('error', () => undefined);
  return redis;
}

/**
 * Another connection to where `redis` goes, with its options and a name of its own: for a component given a
 * connection that needs one more (a reader that blocks). Its errors are silent, as createRedis's are.
 */
export function siblingOf(redis: RedisConnection, connectionName: string): RedisConnection {
  const sibling: RedisConnection = isCluster(redis)
    ? redis.duplicate([], { redisOptions: { ...redis.options.redisOptions, connectionName } })
    : redis.duplicate({ connectionName });
  sibling.on('error', () => undefined);
  const destination = destinations.get(redis);
  if (destination !== undefined) destinations.set(sibling, destination);
  return sibling;
}

/**
 * Resolves when Redis answers a PING, over a fail-fast connection of its own (the producer's: about 1 s when the
 * connection is refused, 5 s when nothing answers), else rejects with the connection's error. For a command that
 * needs Redis and should say so at once rather than wait for it (`fleet tail`).
 */
export async function pingRedis(url: string): Promise<void> {
  const redis = createRedis(url, 'producer', 'lifecycle-fleet-probe');
  try {
    await redis.ping();
  } finally {
    redis.disconnect();
  }
}

function hostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

/** True for a connection to a Redis Cluster. */
export function isCluster(redis: RedisConnection): redis is Cluster {
  return redis instanceof Cluster;
}

/** The per-command timeout a connection was made with (a cluster's, from its node options), if any. */
export function commandTimeoutOf(redis: RedisConnection): number | undefined {
  return redis instanceof Cluster ? redis.options.redisOptions?.commandTimeout : redis.options.commandTimeout;
}

/**
 * The connection a key's writes travel on: the connection itself, or on a cluster the connection to the master that
 * serves the key's slot (the one the cluster client routes that key's commands over). Redis `WAIT` counts the writes
 * of the connection it is sent on, so a durable write waits there. `slots` caches the slot per key.
 */
export async function connectionForKey(redis: RedisConnection, key: string, slots: Map<string, number>): Promise<IORedis> {
  if (!(redis instanceof Cluster)) return redis;
  let slot = slots.get(key);
  if (slot === undefined) {
    slot = Number(await redis.call('CLUSTER', 'KEYSLOT', key));
    slots.set(key, slot);
  }
  const owner = redis.slots[slot]?.[0];
  const node = redis.nodes('master').find((n) => `${n.options.host ?? ''}:${n.options.port ?? ''}` === owner);
  if (node === undefined) throw new Error(`no master known for slot ${slot} (${owner ?? 'unassigned'})`);
  return node;
}

/**
 * Refuses a Redis Cluster connection with a prefix whose keys would spread over slots (BullMQ's scripts and ours
 * touch several keys of one prefix at once, which a cluster allows only within one slot).
 */
export function requireSlotPrefix(redis: RedisConnection | string, prefix: string, who: string): void {
  const cluster = typeof redis === 'string' ? isClusterUrl(redis) : isCluster(redis);
  if (cluster && prefixHashTag(prefix) === null) {
    throw new Error(`${who}: with a Redis Cluster the prefix must contain a hash tag such as "{fleet}" (FLEET_PREFIX), got "${prefix}"`);
  }
}

/** Where a connection goes, without its password: `Redis at 127.0.0.1:6379`, `Redis Cluster at h1:7000,h2:7001`. */
export function describeRedis(redis: RedisConnection): string {
  const known = destinations.get(redis);
  if (known !== undefined) return known;
  if (isCluster(redis)) {
    const nodes = redis.nodes().map((n) => hostPort(n.options.host ?? '127.0.0.1', n.options.port ?? 6379));
    return nodes.length > 0 ? `Redis Cluster at ${nodes.join(',')}` : 'Redis Cluster';
  }
  const o = redis.options;
  return o.path !== undefined && o.path !== null && o.path !== '' ? `Redis at ${o.path}` : `Redis at ${o.host ?? '127.0.0.1'}:${o.port ?? 6379}`;
}

/** `PostgreSQL at host:port` (or Redis, or Redis Cluster at its seed nodes) for a URL, without its credentials. */
export function describeServer(kind: 'Redis' | 'PostgreSQL', url: string): string {
  if (kind === 'Redis' && isClusterUrl(url)) {
    try {
      return `Redis Cluster at ${parseClusterUrl(url)
        .nodes.map((n) => hostPort(n.host, n.port))
        .join(',')}`;
    } catch {
      return 'Redis Cluster';
    }
  }
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
    // a lost or refused connection, a reset, a timeout: the server is away, not the request wrong. The fleet's own
    // retryable errors ("not yet": the deployment's create is still on its way; a lost version check) are answers
    // from a server that is there: they said "lost PostgreSQL" on every early event. So is a lock conflict
    // PostgreSQL broke (a deadlock, a serialization failure): retried, but no outage
    if (err instanceof FleetError || isLockConflict(err) || !isTransient(err)) return false;
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
  attach(redis: RedisConnection, other: (err: Error) => void = () => undefined): this {
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
  return (
    err.name === 'MaxRetriesPerRequestError' ||
    err.name === 'ReplyError' ||
    err.name === 'ClusterAllFailedError' ||
    /max retries per request|Command timed out|Connection is closed|Stream isn't writeable|None of startup nodes is available|Failed to refresh slots cache|Cluster isn't ready|Too many Cluster redirections/i.test(
      err.message,
    )
  );
}

function errorCode(err: unknown): string {
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'string') return code;
  return err instanceof Error ? err.message.slice(0, 120) : 'error';
}

/**
 * Redis ACL rules for a fleet user confined to its prefix (`ACL SETUSER <user> reset on ><password> ...rules`): keys
 * and pub/sub channels under `<prefix>:` only; every command but the `@dangerous` ones (FLUSHALL, KEYS, CONFIG,
 * CLIENT KILL/LIST, DEBUG, MONITOR, ACL, ...), and with a hash-tagged prefix the stream partitions' own tags; plus INFO, which BullMQ reads for the server version and the relay for
 * the server's run_id; minus what reaches beyond the prefix although it is not `@dangerous`: switching databases,
 * and managing the server-wide script cache and function libraries. Enough for the lifecycle worker, the relay, the
 * sweep, the producer SDK, the HTTP surface and stream consumers (test/hardening.test.ts runs them under it).
 */
export function fleetAclRules(prefix: string): string[] {
  // a hash-tagged prefix's stream partitions carry tags of their own (`{fleet:p3}:transitions:3`, see partitionKey)
  const tag = prefixHashTag(prefix);
  return [
    'resetkeys',
    `~${prefix}:*`,
    // the partitions' own keys only (`{fleet:p<n>}:transitions:<n>...`), not another prefix such as `{fleet:prod}`
    ...(tag === null ? [] : [`~${prefix.replace(`{${tag}}`, `{${tag}:p[0-9]*}`)}:transitions:*`]),
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
