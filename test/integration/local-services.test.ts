// Integration test of dev/servers against the real redis-server and PostgreSQL binaries.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import * as readline from 'node:readline';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { repoRoot } from '../../src/util';
import { waitFor } from '../helpers/wait';
import { Redis } from 'ioredis';
import { Client } from 'pg';
import { startLocalServices } from '../../dev/servers';
import type { LocalServices, LocalServicesOptions } from '../../dev/servers';
import { scramVerifier } from '../../dev/servers/credentials';

/** Alive and not a zombie (orphans may be reparented to an init that reaps slowly). */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^[ZX]/.test(stat.slice(stat.lastIndexOf(')') + 2));
  } catch {
    return true;
  }
}

async function waitDead(pid: number, ms = 10_000): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (alive(pid)) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 25));
  }
  return true;
}

function portIsFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

async function sql<T extends object>(url: string, text: string): Promise<T[]> {
  const client = new Client({ connectionString: url });
  await client.connect();
  try {
    return (await client.query<T & Record<string, unknown>>(text)).rows;
  } finally {
    await client.end();
  }
}

async function withRedis<T>(url: string, fn: (r: Redis) => Promise<T>): Promise<T> {
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1 });
  await redis.connect();
  try {
    return await fn(redis);
  } finally {
    redis.disconnect();
  }
}

/** Sends `text` to the Redis on `port` and resolves with its first reply line. */
function redisRaw(port: number, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host: '127.0.0.1', port }, () => sock.write(text));
    let buf = '';
    sock.on('data', (d: Buffer) => {
      buf += d.toString();
      if (buf.includes('\r\n')) {
        sock.destroy();
        resolve(buf.slice(0, buf.indexOf('\r\n')));
      }
    });
    sock.once('error', reject);
  });
}

const pidOf = (s: LocalServices): { redis: number; pg: number } => {
  if (s.redisPid === undefined || s.pgPid === undefined) throw new Error('services are not running');
  return { redis: s.redisPid, pg: s.pgPid };
};

const MODULE = path.join(repoRoot(), 'dist', 'dev', 'servers', 'index.js');

/** A child process that calls startLocalServices on `go` and stops on `stop`, reporting as JSON lines. */
class Starter {
  readonly child;
  private readonly lines: Record<string, unknown>[] = [];
  private waiter: (() => void) | undefined;
  readonly exited: Promise<number | null>;

  constructor(dir: string, fresh: boolean) {
    const options = { dir, redis: true, postgres: true, fresh, fast: true };
    const script = `
      const { startLocalServices } = require(${JSON.stringify(MODULE)});
      const say = (o) => process.stdout.write(JSON.stringify({ pid: process.pid, ...o }) + '\\n');
      let services;
      require('node:readline').createInterface({ input: process.stdin }).on('line', (line) => {
        if (line === 'go') startLocalServices(${JSON.stringify(options)}).then(
          (s) => { services = s; say({ ok: true, redisUrl: s.redisUrl, databaseUrl: s.databaseUrl, redisPid: s.redisPid, pgPid: s.pgPid }); },
          (e) => { say({ ok: false, error: String(e && e.message) }); process.exit(1); });
        if (line === 'stop') services.stop().then(() => process.exit(0));
      });
      say({ loaded: true });`;
    this.child = spawn(process.execPath, ['-e', script], { stdio: ['pipe', 'pipe', 'inherit'] });
    this.exited = new Promise((resolve) => this.child.once('exit', (code) => resolve(code)));
    readline.createInterface({ input: this.child.stdout }).on('line', (line) => {
      this.lines.push(JSON.parse(line) as Record<string, unknown>);
      this.waiter?.();
    });
  }

  async next(): Promise<Record<string, unknown>> {
    while (this.lines.length === 0) {
      if (this.child.exitCode !== null) throw new Error(`starter exited with ${this.child.exitCode}`);
      await new Promise<void>((resolve) => {
        this.waiter = resolve;
        setTimeout(resolve, 100);
      });
    }
    return this.lines.shift() ?? {};
  }

  send(line: string): void {
    this.child.stdin.write(`${line}\n`);
  }
}

/** A process that sleeps, named `name` (its /proc/<pid>/comm), in `cwd`. */
function decoy(bin: string, cwd: string, argv0?: string): ReturnType<typeof spawn> {
  return spawn(bin, ['600'], { cwd, stdio: 'ignore', ...(argv0 ? { argv0 } : {}) });
}

function mode(file: string): string {
  return (fs.statSync(file).mode & 0o777).toString(8);
}

function credentials(dir: string): { redisPassword: string; postgresPassword: string; postgresAdminPassword: string } {
  return JSON.parse(fs.readFileSync(path.join(dir, 'credentials.json'), 'utf8')) as {
    redisPassword: string;
    postgresPassword: string;
    postgresAdminPassword: string;
  };
}

/** Does connecting to PostgreSQL at `url` with password `password` instead fail? */
async function pgRejects(url: string, password: string): Promise<boolean> {
  const u = new URL(url);
  u.password = password;
  return sql(u.toString(), 'SELECT 1').then(
    () => false,
    () => true,
  );
}

describe('local services (real redis-server and postgres)', function () {
  this.timeout(60_000);
  const root = repoRoot();
  let dir = '';
  let pgData = '';
  const running: LocalServices[] = [];
  const start = async (o: Partial<LocalServicesOptions> = {}): Promise<LocalServices> => {
    const s = await startLocalServices({ dir, redis: true, postgres: true, fresh: false, fast: true, ...o });
    running.push(s);
    return s;
  };

  before(() => {
    fs.mkdirSync(path.join(root, '.fleet'), { recursive: true });
    dir = fs.mkdtempSync(path.join(root, '.fleet', 'local-services-test-'));
    fs.chmodSync(dir, 0o755); // mkdtemp makes it 0700; this suite wants the normal, reachable case
  });

  after(async () => {
    await Promise.all(running.map((s) => s.stop()));
    fs.rmSync(dir, { recursive: true, force: true });
    if (pgData !== '' && !pgData.startsWith(dir)) fs.rmSync(path.dirname(pgData), { recursive: true, force: true });
  });

  it('starts both, configured as required, and stop() (twice) leaves nothing behind', async () => {
    const sighup = process.listenerCount('SIGHUP');
    const s = await start({ fresh: true });
    expect(process.listenerCount('SIGHUP'), 'SIGHUP is left to the application').to.equal(sighup);
    // passwords: generated, kept 0600 in credentials.json, carried by the URLs
    expect(mode(path.join(dir, 'credentials.json'))).to.equal('600');
    expect(mode(path.join(dir, 'redis.conf'))).to.equal('600');
    const creds = credentials(dir);
    expect(creds.redisPassword).to.match(/^[0-9a-f]{48}$/);
    expect(creds.postgresPassword).to.match(/^[0-9a-f]{48}$/);
    expect(s.redisUrl).to.equal(`redis://:${creds.redisPassword}@127.0.0.1:${s.redisPort}`);
    expect(s.databaseUrl).to.equal(`postgres://fleet:${creds.postgresPassword}@127.0.0.1:${s.pgPort}/fleet`);
    expect(fs.existsSync(path.join(dir, 'owner.lock'))).to.equal(true);
    // under a checkout the fleetpg user cannot traverse (root in a 0700 temp dir), the data lives outside it
    const location = path.join(dir, 'pg-location');
    pgData = fs.existsSync(location) ? fs.readFileSync(location, 'utf8').trim() : path.join(dir, 'pg');
    expect(s.pgDataDir).to.equal(pgData);
    const { redis: redisPid, pg: pgPid } = pidOf(s);
    const url = s.databaseUrl ?? '';

    expect(await sql<{ one: number }>(url, 'SELECT 1 AS one')).to.deep.equal([{ one: 1 }]);
    expect(await sql<{ fsync: string }>(url, 'SHOW fsync')).to.deep.equal([{ fsync: 'off' }]);
    expect(await sql<{ max_connections: string }>(url, 'SHOW max_connections')).to.deep.equal([{ max_connections: '200' }]);
    await sql(url, "CREATE TABLE persisted (v text); INSERT INTO persisted VALUES ('first run')");

    // without the password: refused by both
    expect(await pgRejects(url, 'wrong')).to.equal(true);
    expect(await pgRejects(url, '')).to.equal(true);
    expect(await redisRaw(s.redisPort ?? 0, 'GET x\r\n')).to.match(/^-NOAUTH/);
    // never on a command line nor in a log
    for (const pid of [redisPid, pgPid]) {
      const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      expect(cmdline).not.to.contain(creds.redisPassword);
      expect(cmdline).not.to.contain(creds.postgresPassword);
    }
    for (const log of ['redis.log', 'postgres.log', 'initdb.log']) {
      const text = fs.readFileSync(path.join(dir, log), 'utf8');
      expect(text).not.to.contain(creds.redisPassword);
      expect(text).not.to.contain(creds.postgresPassword);
    }

    await withRedis(s.redisUrl ?? '', async (r) => {
      expect(await r.ping()).to.equal('PONG');
      expect(await r.config('GET', 'appendonly')).to.deep.equal(['appendonly', 'yes']);
      expect(await r.config('GET', 'maxmemory-policy')).to.deep.equal(['maxmemory-policy', 'noeviction']);
      expect(await r.config('GET', 'bind')).to.deep.equal(['bind', '127.0.0.1']);
      await r.set('persisted', 'first run');
    });

    await s.stop();
    expect(alive(redisPid), 'redis-server still running').to.equal(false);
    expect(alive(pgPid), 'postmaster still running').to.equal(false);
    expect(await portIsFree(s.redisPort ?? 0)).to.equal(true);
    expect(await portIsFree(s.pgPort ?? 0)).to.equal(true);
    expect(fs.existsSync(path.join(dir, 'redis.pid'))).to.equal(false);
    expect(fs.existsSync(path.join(pgData, 'postmaster.pid'))).to.equal(false);
    expect(fs.existsSync(path.join(dir, 'owner.lock'))).to.equal(false);
    await s.stop(); // idempotent
    for (const log of ['redis.log', 'postgres.log', 'initdb.log']) expect(fs.existsSync(path.join(dir, log))).to.equal(true);
  });

  it('gives the servers a clean environment (no FLEET_*, no password, no token) and the fleet a role that is not a superuser', async () => {
    const planted = {
      FLEET_BOARD_PASSWORD: 'board-secret-4711',
      FLEET_API_TOKENS_FILE: '/etc/tokens-4711.json',
      PGPASSWORD: 'pg-secret-4711',
      SOME_API_TOKEN: 'token-4711',
    };
    const saved = Object.fromEntries(Object.keys(planted).map((k) => [k, process.env[k]]));
    Object.assign(process.env, planted);
    let s: LocalServices;
    try {
      s = await start();
    } finally {
      for (const [k, v] of Object.entries(saved)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
    try {
      // the postmaster and a backend (Redis overwrites its own environ with its title: nothing to read there)
      const client = new Client({ connectionString: s.databaseUrl });
      await client.connect();
      try {
        const backend = (await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]?.pid ?? 0;
        for (const pid of [pidOf(s).pg, backend]) {
          const environ = fs
            .readFileSync(`/proc/${pid}/environ`, 'utf8')
            .split('\0')
            .filter((e) => e !== '');
          expect(environ.join('\n')).to.not.match(/4711|FLEET_|PASSWORD|TOKEN/);
          // what postgres sets for itself (PG_GRANDPARENT_PID, PGLOCALEDIR, ...) besides the allow-list
          for (const name of environ.map((e) => e.slice(0, e.indexOf('='))))
            expect(name).to.match(/^(PATH|LANG|LANGUAGE|LC_[A-Z_]+|TZ|HOME|PG[A-Z_]*)$/);
        }
      } finally {
        await client.end();
      }

      // the fleet's role: owns its database, may make scratch databases (the test suite does), nothing more
      const url = s.databaseUrl ?? '';
      expect(
        await sql(url, `SELECT rolsuper, rolcreaterole, rolreplication, rolbypassrls, rolcreatedb FROM pg_roles WHERE rolname = current_user`),
      ).to.deep.equal([{ rolsuper: false, rolcreaterole: false, rolreplication: false, rolbypassrls: false, rolcreatedb: true }]);
      expect(await sql(url, `SELECT pg_get_userbyid(datdba) AS owner FROM pg_database WHERE datname = current_database()`)).to.deep.equal([
        { owner: 'fleet' },
      ]);
      for (const statement of [
        `SELECT pg_read_file('/proc/self/environ')`,
        `COPY (SELECT 1) TO PROGRAM 'env'`,
        `ALTER SYSTEM SET work_mem = '8MB'`,
        `CREATE ROLE intruder SUPERUSER`,
      ]) {
        const code = await sql(url, statement).then(
          () => 'ok',
          (err: { code?: string }) => err.code,
        );
        expect(code, statement).to.equal('42501'); // insufficient_privilege
      }
      // the administrator's URL, for setting up what the fleet may not (tests of other roles)
      expect(s.adminDatabaseUrl).to.equal(`postgres://fleet_admin:${credentials(dir).postgresAdminPassword}@127.0.0.1:${s.pgPort}/fleet`);
      expect(await sql(s.adminDatabaseUrl ?? '', `SELECT rolsuper FROM pg_roles WHERE rolname = current_user`)).to.deep.equal([{ rolsuper: true }]);
      expect(await sql<{ v: string }>(url, 'SELECT v FROM persisted')).to.deep.equal([{ v: 'first run' }]);
    } finally {
      await s.stop();
    }
  });

  it('turns a data directory whose fleet role is the superuser (made by an older version) into the same roles, keeping its data', async () => {
    const s = await start();
    const admin = s.adminDatabaseUrl ?? '';
    const creds = credentials(dir);
    // back to the old layout: the cluster's bootstrap superuser is `fleet`, owns everything, and is the fleet's login
    await sql(admin, `CREATE ROLE fleet_tmp SUPERUSER LOGIN PASSWORD '${scramVerifier('tmp-pw')}'`);
    const tmp = (db: string) => `postgres://fleet_tmp:tmp-pw@127.0.0.1:${s.pgPort}/${db}`;
    await sql(tmp('fleet'), `REASSIGN OWNED BY fleet TO fleet_admin`);
    await sql(tmp('postgres'), `ALTER DATABASE fleet OWNER TO fleet_admin`);
    await sql(tmp('postgres'), `DROP ROLE fleet`);
    await sql(tmp('postgres'), `ALTER ROLE fleet_admin RENAME TO fleet`);
    await sql(tmp('postgres'), `ALTER ROLE fleet PASSWORD '${scramVerifier(creds.postgresPassword)}'`);
    await sql(s.databaseUrl ?? '', `DROP ROLE fleet_tmp`);
    expect(await sql(s.databaseUrl ?? '', `SELECT rolsuper FROM pg_roles WHERE rolname = current_user`)).to.deep.equal([{ rolsuper: true }]);
    await s.stop();
    fs.rmSync(path.join(pgData, 'fleet-roles.done')); // what an older version did not write

    const again = await start();
    try {
      const url = again.databaseUrl ?? '';
      expect(url).to.equal(`postgres://fleet:${creds.postgresPassword}@127.0.0.1:${again.pgPort}/fleet`); // the same URL
      expect(await sql(url, `SELECT rolsuper FROM pg_roles WHERE rolname = current_user`)).to.deep.equal([{ rolsuper: false }]);
      expect(await sql(again.adminDatabaseUrl ?? '', `SELECT rolname FROM pg_roles WHERE rolsuper ORDER BY rolname`)).to.deep.equal([
        { rolname: 'fleet_admin' },
      ]);
      // its data, now its own: readable, writable, alterable
      await sql(url, `INSERT INTO persisted VALUES ('converted'); ALTER TABLE persisted ADD COLUMN n int; ALTER TABLE persisted DROP COLUMN n`);
      expect(await sql<{ v: string }>(url, 'SELECT v FROM persisted ORDER BY v')).to.deep.equal([{ v: 'converted' }, { v: 'first run' }]);
      await sql(url, `DELETE FROM persisted WHERE v = 'converted'`);
      expect(fs.existsSync(path.join(pgData, 'fleet-roles.done'))).to.equal(true);
    } finally {
      await again.stop();
    }
  });

  it('supervised (fleet start): restarts a server that died, a bounded number of times, then gives up with one line', async () => {
    const said: string[] = [];
    let gaveUp: string | undefined;
    const s = await start({
      postgres: false,
      log: (m) => said.push(m),
      supervise: { maxRestarts: 1, withinMs: 60_000, onGiveUp: (why) => (gaveUp = why) },
    });
    try {
      // private files: the AOF holds job payloads
      const redisDir = path.join(dir, 'redis');
      await waitFor('the AOF to be written', () => (fs.existsSync(path.join(redisDir, 'appendonlydir')) ? true : undefined));
      expect(fs.statSync(redisDir).mode & 0o777).to.equal(0o700);
      expect(fs.statSync(path.join(redisDir, 'appendonlydir')).mode & 0o777).to.equal(0o700);
      for (const f of fs.readdirSync(path.join(redisDir, 'appendonlydir'))) {
        expect(fs.statSync(path.join(redisDir, 'appendonlydir', f)).mode & 0o777, f).to.equal(0o600);
      }

      const first = s.redisPid;
      if (first === undefined) throw new Error('no redis pid');
      process.kill(first, 'SIGKILL');
      await waitFor('redis-server restarted', () => (said.includes('redis-server is back') ? true : undefined));
      expect(said.filter((m) => m.startsWith('restarting redis-server'))).to.deep.equal(['restarting redis-server (1 of at most 1 within 60 s)']);
      expect(s.redisPid).to.not.equal(first);
      const probe = new Redis(s.redisUrl ?? '', { maxRetriesPerRequest: 1 });
      try {
        expect(await probe.ping()).to.equal('PONG'); // the same URL (port and password) works again
      } finally {
        probe.disconnect();
      }

      process.kill(s.redisPid ?? -1, 'SIGKILL');
      await waitFor('the supervisor to give up', () => gaveUp);
      expect(gaveUp).to.match(/^redis-server died 2 times within 60 s \(last: killed by SIGKILL\); see /);
    } finally {
      await s.stop();
    }
  });

  it('supervised: a SIGKILLed postmaster is restarted too, on the same URL', async () => {
    const said: string[] = [];
    const s = await start({ redis: false, log: (m) => said.push(m), supervise: { maxRestarts: 1, withinMs: 60_000, onGiveUp: () => undefined } });
    try {
      const first = s.pgPid;
      if (first === undefined) throw new Error('no postmaster pid');
      process.kill(first, 'SIGKILL');
      await waitFor('postgres restarted', () => (said.includes('postgres is back') ? true : undefined));
      const client = new Client({ connectionString: s.databaseUrl });
      await client.connect();
      try {
        expect((await client.query<{ one: number }>('SELECT 1 AS one')).rows[0]?.one).to.equal(1);
      } finally {
        await client.end();
      }
    } finally {
      await s.stop();
    }
  });

  it('reuses the data and the passwords on the next start, and is not blocked by SIGKILLed servers', async () => {
    const creds = credentials(dir);
    const s = await start();
    expect(credentials(dir)).to.deep.equal(creds);
    expect(s.databaseUrl).to.equal(`postgres://fleet:${creds.postgresPassword}@127.0.0.1:${s.pgPort}/fleet`);
    expect(await sql<{ v: string }>(s.databaseUrl ?? '', 'SELECT v FROM persisted')).to.deep.equal([{ v: 'first run' }]);
    expect(await withRedis(s.redisUrl ?? '', (r) => r.get('persisted'))).to.equal('first run');

    // crash both servers, leaving their pid files behind
    const pids = pidOf(s);
    process.kill(pids.pg, 'SIGKILL');
    process.kill(pids.redis, 'SIGKILL');
    expect(await waitDead(pids.pg)).to.equal(true);
    expect(await waitDead(pids.redis)).to.equal(true);
    await s.stop();
    expect(fs.existsSync(path.join(pgData, 'postmaster.pid'))).to.equal(true);
    expect(fs.existsSync(path.join(dir, 'redis.pid'))).to.equal(true);

    const again = await start();
    expect(await sql<{ v: string }>(again.databaseUrl ?? '', 'SELECT v FROM persisted')).to.deep.equal([{ v: 'first run' }]);
    expect(await withRedis(again.redisUrl ?? '', (r) => r.get('persisted'))).to.equal('first run');
    await again.stop();
  });

  it('stops servers left running by a parent process that was SIGKILLed', async () => {
    const script = `require(${JSON.stringify(MODULE)})
      .startLocalServices({ dir: ${JSON.stringify(dir)}, redis: true, postgres: true, fresh: false, fast: true })
      .then((s) => { console.log(JSON.stringify({ redis: s.redisPid, pg: s.pgPid })); setInterval(() => {}, 1000); },
            (e) => { console.error(e); process.exit(1); });`;
    const parent = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    const line = await new Promise<string>((resolve, reject) => {
      let out = '';
      parent.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes('\n')) resolve(out);
      });
      parent.once('exit', (code) => reject(new Error(`child exited with ${code}`)));
    });
    const orphans = JSON.parse(line) as { redis: number; pg: number };
    parent.kill('SIGKILL');
    await new Promise((r) => parent.once('exit', r));
    expect(alive(orphans.redis) && alive(orphans.pg), 'servers survive their parent').to.equal(true);

    const s = await start();
    expect(alive(orphans.redis), 'old redis-server still running').to.equal(false);
    expect(alive(orphans.pg), 'old postmaster still running').to.equal(false);
    expect(await sql<{ v: string }>(s.databaseUrl ?? '', 'SELECT v FROM persisted')).to.deep.equal([{ v: 'first run' }]);
    await s.stop();
  });

  it('on SIGTERM (nobody else listening) stops its servers, then dies of the signal', async () => {
    const script = `require(${JSON.stringify(MODULE)})
      .startLocalServices({ dir: ${JSON.stringify(dir)}, redis: true, postgres: true, fresh: false, fast: true })
      .then((s) => { console.log(JSON.stringify({ redis: s.redisPid, pg: s.pgPid })); setInterval(() => {}, 1000); },
            (e) => { console.error(e); process.exit(1); });`;
    const parent = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    const exited = new Promise<NodeJS.Signals | null>((resolve) => parent.once('exit', (_code, sig) => resolve(sig)));
    const line = await new Promise<string>((resolve, reject) => {
      parent.stdout.once('data', (d: Buffer) => resolve(d.toString()));
      parent.once('exit', (code) => reject(new Error(`child exited with ${code}`)));
    });
    const pids = JSON.parse(line) as { redis: number; pg: number };
    parent.kill('SIGTERM');
    expect(await exited).to.equal('SIGTERM');
    expect(alive(pids.redis) || alive(pids.pg), 'servers outlived SIGTERM').to.equal(false);
    expect(fs.existsSync(path.join(dir, 'owner.lock'))).to.equal(false);
  });

  it('stops only its own servers: look-alikes in its directories are left alone', async () => {
    const redisDir = path.join(dir, 'redis');
    const bin = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-decoys-'));
    const decoys: ReturnType<typeof spawn>[] = [];
    try {
      for (const name of ['redis-server', 'postgres']) {
        fs.copyFileSync(['/bin/sleep', '/usr/bin/sleep'].find((f) => fs.existsSync(f)) ?? 'sleep', path.join(bin, name));
        fs.chmodSync(path.join(bin, name), 0o755);
      }
      const idle = ['-e', 'setInterval(() => {}, 1000)', '--'];
      // the old matching (cmdline mentions redis/postgres, cwd is the dir) killed all of these
      decoys.push(spawn(process.execPath, [...idle, 'redis-cli', '--dir', redisDir], { cwd: redisDir, stdio: 'ignore' }));
      decoys.push(spawn(process.execPath, [...idle, 'vim', 'postgresql.conf', '-D', pgData], { cwd: pgData, stdio: 'ignore' }));
      // named exactly like the servers, and even in their pid files, but not running with our config / data dir
      const fakeRedis = decoy(path.join(bin, 'redis-server'), redisDir);
      const fakePostmaster = decoy(path.join(bin, 'postgres'), pgData);
      decoys.push(fakeRedis, fakePostmaster);
      // titled like a backend, but not run by the data directory's owner (only distinguishable when we are root)
      if (process.getuid?.() === 0) decoys.push(decoy(path.join(bin, 'postgres'), pgData, 'postgres: fleet fleet idle'));
      await new Promise((r) => setTimeout(r, 300));
      fs.writeFileSync(path.join(dir, 'redis.pid'), `${fakeRedis.pid}\n`);
      fs.writeFileSync(path.join(pgData, 'postmaster.pid'), `${fakePostmaster.pid}\n${pgData}\n`);
      for (const d of decoys) expect(alive(d.pid ?? -1), 'decoy started').to.equal(true);

      const s = await start();
      expect(await sql<{ v: string }>(s.databaseUrl ?? '', 'SELECT v FROM persisted')).to.deep.equal([{ v: 'first run' }]);
      for (const d of decoys) expect(alive(d.pid ?? -1), `decoy ${String(d.spawnargs.join(' '))} was killed`).to.equal(true);
      await s.stop();
      for (const d of decoys) expect(alive(d.pid ?? -1), 'decoy killed by stop()').to.equal(true);
    } finally {
      for (const d of decoys) d.kill('SIGKILL');
      fs.rmSync(bin, { recursive: true, force: true });
    }
  });

  it('of two concurrent starts in one directory exactly one wins; the other fails and leaves it alone', async function () {
    this.timeout(180_000);
    fs.mkdirSync(path.join(root, '.fleet'), { recursive: true });
    const raceDir = fs.mkdtempSync(path.join(root, '.fleet', 'local-services-race-'));
    fs.chmodSync(raceDir, 0o755);
    const starters: Starter[] = [];
    try {
      for (let round = 1; round <= 3; round++) {
        const pair = [new Starter(raceDir, true), new Starter(raceDir, true)];
        starters.push(...pair);
        for (const st of pair) expect((await st.next())['loaded']).to.equal(true);
        for (const st of pair) st.send('go'); // as close together as it gets
        const results = await Promise.all(pair.map((st) => st.next()));
        const winners = results.filter((r) => r['ok'] === true);
        expect(winners, JSON.stringify(results.map((r) => r['error']))).to.have.length(1);
        const won = winners[0] ?? {};
        const lost = results.find((r) => r['ok'] !== true) ?? {};
        expect(String(lost['error'])).to.contain(`in use by process ${String(won['pid'])}`);
        const loser = pair[results.indexOf(lost)];
        const winner = pair[results.indexOf(won)];
        expect(await loser?.exited).to.equal(1);

        // the loser touched nothing: the winner's servers still run and serve
        expect(alive(Number(won['redisPid'])) && alive(Number(won['pgPid']))).to.equal(true);
        expect(await sql<{ one: number }>(String(won['databaseUrl']), 'SELECT 1 AS one')).to.deep.equal([{ one: 1 }]);
        expect(await withRedis(String(won['redisUrl']), (r) => r.ping())).to.equal('PONG');

        winner?.send('stop');
        expect(await winner?.exited).to.equal(0);
        expect(alive(Number(won['redisPid'])) || alive(Number(won['pgPid']))).to.equal(false);
        expect(fs.existsSync(path.join(raceDir, 'owner.lock'))).to.equal(false);
      }
    } finally {
      for (const st of starters) st.child.kill('SIGKILL');
      await Promise.all(starters.map((st) => st.exited));
      // SIGKILLed starters may have left servers: a last start-and-stop cleans them up
      await startLocalServices({ dir: raceDir, redis: false, postgres: false, fresh: false, fast: true }).then(
        (s) => s.stop(),
        () => undefined,
      );
      const location = path.join(raceDir, 'pg-location');
      if (fs.existsSync(location)) fs.rmSync(path.dirname(fs.readFileSync(location, 'utf8').trim()), { recursive: true, force: true });
      fs.rmSync(raceDir, { recursive: true, force: true });
    }
  });

  it('takes over the lock of a dead process, but not that of a live one', async () => {
    const lock = path.join(dir, 'owner.lock');
    const gone = spawn(process.execPath, ['-e', '0']);
    await new Promise((r) => gone.once('exit', r));
    fs.writeFileSync(lock, JSON.stringify({ pid: gone.pid, start: null, token: 'stale' }));
    const s = await start({ redis: false });
    expect(JSON.parse(fs.readFileSync(lock, 'utf8'))).to.include({ pid: process.pid });
    await s.stop();
    expect(fs.existsSync(lock)).to.equal(false);

    // an empty lock file (its writer died between creating and writing it), old enough
    fs.writeFileSync(lock, '');
    fs.utimesSync(lock, new Date(Date.now() - 60_000), new Date(Date.now() - 60_000));
    await (await start({ redis: false, postgres: false })).stop();

    const holder = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)']);
    try {
      const held = JSON.stringify({ pid: holder.pid, start: null, token: 'live' });
      fs.writeFileSync(lock, held);
      let err: unknown;
      await start().catch((e: unknown) => (err = e));
      expect(String(err)).to.contain(`in use by process ${holder.pid}`);
      expect(fs.readFileSync(lock, 'utf8')).to.equal(held);
    } finally {
      holder.kill('SIGKILL');
      fs.rmSync(lock, { force: true });
    }
  });

  it('switches a data directory made with --auth=trust (no credentials.json) to passwords', async () => {
    const hba = path.join(pgData, 'pg_hba.conf');
    const trust = ['local all all trust', 'host all all 127.0.0.1/32 trust', 'host all all ::1/128 trust', ''].join('\n');
    fs.writeFileSync(hba, trust); // keeps the file's owner
    const old = credentials(dir);
    fs.rmSync(path.join(dir, 'credentials.json'));

    const s = await start();
    const creds = credentials(dir);
    expect(creds.postgresPassword).not.to.equal(old.postgresPassword);
    expect(mode(path.join(dir, 'credentials.json'))).to.equal('600');
    expect(s.databaseUrl).to.equal(`postgres://fleet:${creds.postgresPassword}@127.0.0.1:${s.pgPort}/fleet`);
    expect(fs.readFileSync(hba, 'utf8')).not.to.match(/^host.*trust/m);
    expect(mode(hba)).to.equal('600');
    expect(await pgRejects(s.databaseUrl ?? '', 'wrong')).to.equal(true);
    expect(await sql<{ v: string }>(s.databaseUrl ?? '', 'SELECT v FROM persisted')).to.deep.equal([{ v: 'first run' }]);
    expect(fs.readFileSync(path.join(dir, 'postgres.log'), 'utf8')).not.to.contain(creds.postgresPassword);
    await s.stop();

    // the next start needs no switching and uses the same password
    const again = await start();
    expect(credentials(dir)).to.deep.equal(creds);
    expect(await sql<{ v: string }>(again.databaseUrl ?? '', 'SELECT v FROM persisted')).to.deep.equal([{ v: 'first run' }]);
    await again.stop();
  });

  it('refuses to start a password-protected PostgreSQL whose credentials.json is gone', async () => {
    const file = path.join(dir, 'credentials.json');
    const saved = fs.readFileSync(file, 'utf8');
    fs.rmSync(file);
    try {
      let err: unknown;
      await start().catch((e: unknown) => (err = e));
      expect(String(err)).to.match(/requires a password, but .*credentials\.json was missing/);
      expect(fs.existsSync(path.join(dir, 'owner.lock'))).to.equal(false);
    } finally {
      fs.writeFileSync(file, saved, { mode: 0o600 });
    }
    const s = await start();
    expect(await sql<{ v: string }>(s.databaseUrl ?? '', 'SELECT v FROM persisted')).to.deep.equal([{ v: 'first run' }]);
    await s.stop();
  });

  it('keeps PostgreSQL data outside a directory the fleetpg user cannot traverse (root only)', async function () {
    if (process.getuid?.() !== 0) this.skip();
    const privateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-private-')); // 0700, root-owned
    let external = '';
    try {
      const s = await startLocalServices({ dir: privateDir, redis: false, postgres: true, fresh: true, fast: true });
      running.push(s);
      external = s.pgDataDir ?? '';
      expect(s.redisUrl).to.equal(undefined);
      expect(external.startsWith(privateDir)).to.equal(false);
      expect(fs.readFileSync(path.join(privateDir, 'pg-location'), 'utf8').trim()).to.equal(external);
      expect((fs.statSync(privateDir).mode & 0o777).toString(8)).to.equal('700'); // not chmodded
      await sql(s.databaseUrl ?? '', 'CREATE TABLE kept (v int)');
      await s.stop();

      const again = await startLocalServices({ dir: privateDir, redis: false, postgres: true, fresh: false, fast: true });
      running.push(again);
      expect(again.pgDataDir).to.equal(external);
      expect(await sql(again.databaseUrl ?? '', 'SELECT * FROM kept')).to.deep.equal([]);
      await again.stop();
    } finally {
      fs.rmSync(privateDir, { recursive: true, force: true });
      if (external) fs.rmSync(path.dirname(external), { recursive: true, force: true });
    }
  });
});
