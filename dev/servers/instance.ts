/**
 * The services of one directory while they run (`Instance`): starting, restarting and stopping its Redis and
 * PostgreSQL, plus the process-wide cleanup (exit hook and default SIGINT/SIGTERM handling) for all of them.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { sleep } from '../../src/util';
import { CREDENTIALS_FILE } from './credentials';
import type { Credentials } from './credentials';
import { logTail, rotateLog } from './fs-helpers';
import { claimed, releaseLock } from './lock';
import { choosePgDataDir } from './os-user';
import type { RunAs } from './os-user';
import {
  admitClients,
  convertOldRoles,
  ensureFleetRole,
  hasRoles,
  hbaTrustsHost,
  initdb,
  PG_ADMIN,
  PG_USER,
  pgMajorVersion,
  pgProcesses,
  pgReady,
  requirePassword,
} from './postgres';
import type { PgContext, PgLogin } from './postgres';
import { signal, waitGone } from './process';
import { redisReady, writeRedisConf } from './redis';
import { freePort, PORT_RACE, spawnServer, waitReady } from './server';
import type { Server } from './server';
import type { LocalServicesOptions } from './types';

// ---------------------------------------------------------------------------
// process-wide cleanup: exit hook and default signal handling

const active = new Set<Instance>();
/**
 * Not SIGHUP: with no listener of ours, SIGHUP keeps its meaning for the application. Under `nohup` (or an
 * application that ignores SIGHUP or uses it to reload) a listener here would have stopped Redis/PostgreSQL
 * underneath a process that goes on running, since Node replaces an inherited SIG_IGN once anyone listens.
 * When SIGHUP does kill the process (its default action, e.g. the terminal closed), the servers, in their own
 * session, outlive it and are stopped by the next start in the same directory.
 */
const CLEANUP_SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM'];

function onExit(): void {
  for (const inst of active) {
    inst.signalAll();
    inst.releaseLock();
  }
}

function onSignal(sig: NodeJS.Signals): void {
  // someone else handles this signal (e.g. with-services, or the application's shutdown): leave it to them
  if (process.listenerCount(sig) > 1) return;
  void Promise.allSettled([...active].map((i) => i.stop())).then(() => {
    uninstallHooks();
    process.kill(process.pid, sig); // default action now that the servers are down
  });
}

function installHooks(): void {
  if (active.size !== 1) return;
  process.on('exit', onExit);
  for (const sig of CLEANUP_SIGNALS) process.on(sig, onSignal);
}

function uninstallHooks(): void {
  process.removeListener('exit', onExit);
  for (const sig of CLEANUP_SIGNALS) process.removeListener(sig, onSignal);
}

export class Instance {
  redis?: Server;
  pg?: Server;
  redisPort?: number;
  pgPort?: number;
  pgDataDir?: string;
  private redisStart?: { bin: string; args: string[]; logFile: string; dir: string };
  private pgStart?: { bin: string; args: string[]; logFile: string; dataDir: string; runAs: RunAs | undefined };
  private stopping?: Promise<void>;

  constructor(
    readonly dir: string,
    private readonly opts: LocalServicesOptions,
    private readonly log: (m: string) => void,
    private readonly lockToken: string,
  ) {
    active.add(this);
    installHooks();
  }

  private readonly unexpected = (s: Server, why: string): void => {
    this.log(`${s.name} exited unexpectedly (${why}); see ${s.logFile}`);
    const supervise = this.opts.supervise;
    if (supervise === undefined || this.stopping !== undefined || this.givenUp) return;
    const now = Date.now();
    const recent = (this.restarts.get(s.name) ?? []).filter((t) => now - t < supervise.withinMs);
    if (recent.length >= supervise.maxRestarts) {
      this.givenUp = true;
      supervise.onGiveUp(
        `${s.name} died ${recent.length + 1} times within ${Math.round(supervise.withinMs / 1000)} s (last: ${why}); see ${s.logFile}`,
      );
      return;
    }
    this.restarts.set(s.name, [...recent, now]);
    this.log(`restarting ${s.name} (${recent.length + 1} of at most ${supervise.maxRestarts} within ${Math.round(supervise.withinMs / 1000)} s)`);
    const revive =
      s.name === 'redis-server'
        ? this.restartRedis('SIGKILL', 0, this.redisPassword ?? '')
        : this.restartPostgres('immediate', 0, this.pgPassword ?? '');
    revive.then(
      () => this.log(`${s.name} is back`),
      (err: unknown) => {
        if (this.stopping !== undefined || this.givenUp) return;
        this.givenUp = true;
        supervise.onGiveUp(`${s.name} could not be restarted: ${err instanceof Error ? err.message : String(err)}`);
      },
    );
  };
  /** when each server was restarted by the supervisor (see `unexpected`) */
  private readonly restarts = new Map<string, number[]>();
  private givenUp = false;
  private redisPassword?: string;
  private pgPassword?: string;

  async startRedis(bin: string, password: string, usedPorts: Set<number>): Promise<void> {
    this.redisPassword = password;
    const redisDir = path.join(this.dir, 'redis');
    fs.mkdirSync(redisDir, { recursive: true, mode: 0o700 });
    fs.chmodSync(redisDir, 0o700); // its AOF holds job payloads: private, like credentials.json
    // secrets go into a 0600 file, not onto the command line (see writeRedisConf)
    const conf = writeRedisConf(this.dir, bin, password);
    const logFile = path.join(this.dir, 'redis.log');
    rotateLog(logFile);
    for (let attempt = 1; ; attempt++) {
      const port = await freePort(usedPorts);
      usedPorts.add(port);
      const args = [
        conf,
        '--port',
        String(port),
        '--bind',
        this.address,
        '--protected-mode',
        'yes',
        '--dir',
        redisDir,
        '--appendonly',
        'yes',
        '--save',
        '',
        '--maxmemory-policy',
        'noeviction',
        '--daemonize',
        'no',
        '--pidfile',
        path.join(this.dir, 'redis.pid'),
      ];
      this.assertNotStopping();
      const server = spawnServer('redis-server', bin, args, logFile, redisDir, undefined, this.unexpected, this.netns);
      this.redis = server;
      const pid = server.child.pid ?? -1;
      try {
        await waitReady(server, () => redisReady(port, pid, password, this.address), 30_000);
        this.redisPort = port;
        this.redisStart = { bin, args, logFile, dir: redisDir };
        return;
      } catch (err) {
        await server.stop([['SIGTERM', 5000]]);
        if (attempt >= 3 || !PORT_RACE.test(logTail(logFile, server.logFrom))) throw err;
      }
    }
  }

  /**
   * `passwords`: the fleet's role's (`fleet`) and the superuser's (`fleet_admin`); `created`: which of them were made
   * up just now (credentials.json did not have them).
   */
  async startPostgres(
    binDir: string,
    runAs: RunAs | undefined,
    passwords: { readonly fleet: string; readonly admin: string },
    created: ReadonlySet<keyof Credentials>,
    usedPorts: Set<number>,
  ): Promise<void> {
    this.pgPassword = passwords.admin;
    const fleet: PgLogin = { user: PG_USER, password: passwords.fleet };
    const admin: PgLogin = { user: PG_ADMIN, password: passwords.admin };
    const dataDir = choosePgDataDir(this.dir, runAs, this.log);
    this.pgDataDir = dataDir;
    const major = parseFloat(pgMajorVersion(binDir));
    const credentialsFile = path.join(this.dir, CREDENTIALS_FILE);
    const initialised = await initdb(this.pgContext(), binDir, dataDir, runAs, passwords.admin);
    // made by an older version, whose superuser is `fleet`: that is who manages it until it is converted below
    const converted = hasRoles(dataDir);
    const manager = converted ? admin : fleet;
    if (this.opts.host !== undefined) admitClients(dataDir, this.opts.host.clients, runAs, major);
    const trusting = hbaTrustsHost(dataDir); // made by an older version: switched to passwords below
    if (!initialised && created.has(converted ? 'postgresAdminPassword' : 'postgresPassword') && !trusting) {
      throw new Error(
        `PostgreSQL in ${dataDir} requires a password, but ${credentialsFile} was missing; ` +
          `restore it, or delete ${dataDir} (its data will be lost)`,
      );
    }

    const logFile = path.join(this.dir, 'postgres.log');
    rotateLog(logFile);
    let port = 0;
    for (let attempt = 1; ; attempt++) {
      port = await freePort(usedPorts);
      usedPorts.add(port);
      const args = [
        '-D',
        dataDir,
        '-p',
        String(port),
        '-c',
        `listen_addresses=${this.address}`,
        '-c',
        'unix_socket_directories=',
        '-c',
        'max_connections=200',
        ...(this.opts.fast ? ['-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off'] : []),
      ];
      this.assertNotStopping();
      const server = spawnServer('postgres', path.join(binDir, 'postgres'), args, logFile, dataDir, runAs, this.unexpected, this.netns);
      this.pg = server;
      try {
        // asked as the superuser: an older cluster's is `fleet` (or already `fleet_admin`, if its conversion was cut
        // short); crash recovery may take a while
        const ready = () => pgReady(port, dataDir, admin, credentialsFile, this.address);
        await waitReady(server, converted ? ready : () => ready().catch(() => pgReady(port, dataDir, fleet, credentialsFile, this.address)), 120_000);
        this.pgPort = port;
        this.pgStart = { bin: path.join(binDir, 'postgres'), args, logFile, dataDir, runAs };
        break;
      } catch (err) {
        await server.stop([
          ['SIGINT', 10_000],
          ['SIGQUIT', 5000],
        ]);
        if (attempt >= 3 || !PORT_RACE.test(logTail(logFile, server.logFrom))) throw err;
        await sleep(500 * attempt);
      }
    }
    if (trusting) await requirePassword(this.pgContext(), port, dataDir, runAs, manager, major);
    if (!converted) await convertOldRoles(this.pgContext(), port, dataDir, runAs, { fleet, admin }, major, this.address);
    await ensureFleetRole(port, admin, fleet, major, this.address);
  }

  async restartRedis(sig: 'SIGKILL' | 'SIGTERM', downMs: number, password: string, wipe = false): Promise<void> {
    const start = this.redisStart;
    const port = this.redisPort;
    if (start === undefined || port === undefined || this.redis === undefined) throw new Error('redis-server is not running here');
    this.assertNotStopping();
    await this.redis.stop([[sig, 15_000]]);
    if (wipe) {
      for (const data of ['appendonlydir', 'dump.rdb']) fs.rmSync(path.join(start.dir, data), { recursive: true, force: true });
    }
    if (downMs > 0) await sleep(downMs);
    this.assertNotStopping();
    const server = spawnServer('redis-server', start.bin, start.args, start.logFile, start.dir, undefined, this.unexpected, this.netns);
    this.redis = server;
    const pid = server.child.pid ?? -1;
    await waitReady(server, () => redisReady(port, pid, password, this.address), 60_000);
  }

  async restartPostgres(mode: 'immediate' | 'fast', downMs: number, password: string): Promise<void> {
    const start = this.pgStart;
    const port = this.pgPort;
    if (start === undefined || port === undefined || this.pg === undefined) throw new Error('PostgreSQL is not running here');
    this.assertNotStopping();
    // SIGQUIT = pg_ctl stop -m immediate: the postmaster kills its backends at once and exits; the next start recovers
    await this.pg.stop(
      mode === 'immediate'
        ? [['SIGQUIT', 15_000]]
        : [
            ['SIGINT', 30_000],
            ['SIGQUIT', 5000],
          ],
    );
    // backends the postmaster left behind would keep its shared memory busy
    await waitGone(pgProcesses(start.dataDir), 10_000);
    if (downMs > 0) await sleep(downMs);
    const credentialsFile = path.join(this.dir, CREDENTIALS_FILE);
    for (let attempt = 1; ; attempt++) {
      this.assertNotStopping();
      const server = spawnServer('postgres', start.bin, start.args, start.logFile, start.dataDir, start.runAs, this.unexpected, this.netns);
      this.pg = server;
      try {
        await waitReady(server, () => pgReady(port, start.dataDir, { user: PG_ADMIN, password }, credentialsFile, this.address), 120_000);
        return;
      } catch (err) {
        await server.stop([
          ['SIGINT', 10_000],
          ['SIGQUIT', 5000],
        ]);
        if (attempt >= 5 || !PORT_RACE.test(logTail(start.logFile, server.logFrom))) throw err;
        await sleep(500 * attempt);
      }
    }
  }

  /** where the servers listen: loopback, or the lab host's address */
  get address(): string {
    return this.opts.host?.address ?? '127.0.0.1';
  }

  private get netns(): string | undefined {
    return this.opts.host?.netns;
  }

  private pgContext(): PgContext {
    return { dir: this.dir, fast: this.opts.fast, fresh: this.opts.fresh, log: this.log };
  }

  private assertNotStopping(): void {
    if (this.stopping) throw new Error(`local services in ${this.dir} were stopped while starting`);
  }

  /** Synchronous best-effort shutdown request, for process exit. */
  signalAll(): void {
    if (this.redis?.pid) signal(this.redis.pid, 'SIGTERM');
    if (this.pg?.pid) signal(this.pg.pid, 'SIGINT'); // fast shutdown, completes on its own
  }

  releaseLock(): void {
    releaseLock(this.dir, this.lockToken);
  }

  stop(): Promise<void> {
    this.stopping ??= (async () => {
      try {
        await Promise.all([
          this.redis?.stop([['SIGTERM', 15_000]]),
          this.pg?.stop([
            ['SIGINT', 30_000],
            ['SIGQUIT', 5000],
          ]), // fast, then immediate
        ]);
      } finally {
        this.releaseLock();
        claimed.delete(this.dir);
        active.delete(this);
        if (active.size === 0) uninstallHooks();
      }
    })();
    return this.stopping;
  }
}
