/**
 * Outages as a client meets them (issue 15): the HTTP intake when Redis does not answer.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as net from 'node:net';
import * as path from 'node:path';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import { startFleet } from '../../src/app';
import { loadConfig } from '../../src/config';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { createRedis, describeServer, ServerWatch } from '../../src/redis/connection';
import { TransitionService } from '../../src/services/transitions';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { freePort } from '../helpers/net';
import { OwnRedis } from '../helpers/redis-server';
import { dropPrefix, uniquePrefix } from '../helpers/redis';
import { TcpProxy } from '../helpers/proxy';
import { testEnv } from '../helpers/env';
import { createDataSource } from '../../src/entities/schema/data-source';
import { Sweeper } from '../../src/services/sweep/sweeper';
import { createLogger } from '../../src/log';
import { waitFor } from '../helpers/wait';
import { repoRoot } from '../../src/util';
import { testHttpServer } from '../helpers/http';
import { Database } from '../../src/entities/sql/runner';
import { plain } from '../../src/entities/sql/statement';
import { isTransient } from '../../src/errors';

describe('outages: the HTTP intake when Redis does not answer', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let own: OwnRedis;

  before(async () => {
    db = await openTestDatabase(8);
    own = await OwnRedis.start();
  });
  after(async () => {
    await own?.stop();
    await db?.close();
  });

  it('answers 503 with Retry-After and the eventId to retry with; the retry with that id applies the event exactly once', async () => {
    const prefix = uniquePrefix();
    const producer = new LifecycleProducer({ connection: own.url, prefix });
    const redis = createRedis(own.url, 'worker');
    const maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix });
    const app: FastifyInstance = await testHttpServer({ prefix, dataSource: db.dataSource, producer, redis, maintenance });
    const service = new TransitionService({ dataSource: db.dataSource });
    const deploymentId = randomUUID();
    await service.apply('deployment.create', { deploymentId, name: 'web', eventId: `c-${deploymentId}` });
    // a teardown without an eventId gets a random one: a blind retry would be another event
    const body = { name: 'deployment.teardown', data: { deploymentId } };
    let worker: LifecycleWorker | undefined;
    try {
      await producer.queue.waitUntilReady();
      own.pause();
      const first = await app.inject({ method: 'POST', url: '/api/events', payload: body });
      own.resume();
      expect(first.statusCode, first.body).to.equal(503);
      expect(first.headers['retry-after']).to.equal('5');
      const error = first.json<{ error: { code: string; message: string; eventId: string } }>().error;
      expect(error.code).to.equal('unavailable');
      expect(error.eventId).to.match(/^deployment\.teardown\.[0-9a-f-]{36}$/);
      expect(error.message).to.include(error.eventId).and.include('at most once');

      // the paused server ran the first add when it woke; the retry with the returned id is the same job
      const retry = await app.inject({ method: 'POST', url: '/api/events', payload: { ...body, data: { ...body.data, eventId: error.eventId } } });
      expect(retry.statusCode, retry.body).to.equal(202);
      expect(retry.json()).to.include({ eventId: error.eventId });

      worker = new LifecycleWorker({ connection: own.url, prefix, service });
      await waitFor('the teardown applied', async () => {
        const rows = await db.dataSource.query<Array<{ n: string }>>(
          `SELECT count(*) AS n FROM state_transitions WHERE deployment_id = $1 AND reason = 'torn_down'`,
          [deploymentId],
        );
        return Number(rows[0]?.n) > 0 ? true : undefined;
      });
      await waitFor('the queue drained', async () =>
        (await producer.queue.getJobCountByTypes('wait', 'active', 'delayed')) === 0 ? true : undefined,
      );
      const teardowns = await db.dataSource.query<Array<{ event_id: string }>>(
        `SELECT event_id FROM state_transitions WHERE deployment_id = $1 AND version > 1`,
        [deploymentId],
      );
      expect(teardowns.map((t) => t.event_id)).to.deep.equal([error.eventId]); // applied once, under the returned id
    } finally {
      own.resume();
      await worker?.close();
      await app.close();
      await maintenance.close();
      await producer.close();
      redis.disconnect();
    }
  });
});

describe('outages: fleet tail when Redis goes away', function () {
  this.timeout(60_000);
  let own: OwnRedis;
  let db: TestDatabase;
  before(async () => {
    own = await OwnRedis.start();
    db = await openTestDatabase(2);
  });
  after(async () => {
    await own?.stop();
    await db?.close();
  });

  function startTail(
    prefix: string,
    args: string[] = [],
    redisUrl = own.url,
  ): { child: ChildProcess; out: () => string; err: () => string; exited: Promise<number | null> } {
    const child = spawn(process.execPath, [path.join(repoRoot(), 'bin', 'fleet.js'), 'tail', ...args], {
      env: { PATH: process.env.PATH, REDIS_URL: redisUrl, DATABASE_URL: db.url, FLEET_PREFIX: prefix },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout?.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr?.on('data', (c: Buffer) => (err += c.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    return { child, out: () => out, err: () => err, exited };
  }

  async function append(prefix: string, version: number): Promise<void> {
    const redis = createRedis(own.url, 'producer');
    try {
      const fields = {
        type: 'state_transition',
        transitionId: String(version),
        deploymentId: randomUUID(),
        attemptId: '',
        from: '',
        to: 'pending',
        version: String(version),
        reason: 'created',
        eventId: `e${version}`,
        at: new Date().toISOString(),
        actor: 'test',
      };
      await redis.xadd(`${prefix}:transitions`, '*', ...Object.entries(fields).flat());
    } finally {
      redis.disconnect();
    }
  }

  it('says once that Redis is lost and once that it is back (no stack, no "Unhandled error event"), and stops on the first SIGTERM while Redis is down', async () => {
    const prefix = uniquePrefix();
    const tail = startTail(prefix);
    try {
      await waitFor('the tail to print an entry', async () => {
        await append(prefix, 1);
        return tail.out().includes('v1') ? true : undefined;
      });
      await own.kill('SIGKILL');
      await waitFor('the loss reported', () => (tail.err().includes('lost Redis') ? true : undefined));
      await own.restart();
      await waitFor('the recovery reported', () => (tail.err().includes('is back') ? true : undefined));
      await own.kill('SIGKILL');
      await waitFor('the second loss reported', () => (tail.err().split('lost Redis').length === 3 ? true : undefined));
      const stoppedAt = Date.now();
      tail.child.kill('SIGTERM');
      expect(await tail.exited).to.equal(0);
      process.stdout.write(`      (tail exited ${Date.now() - stoppedAt} ms after SIGTERM with Redis down)\n`);
      const lines = tail.err().trim().split('\n');
      // then, as any tail without a group that stops, where to resume from (issue 29: an opaque cursor)
      const cursor = lines.pop();
      expect(cursor).to.match(/^fleet tail: to resume every partition from here: --from [A-Za-z0-9_-]+=*$/);
      expect(lines).to.deep.equal([
        `fleet tail: lost Redis at 127.0.0.1:${own.port}, retrying`,
        `fleet tail: Redis at 127.0.0.1:${own.port} is back`,
        `fleet tail: lost Redis at 127.0.0.1:${own.port}, retrying`,
      ]);
    } finally {
      tail.child.kill('SIGKILL');
      await own.restart();
    }
  });

  /**
   * Sends one SIGTERM and waits for the exit, generously: a tail that needed a second signal is still running when
   * the wait ends. The stop's bound (2 s) is the tail's own (a forced exit, which says so on stderr), not measured
   * here; the time is printed.
   */
  async function stopWithOneSignal(tail: { child: ChildProcess; exited: Promise<number | null> }, what: string): Promise<number | null> {
    const sent = Date.now();
    tail.child.kill('SIGTERM');
    const code = await Promise.race([tail.exited, new Promise<'running'>((resolve) => setTimeout(() => resolve('running'), 30_000).unref())]);
    if (code === 'running') throw new Error(`fleet tail (${what}) was still running 30 s after one SIGTERM`);
    process.stdout.write(`      (${what}: exited ${Date.now() - sent} ms after one SIGTERM)\n`);
    return code;
  }

  it('stops on the first SIGTERM while Redis is frozen, mid-read, with or without a group', async () => {
    for (const args of [[], ['--group', 'frozen', '--from', '0']]) {
      const prefix = uniquePrefix();
      const tail = startTail(prefix, args);
      try {
        await waitFor('the tail to print an entry', async () => {
          await append(prefix, 1);
          return tail.out().includes('v1') ? true : undefined;
        });
        own.pause(); // SIGSTOP: the connection stays open, nothing answers
        expect(await stopWithOneSignal(tail, `frozen Redis, ${args.length === 0 ? 'no group' : 'a group'}`)).to.equal(0);
      } finally {
        own.resume();
        tail.child.kill('SIGKILL');
      }
    }
  });

  it('stops on the first SIGTERM while it waits for a Redis that accepts connections and never answers', async () => {
    const proxy = new TcpProxy('127.0.0.1', own.port);
    const port = await proxy.listen();
    proxy.stall();
    const tail = startTail(uniquePrefix(), [], `redis://127.0.0.1:${port}`);
    try {
      await waitFor('the tail to connect', () => (proxy.accepted > 0 ? true : undefined));
      expect(await stopWithOneSignal(tail, 'a Redis that never answered')).to.equal(0);
      // it stopped by itself: it waited for no answer (the forced exit, 2 s after the signal, was not needed)
      expect(tail.err()).to.equal('');
    } finally {
      tail.child.kill('SIGKILL');
      await proxy.close();
    }
  });

  it('says so and exits 4 when Redis cannot be reached at start, like fleet enqueue', async () => {
    const closed = await freePort();
    const refused = startTail(uniquePrefix(), [], `redis://:secret-pw@127.0.0.1:${closed}`);
    own.pause();
    const frozen = startTail(uniquePrefix(), ['--group', 'g']);
    try {
      expect(await refused.exited).to.equal(4);
      expect(refused.err()).to.equal(`fleet: Redis at 127.0.0.1:${closed} is unreachable (no connection)\n`);
      expect(refused.out()).to.equal('');
      expect(await frozen.exited).to.equal(4);
      expect(frozen.err()).to.equal(`fleet: Redis at 127.0.0.1:${own.port} is unreachable (no answer in time)\n`);
    } finally {
      own.resume();
      refused.child.kill('SIGKILL');
      frozen.child.kill('SIGKILL');
    }
  });

  it('ends quietly with exit code 0 when its stdout is closed (fleet tail | head -1)', async () => {
    const prefix = uniquePrefix();
    const tail = startTail(prefix);
    await waitFor('the tail to print an entry', async () => {
      await append(prefix, 1);
      return tail.out().includes('v1') ? true : undefined;
    });
    tail.child.stdout?.destroy(); // the reader went away
    await append(prefix, 2); // the next write meets a closed pipe
    await append(prefix, 3);
    expect(await tail.exited).to.equal(0);
    expect(tail.err()).to.equal('');
  });
});

describe('outages: short commands fail fast with one line and exit code 4', function () {
  this.timeout(60_000);
  let own: OwnRedis;
  before(async () => {
    own = await OwnRedis.start();
  });
  after(async () => {
    await own?.stop();
  });

  function fleet(args: string[], env: Record<string, string>): Promise<{ code: number | null; stdout: string; stderr: string; ms: number }> {
    const started = Date.now();
    return new Promise((resolve) => {
      const child = execFile(
        process.execPath,
        [path.join(repoRoot(), 'bin', 'fleet.js'), ...args],
        { env: { PATH: process.env.PATH, ...env }, timeout: 30_000 },
        (_err, stdout, stderr) => resolve({ code: child.exitCode, stdout, stderr, ms: Date.now() - started }),
      );
    });
  }

  it('names the unreachable server (never its password) for enqueue, status and migrate', async () => {
    const closed = await freePort();
    const env = { REDIS_URL: `redis://:secret-pw@127.0.0.1:${closed}`, DATABASE_URL: `postgres://fleet:secret-pw@127.0.0.1:${closed}/fleet` };
    const payload = JSON.stringify({ deploymentId: randomUUID(), name: 'web' });
    const runs = {
      enqueue: await fleet(['enqueue', 'deployment.create', payload], env),
      status: await fleet(['status', randomUUID()], env),
      migrate: await fleet(['migrate'], env),
    };
    expect(runs.enqueue.stderr).to.equal(`fleet: Redis at 127.0.0.1:${closed} is unreachable (no connection)\n`);
    expect(runs.status.stderr).to.equal(`fleet: PostgreSQL at 127.0.0.1:${closed} is unreachable (ECONNREFUSED)\n`);
    expect(runs.migrate.stderr).to.equal(`fleet: PostgreSQL at 127.0.0.1:${closed} is unreachable (ECONNREFUSED)\n`);
    for (const [name, run] of Object.entries(runs)) {
      expect(run.code, name).to.equal(4);
      expect(run.stdout, name).to.equal('');
      process.stdout.write(`      (${name}: exit 4 after ${run.ms} ms)\n`);
    }
  });

  it('fleet worker and fleet http that cannot reach a server at start say which, with exit code 4', async () => {
    const closed = await freePort();
    const db = await openTestDatabase(2);
    try {
      const redisDown = await fleet(['worker'], { REDIS_URL: `redis://:pw@127.0.0.1:${closed}`, DATABASE_URL: db.url, FLEET_PREFIX: uniquePrefix() });
      expect(redisDown.stderr.trim().split('\n').pop()).to.equal(`fleet: Redis at 127.0.0.1:${closed} is unreachable (no connection)`);
      expect(redisDown.code).to.equal(4);
      const pgDown = await fleet(['http'], {
        REDIS_URL: own.url,
        DATABASE_URL: `postgres://fleet:pw@127.0.0.1:${closed}/fleet`,
        FLEET_PREFIX: uniquePrefix(),
        FLEET_HTTP_PORT: '0',
      });
      expect(pgDown.stderr.trim().split('\n').pop()).to.equal(`fleet: PostgreSQL at 127.0.0.1:${closed} is unreachable (ECONNREFUSED)`);
      expect(pgDown.code).to.equal(4);
      expect(redisDown.stdout + redisDown.stderr + pgDown.stdout + pgDown.stderr).to.not.include('pw@');
    } finally {
      await db.close();
    }
  });

  it('fleet start checks its HTTP port before it starts anything, and names the variable to set', async () => {
    const taken = net.createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    const port = (taken.address() as net.AddressInfo).port;
    try {
      const closed = await freePort(); // were anything started first, these unreachable servers would be what failed
      const run = await fleet(['start'], {
        REDIS_URL: `redis://127.0.0.1:${closed}`,
        DATABASE_URL: `postgres://fleet:x@127.0.0.1:${closed}/fleet`,
        FLEET_HTTP_PORT: String(port),
      });
      expect(run.stderr).to.equal(`fleet: port ${port} on 127.0.0.1 is in use: set FLEET_HTTP_PORT (and FLEET_HTTP_HOST) to a free one\n`);
      expect(run.code).to.equal(2);
    } finally {
      await new Promise<void>((resolve) => taken.close(() => resolve()));
    }
  });

  it('says so when Redis is there but does not answer (paused)', async () => {
    own.pause();
    try {
      const run = await fleet(['enqueue', 'deployment.create', JSON.stringify({ deploymentId: randomUUID(), name: 'web' })], {
        REDIS_URL: own.url,
        DATABASE_URL: 'postgres://fleet:x@127.0.0.1:1/fleet',
      });
      expect(run.stderr).to.equal(`fleet: Redis at 127.0.0.1:${own.port} is unreachable (no answer in time)\n`);
      expect(run.code).to.equal(4);
      process.stdout.write(`      (enqueue against a paused Redis: exit 4 after ${run.ms} ms)\n`);
    } finally {
      own.resume();
    }
  });
});

describe('outages: the sweep when PostgreSQL goes away', function () {
  this.timeout(60_000);

  it('logs one line (no stack) when its ticks start failing, none while it lasts, one when a tick works again', async () => {
    const db = await openTestDatabase(2);
    const target = new URL(db.url);
    const proxy = new TcpProxy(target.hostname, Number(target.port));
    const proxied = createDataSource({ url: TcpProxy.rewrite(db.url, await proxy.listen()), poolSize: 2 });
    await proxied.initialize();
    const prefix = uniquePrefix();
    const producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    let text = '';
    const logger = createLogger('debug', { write: (line: string) => void (text += line) });
    const watched: string[] = [];
    const pgWatch = new ServerWatch(describeServer('PostgreSQL', proxied.options.type === 'postgres' ? String(proxied.options.url) : ''), (_l, m) =>
      watched.push(m),
    );
    const sweeper = new Sweeper({ dataSource: proxied, producer, logger, pgWatch });
    try {
      await sweeper.sweep();
      proxy.cut();
      for (let i = 0; i < 3; i++)
        await sweeper.sweep().then(
          () => expect.fail('a tick without PostgreSQL succeeded'),
          () => undefined,
        );
      proxy.restore();
      await waitFor(
        'a tick to work again',
        async () =>
          await sweeper.sweep().then(
            () => true,
            () => undefined,
          ),
      );
      const lines = text
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as { level: number; msg: string; err?: unknown });
      const said = lines.filter((l) => l.level >= 30 && l.msg !== 'sweep').map((l) => l.msg);
      expect(said).to.deep.equal(['sweep failed: a server is away; retrying every tick', 'sweep works again']);
      expect(lines.filter((l) => l.level >= 40 && l.err !== undefined)).to.deep.equal([]); // no error objects, no stacks
      // the process's view of PostgreSQL, named without its password
      const at = `PostgreSQL at 127.0.0.1:${new URL(String(proxied.options.type === 'postgres' ? proxied.options.url : '')).port}`;
      expect(watched).to.deep.equal([`lost ${at}, retrying`, `${at} is back`]);
    } finally {
      await producer.close();
      await proxied.destroy();
      await proxy.close();
      await dropPrefix(prefix);
      await db.close();
    }
  });
});

describe('outages: a PostgreSQL that goes silent', function () {
  this.timeout(60_000);

  it('fails a statement it never answers as an outage once statement_timeout and the margin are past, and drops its connection', async () => {
    const db = await openTestDatabase(2);
    const target = new URL(db.url);
    const proxy = new TcpProxy(target.hostname, Number(target.port));
    // the server's own limit short, so the client's deadline (it plus ANSWER_MARGIN_MS) comes soon
    const proxied = createDataSource({ url: TcpProxy.rewrite(db.url, await proxy.listen()), poolSize: 1, statementTimeoutMs: 200 });
    await proxied.initialize();
    const database = new Database(proxied);
    try {
      expect((await database.run(plain('SELECT 1 AS one'))).rows).to.deep.equal([{ one: 1 }]);
      const acceptedBefore = proxy.accepted;
      // a host that died or was cut off without closing the connection: nothing comes back, nothing is closed
      proxy.stall();
      const err = await database.run(plain('SELECT 2 AS two')).then(
        () => expect.fail('a statement on a silent server was answered'),
        (e: unknown) => e,
      );
      expect(isTransient(err), `an outage, retried like one: ${String(err)}`).to.equal(true);
      proxy.restore();
      // the pool dropped the dead connection: the next statement goes out on a new one, and is answered
      expect((await database.run(plain('SELECT 3 AS three'))).rows).to.deep.equal([{ three: 3 }]);
      expect(proxy.accepted, 'a new connection').to.equal(acceptedBefore + 1);
    } finally {
      await proxied.destroy();
      await proxy.close();
      await db.close();
    }
  });
});

/** One scrape: the status, the text, and the value of the unlabelled PostgreSQL series. */
async function scrape(url: string) {
  // a generous bound: a scrape that hangs on a dead server fails here rather than at mocha's timeout
  const res = await fetch(`${url}/metrics`, { signal: AbortSignal.timeout(15_000) });
  const text = await res.text();
  const value = (name: string) => new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1];
  return { status: res.status, text, up: value('fleet_postgres_up'), lag: value('fleet_outbox_lag_seconds') };
}

describe('outages: /metrics when PostgreSQL goes away', function () {
  this.timeout(60_000);

  for (const fault of ['cut', 'stall'] as const) {
    // `fleet http` (nothing but the scrape tells the watch that PostgreSQL is back), and a process with the relay
    const how =
      fault === 'cut'
        ? 'connections reset and refused (a killed primary), an HTTP-only process'
        : 'connections silent (a hung primary), a process with the relay';
    it(`answers 200 with fleet_postgres_up 0 and no lag series while PostgreSQL is away (${how}), 1 and the lag once it is back; says so once`, async () => {
      const db = await openTestDatabase(2);
      const target = new URL(db.url);
      const proxy = new TcpProxy(target.hostname, Number(target.port));
      const databaseUrl = TcpProxy.rewrite(db.url, await proxy.listen());
      const prefix = uniquePrefix();
      let log = '';
      const logger = createLogger('info', { write: (line: string) => void (log += line) });
      const config = loadConfig({ FLEET_PREFIX: prefix, FLEET_HTTP_PORT: '0' });
      const fleet = await startFleet(config, { redisUrl: testEnv().redisUrl, databaseUrl }, logger, {
        http: true,
        worker: false,
        sweep: false,
        relay: fault === 'stall',
      });
      const url = fleet.httpUrl ?? '';
      try {
        const before = await scrape(url);
        expect(before.status, before.text).to.equal(200);
        expect(before.up).to.equal('1');
        expect(before.lag).to.equal('0');

        if (fault === 'cut') proxy.cut();
        else proxy.stall();
        const away = await waitFor('a scrape that says PostgreSQL is away', async () => {
          const s = await scrape(url);
          expect(s.status, s.text).to.equal(200);
          return s.up === '0' ? s : undefined;
        });
        expect(away.lag, 'the lag series, which PostgreSQL could not tell').to.equal(undefined);
        expect(away.text).to.match(/^fleet_queue_jobs\{/m); // the rest of the scrape is served
        const again = await scrape(url);
        expect([again.status, again.up, again.lag]).to.deep.equal([200, '0', undefined]);

        proxy.restore();
        const back = await waitFor('a scrape that says PostgreSQL is back', async () => {
          const s = await scrape(url);
          return s.status === 200 && s.up === '1' ? s : undefined;
        });
        expect(back.lag).to.match(/^\d/);
        const lines = log
          .trim()
          .split('\n')
          .map((l) => JSON.parse(l) as { level: number; msg: string; err?: unknown });
        const at = `PostgreSQL at 127.0.0.1:${new URL(databaseUrl).port}`;
        // one line when it was lost and one when it was back, however many scrapes failed in between
        expect(lines.filter((l) => l.msg.includes(at)).map((l) => l.msg)).to.deep.equal([`lost ${at}, retrying`, `${at} is back`]);
        expect(lines.filter((l) => l.level >= 40 && l.err !== undefined).map((l) => l.msg)).to.deep.equal([]); // no stacks
      } finally {
        proxy.restore();
        await fleet.close(5000);
        await proxy.close();
        await dropPrefix(prefix);
        await db.close();
      }
    });
  }
});

describe('outages: /metrics when Redis does not answer', function () {
  this.timeout(60_000);

  it('answers 200 without the queue and stream series (read from Redis) and with the rest, and says Redis was lost once and back once', async () => {
    const db = await openTestDatabase(2);
    const own = await OwnRedis.start();
    const prefix = uniquePrefix();
    let log = '';
    const logger = createLogger('info', { write: (line: string) => void (log += line) });
    const config = loadConfig({ FLEET_PREFIX: prefix, FLEET_HTTP_PORT: '0' });
    const fleet = await startFleet(config, { redisUrl: own.url, databaseUrl: db.url }, logger, {
      http: true,
      worker: false,
      sweep: false,
      relay: false,
    });
    const url = fleet.httpUrl ?? '';
    const redisSeries = /^fleet_(queue_jobs|stream_partition_length)\{/m;
    try {
      const before = await scrape(url);
      expect(before.status, before.text).to.equal(200);
      expect(before.text).to.match(redisSeries);

      own.pause();
      const away = await scrape(url);
      expect(away.status, away.text).to.equal(200);
      expect(away.text).not.to.match(redisSeries);
      expect([away.up, away.lag]).to.deep.equal(['1', '0']); // PostgreSQL's series are there

      own.resume();
      await waitFor('a scrape with the Redis series again', async () => {
        const s = await scrape(url);
        return s.status === 200 && redisSeries.test(s.text) ? true : undefined;
      });
      const said = log
        .trim()
        .split('\n')
        .map((l) => (JSON.parse(l) as { msg: string }).msg)
        .filter((m) => m.includes(`Redis at 127.0.0.1:${own.port}`));
      expect(said).to.deep.equal([`lost Redis at 127.0.0.1:${own.port}, retrying`, `Redis at 127.0.0.1:${own.port} is back`]);
    } finally {
      own.resume();
      await fleet.close(5000);
      await own.stop();
      await db.close();
    }
  });
});
