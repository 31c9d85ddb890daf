/**
 * The services a benchmark run measures against. With REDIS_URL and DATABASE_URL set, those are used (and left as
 * they were: every database and key prefix the run creates is removed at the end). Otherwise private servers are
 * started under `<repo>/.fleet/bench`, wiped first, with PRODUCTION durability settings (`fast: false`: fsync and
 * synchronous_commit on, Redis AOF fsync every second), so commit costs are the ones a real fleet pays; the
 * baselines run on the same servers and pay the same.
 */
import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import IORedis from 'ioredis';
import type { RedisConnection } from '../../src/redis/connection';
import { Client } from 'pg';
import type { DataSource } from 'typeorm';
import { createDataSource } from '../../ormconfig';
import { migrate } from '../../src/entities/schema/migrate';
import { startLocalServices, type LocalServices } from '../../dev/servers';
import type { ServerHost } from '../../dev/servers/types';
import { log, repoRoot } from './common';

export interface BenchServices {
  readonly redisUrl: string;
  /** the admin database URL: scenario databases are created beside it */
  readonly databaseUrl: string;
  /** how the services were obtained, for the results file */
  readonly description: string;
  /** a run-unique tag for database names and key prefixes */
  readonly tag: string;
  /**
   * The same database as `url`, as a superuser: the private servers' admin (the fleet's own role is no superuser,
   * and the bench's CHECKPOINT needs one); with external services, `url` itself
   */
  asAdmin(url: string): string;
  /** creates and migrates a database of the scenario's own; returns its URL */
  createDatabase(label: string): Promise<string>;
  /** a BullMQ / stream key prefix of the run's own */
  prefix(label: string): string;
  /** pids of the servers the run started (for CPU accounting); undefined for external services */
  readonly pids: { readonly postgres?: number; readonly redis?: number };
  /** drops what the run created, stops servers it started */
  stop(): Promise<void>;
}

export interface BenchServicesOptions {
  /**
   * Run private servers on a lab host (dev/netns.ts) instead of loopback, in `dir` (REDIS_URL / DATABASE_URL are
   * ignored: a lab host cannot reach the root namespace's loopback). The `hosts` scenario.
   */
  readonly host?: ServerHost;
  /** the private servers' directory (default `<repo>/.fleet/bench`) */
  readonly dir?: string;
}

export async function startBenchServices(options: BenchServicesOptions = {}): Promise<BenchServices> {
  const envRedis = options.host === undefined ? process.env['REDIS_URL'] : undefined;
  const envPg = options.host === undefined ? process.env['DATABASE_URL'] : undefined;
  let local: LocalServices | null = null;
  if (envRedis === undefined || envRedis === '' || envPg === undefined || envPg === '') {
    const dir = options.dir ?? path.join(repoRoot(), '.fleet', 'bench');
    const where = options.host === undefined ? '' : ` in network namespace ${options.host.netns} on ${options.host.address}`;
    log(`starting private redis/postgres under ${path.relative(process.cwd(), dir) || dir}${where} (fresh, durable: fast=false)`);
    local = await startLocalServices({
      dir,
      redis: envRedis === undefined || envRedis === '',
      postgres: envPg === undefined || envPg === '',
      fresh: true,
      fast: false,
      log: (msg) => log(msg),
      ...(options.host !== undefined ? { host: options.host } : {}),
    });
  }
  const redisUrl = envRedis !== undefined && envRedis !== '' ? envRedis : (local?.redisUrl ?? '');
  const databaseUrl = envPg !== undefined && envPg !== '' ? envPg : (local?.databaseUrl ?? '');
  if (redisUrl === '' || databaseUrl === '') throw new Error('no Redis or PostgreSQL to benchmark against');

  const tag = randomBytes(3).toString('hex');
  const databases: string[] = [];
  const prefixes: string[] = [];
  const description =
    local === null
      ? 'REDIS_URL / DATABASE_URL from the environment'
      : `private redis-server and PostgreSQL under ${path.relative(repoRoot(), options.dir ?? path.join(repoRoot(), '.fleet', 'bench'))}` +
        `${options.host !== undefined ? ` on lab host ${options.host.address}, network namespace ${options.host.netns}` : ''} (fresh; fsync on, synchronous_commit on, AOF everysec)`;

  return {
    redisUrl,
    databaseUrl,
    description,
    tag,
    pids: {
      ...(local?.pgPid !== undefined ? { postgres: local.pgPid } : {}),
      ...(local?.redisPid !== undefined ? { redis: local.redisPid } : {}),
    },
    asAdmin(url: string): string {
      const admin = envPg !== undefined && envPg !== '' ? undefined : local?.adminDatabaseUrl;
      if (admin === undefined) return url;
      const out = new URL(admin);
      out.pathname = new URL(url).pathname;
      return out.toString();
    },
    async createDatabase(label: string): Promise<string> {
      const name = `bench_${label}_${tag}`;
      await withAdmin(databaseUrl, (c) => c.query(`CREATE DATABASE ${name}`));
      databases.push(name);
      const url = new URL(databaseUrl);
      url.pathname = `/${name}`;
      const ds = createDataSource({ url: url.toString(), poolSize: 2, applicationName: 'lifecycle-fleet-bench' });
      await ds.initialize();
      try {
        await migrate(ds);
      } finally {
        await ds.destroy();
      }
      return url.toString();
    },
    prefix(label: string): string {
      const p = `bench-${tag}-${label}`;
      prefixes.push(p);
      return p;
    },
    async stop(): Promise<void> {
      if (local !== null) {
        await local.stop();
        return;
      }
      for (const name of databases) {
        await withAdmin(databaseUrl, (c) => c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)).catch(() => undefined);
      }
      const redis = new IORedis(redisUrl, { maxRetriesPerRequest: 2 });
      try {
        for (const p of prefixes) await dropPrefix(redis, p);
      } finally {
        redis.disconnect();
      }
    },
  };
}

async function withAdmin<T>(url: string, fn: (c: Client) => Promise<T>): Promise<T> {
  const c = new Client({ connectionString: url });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

export async function dropPrefix(redis: RedisConnection, prefix: string): Promise<void> {
  let cursor = '0';
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
    cursor = next;
    if (keys.length > 0) await redis.del(...keys);
  } while (cursor !== '0');
}

/** A DataSource on a scenario database. */
export async function openDataSource(url: string, poolSize: number): Promise<DataSource> {
  const ds = createDataSource({ url, poolSize, applicationName: 'lifecycle-fleet-bench' });
  await ds.initialize();
  return ds;
}
