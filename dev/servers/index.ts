/**
 * Private, throw-away Redis and PostgreSQL servers for development and tests.
 *
 * Everything lives under one directory (`<repo>/.fleet/run` for `npm start`,
 * `<repo>/.fleet/test` for `npm test`): data, pid files and logs. The servers
 * listen on free loopback ports picked at start, never on the default ports, and
 * nothing here touches a system-wide Redis or PostgreSQL service.
 *
 * Layout of `dir`:
 *   owner.lock        lock of the process currently owning these services (created with O_EXCL;
 *                     taken over only when that process is dead)
 *   credentials.json  (mode 0600) the Redis and PostgreSQL passwords, generated at first start
 *   redis.conf        (mode 0600) the part of the Redis configuration that is secret (requirepass)
 *   redis/            Redis working dir (AOF lives in redis/appendonlydir)
 *   redis.pid         Redis pid file (left behind only if Redis was SIGKILLed)
 *   pg/               PostgreSQL data directory (unless `pg-location` says otherwise)
 *   pg-location       (root only) path of the data directory when it had to be
 *                     placed under the temp dir because `fleetpg` cannot reach `dir`
 *   *.log             output of redis-server, initdb, postgres, apt-get
 *
 * Both servers require a password: PostgreSQL password authentication on TCP, no Unix-domain
 * socket at all; Redis `requirepass`. The returned URLs carry them, so treat those URLs as
 * secrets. PostgreSQL has two roles: `fleet` (`databaseUrl`), which is no superuser but owns the
 * database `fleet` and may create databases, and the superuser `fleet_admin` (`adminDatabaseUrl`).
 * Data directories made by older versions (`initdb --auth=trust`; `fleet` the superuser) are
 * switched to password authentication and to these roles on their next start. The servers and
 * initdb get a clean environment (PATH, locale, time zone, HOME): nothing of the caller's
 * configuration (FLEET_*, passwords, tokens).
 *
 * When running as root, initdb/postgres run as the dedicated system user
 * `fleetpg` (PostgreSQL refuses to run as root). The servers are started in
 * their own session so that a terminal ^C reaches the application first; they
 * are stopped by `stop()`, on process exit, and on SIGINT/SIGTERM when nobody
 * else handles those signals. SIGHUP is deliberately left alone (see CLEANUP_SIGNALS).
 * Servers orphaned by a killed parent are found and stopped on the next start in
 * the same directory; only processes that are provably ours are signalled: named
 * exactly `redis-server`/`postgres` and running with our config file / data directory.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ensureBinaries } from './binaries';
import type { Binaries } from './binaries';
import { loadCredentials } from './credentials';
import type { Credentials } from './credentials';
import { isRoot } from './fs-helpers';
import { Instance } from './instance';
import { acquireLock, checkLegacyOwner, claimed, releaseLock } from './lock';
import type { LockRecord } from './lock';
import { ensureOsUser, recordedPgLocation } from './os-user';
import { PG_ADMIN, PG_DATABASE, PG_USER, stopLeftoverPostgres } from './postgres';
import { stopLeftoverRedis } from './redis';
import type { LocalServices, LocalServicesOptions } from './types';
import { wipe } from './wipe';

export type { LocalServices, LocalServicesOptions } from './types';
export { MissingBinaryError } from './binaries';
export { canInstall, installCommand, installRequirements, missingRequirements, serverRequirements, TEST_TOOLS } from './binaries';
export type { Requirement } from './binaries';
export { isProcessAlive } from './process';

export async function startLocalServices(opts: LocalServicesOptions): Promise<LocalServices> {
  const dir = path.resolve(opts.dir);
  const log = opts.log ?? ((): void => undefined);
  if (claimed.has(dir)) throw new Error(`local services in ${dir} are already running in this process`);
  claimed.add(dir);
  let lock: LockRecord;
  try {
    fs.mkdirSync(dir, { recursive: true });
    lock = await acquireLock(dir);
    try {
      checkLegacyOwner(dir);
    } catch (err) {
      releaseLock(dir, lock.token);
      throw err;
    }
  } catch (err) {
    claimed.delete(dir);
    throw err;
  }

  const inst = new Instance(dir, opts, log, lock.token);
  const usedPorts = new Set<number>();
  const bins: Binaries = {};
  let creds: Credentials;
  try {
    // whatever an earlier (killed) run left running in this dir goes first, wanted or not
    await stopLeftoverRedis(dir, log);
    for (const dataDir of new Set([path.join(dir, 'pg'), recordedPgLocation(dir)])) {
      if (dataDir) await stopLeftoverPostgres(dataDir, log);
    }
    if (opts.fresh) wipe(dir);
    const loaded = loadCredentials(dir);
    creds = loaded.creds;
    Object.assign(bins, await ensureBinaries(opts, dir, log));
    const runAs = opts.postgres && isRoot() ? ensureOsUser(log) : undefined;
    const pgPasswords = { fleet: creds.postgresPassword, admin: creds.postgresAdminPassword };
    const results = await Promise.allSettled([
      bins.redisBin ? inst.startRedis(bins.redisBin, creds.redisPassword, usedPorts) : undefined,
      bins.pgBinDir ? inst.startPostgres(bins.pgBinDir, runAs, pgPasswords, loaded.created, usedPorts) : undefined,
    ]);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  } catch (err) {
    await inst.stop();
    throw err;
  }

  const { redisPassword, postgresPassword, postgresAdminPassword } = creds;
  const services: LocalServices = {
    redisBin: bins.redisBin,
    pgBinDir: bins.pgBinDir,
    pgDataDir: inst.pgDataDir,
    stop: () => inst.stop(),
    restartRedis: (o = {}) => inst.restartRedis(o.signal ?? 'SIGKILL', o.downMs ?? 0, redisPassword, o.wipe ?? false),
    restartPostgres: (o = {}) => inst.restartPostgres(o.mode ?? 'immediate', o.downMs ?? 0, postgresAdminPassword),
    get redisPid(): number | undefined {
      return inst.redis?.pid;
    },
    get pgPid(): number | undefined {
      return inst.pg?.pid;
    },
  };
  if (inst.redisPort !== undefined) {
    services.redisPort = inst.redisPort;
    services.redisUrl = `redis://:${encodeURIComponent(redisPassword)}@${inst.address}:${inst.redisPort}`;
  }
  if (inst.pgPort !== undefined) {
    services.pgPort = inst.pgPort;
    services.databaseUrl = `postgres://${PG_USER}:${encodeURIComponent(postgresPassword)}@${inst.address}:${inst.pgPort}/${PG_DATABASE}`;
    services.adminDatabaseUrl = `postgres://${PG_ADMIN}:${encodeURIComponent(postgresAdminPassword)}@${inst.address}:${inst.pgPort}/${PG_DATABASE}`;
  }
  return services;
}
