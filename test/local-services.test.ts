// Integration test of src/local/services.ts against the real redis-server and PostgreSQL binaries.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Redis } from 'ioredis';
import { Client } from 'pg';
import { startLocalServices } from '../src/local/services';
import type { LocalServices, LocalServicesOptions } from '../src/local/services';

function repoRoot(): string {
  for (let d = __dirname; ; d = path.dirname(d)) {
    if (fs.existsSync(path.join(d, 'package.json'))) return d;
    if (path.dirname(d) === d) throw new Error('no package.json found');
  }
}

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

const pidOf = (s: LocalServices): { redis: number; pg: number } => {
  if (s.redisPid === undefined || s.pgPid === undefined) throw new Error('services are not running');
  return { redis: s.redisPid, pg: s.pgPid };
};

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
    const s = await start({ fresh: true });
    expect(s.redisUrl).to.match(/^redis:\/\/127\.0\.0\.1:\d+$/);
    expect(s.databaseUrl).to.equal(`postgres://fleet@127.0.0.1:${s.pgPort}/fleet`);
    // under a checkout the fleetpg user cannot traverse (root in a 0700 temp dir), the data lives outside it
    const location = path.join(dir, 'pg-location');
    pgData = fs.existsSync(location) ? fs.readFileSync(location, 'utf8').trim() : path.join(dir, 'pg');
    expect(s.pgDataDir).to.equal(pgData);
    const { redis: redisPid, pg: pgPid } = pidOf(s);
    const url = s.databaseUrl ?? '';

    expect(await sql<{ one: number }>(url, 'SELECT 1 AS one')).to.deep.equal([{ one: 1 }]);
    expect(await sql<{ fsync: string }>(url, 'SHOW fsync')).to.deep.equal([{ fsync: 'off' }]);
    expect(await sql<{ max_connections: string }>(url, 'SHOW max_connections')).to.deep.equal([
      { max_connections: '200' },
    ]);
    await sql(url, "CREATE TABLE persisted (v text); INSERT INTO persisted VALUES ('first run')");

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
    await s.stop(); // idempotent
    for (const log of ['redis.log', 'postgres.log', 'initdb.log']) expect(fs.existsSync(path.join(dir, log))).to.equal(true);
  });

  it('reuses the data on the next start, and is not blocked by SIGKILLed servers', async () => {
    const s = await start();
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
    expect(await sql<{ v: string }>(again.databaseUrl ?? '', 'SELECT v FROM persisted')).to.deep.equal([
      { v: 'first run' },
    ]);
    expect(await withRedis(again.redisUrl ?? '', (r) => r.get('persisted'))).to.equal('first run');
    await again.stop();
  });

  it('stops servers left running by a parent process that was SIGKILLed', async () => {
    const modulePath = path.join(__dirname, '..', 'src', 'local', 'services.js');
    const script = `require(${JSON.stringify(modulePath)})
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
