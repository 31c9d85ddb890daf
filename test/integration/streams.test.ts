import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as path from 'node:path';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { Client } from 'pg';
import { Database } from '../../src/entities/sql';
import { ResyncRequiredError } from '../../src/errors';
import { TransitionService } from '../../src/services/transitions';
import { memoryVersionStore, parseEntry, TransitionConsumer, type TransitionEntry, type VersionStore } from '../../src/streams/consumer';
import { OutboxRelay, relayLagSeconds } from '../../src/streams/outbox-relay';
import { createRedis } from '../../src/redis/connection';
import { createLogger } from '../../src/log';
import { forgetOutbox, openTestDatabase, setReadOnly, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { OwnRedis } from '../helpers/redis-server';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { TcpProxy } from '../helpers/proxy';
import { waitFor } from '../helpers/wait';
import { repoRoot } from '../../src/util';

const ROOT = repoRoot();

/** Ten transitions for one deployment: ready, then failed, then cancelled, then torn down. */
async function tenTransitions(service: TransitionService, deploymentId: string): Promise<void> {
  const [a, b, c] = [randomUUID(), randomUUID(), randomUUID()];
  const steps: Array<[string, Record<string, unknown>]> = [
    ['deployment.create', { name: 'web' }],
    ['attempt.create', { attemptId: a }],
    ['attempt.start', { attemptId: a }],
    ['attempt.end', { attemptId: a, outcome: 'succeeded' }],
    ['attempt.create', { attemptId: b }],
    ['attempt.start', { attemptId: b }],
    ['attempt.end', { attemptId: b, outcome: 'failed' }],
    ['attempt.create', { attemptId: c }],
    ['attempt.cancel', { attemptId: c }],
    ['deployment.teardown', {}],
  ];
  for (const [name, data] of steps) {
    const result = await service.apply(name, { deploymentId, ...data }, { fallbackEventId: randomUUID() });
    if (result.outcome !== 'applied') throw new Error(`${name} was ${result.outcome}`);
  }
}

async function readStream(redis: IORedis, key: string): Promise<TransitionEntry[]> {
  const raw = (await redis.xrange(key, '-', '+')) as Array<[string, string[]]>;
  return raw.map(([id, fields]) => parseEntry(id, fields));
}

/** Per deployment: the versions in stream order, with duplicates. */
function versionsByDeployment(entries: readonly TransitionEntry[]): Map<string, number[]> {
  const by = new Map<string, number[]>();
  for (const e of entries) by.set(e.deploymentId, [...(by.get(e.deploymentId) ?? []), e.version]);
  return by;
}

describe('transition fan-out: outbox relay, stream, consumer groups', function () {
  this.timeout(90_000);
  let db: TestDatabase;
  let service: TransitionService;
  let prefix: string;
  let streamKey: string;
  let redis: IORedis;
  const closers: Array<() => Promise<void>> = [];

  before(async () => {
    db = await openTestDatabase(24);
    service = new TransitionService({ dataSource: db.dataSource });
    redis = testRedis();
  });
  after(async () => {
    redis.disconnect();
    await db?.close();
  });
  beforeEach(async () => {
    prefix = uniquePrefix();
    streamKey = `${prefix}:transitions`;
    // Every test has a stream of its own over the one database: earlier tests' rows are neither pending nor
    // traceable to this stream (a relay reconciles published rows against the stream it publishes to).
    await forgetOutbox(db);
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    await dropPrefix(prefix);
  });

  /** outbox rows not marked published (of one deployment, or all) */
  async function unmarkedCount(deploymentId?: string): Promise<number> {
    const [row] = await db.dataSource.query<Array<{ n: string }>>(
      `SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND ($1::uuid IS NULL OR deployment_id = $1::uuid)`,
      [deploymentId ?? null],
    );
    return Number(row?.n);
  }

  function relay(options: Partial<ConstructorParameters<typeof OutboxRelay>[0]> = {}): OutboxRelay {
    const r = new OutboxRelay({ databaseUrl: db.url, redis: testEnv().redisUrl, streamKey, standbyRetryMs: 200, ...options });
    closers.push(() => r.close());
    r.start();
    return r;
  }

  it('publishes 1,000 transitions over 100 deployments in version order, through exactly one of two relays', async () => {
    const [one, two] = [relay(), relay()];
    const deployments = Array.from({ length: 100 }, () => randomUUID());
    await Promise.all(deployments.map((id) => tenTransitions(service, id)));
    await waitFor('1,000 stream entries', async () => ((await redis.xlen(streamKey)) >= 1000 ? true : undefined), 30_000);

    const entries = await readStream(redis, streamKey);
    expect(entries).to.have.length(1000); // no duplicates without a crash
    const by = versionsByDeployment(entries);
    expect([...by.keys()].sort()).to.deep.equal([...deployments].sort());
    for (const versions of by.values()) expect(versions).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    expect([one.publishedCount, two.publishedCount].sort((a, b) => a - b)).to.deep.equal([0, 1000]);
    expect([one.isLeader, two.isLeader].filter(Boolean)).to.have.length(1);

    // the last batch's mark goes out on its own once no commit has come for markDelayMs
    await waitFor('every row marked published', async () => ((await unmarkedCount()) === 0 ? true : undefined), 5000);
    expect(await relayLagSeconds(new Database(db.dataSource))).to.equal(0);
    const sample = entries[0];
    expect(sample).to.include({ type: 'state_transition', from: '', to: 'pending', reason: 'created', version: 1 });
    expect(sample?.transitionId).to.match(/^\d+$/);
  });

  it("marks a batch with the next batch's read (one statement), and close() marks the last batch", async () => {
    // The relay cycles only when the test wakes it: no polling, no mark on its own, and a service that wakes it
    // directly instead of with a NOTIFY (whose arrival time the test could not control).
    // The ten rows are committed before it starts, so its first cycle reads them all.
    const quiet = new TransitionService({ dataSource: db.dataSource, relay: { isLeader: true, notifyCommitted: () => undefined } });
    const first = randomUUID();
    await tenTransitions(quiet, first);
    const r = relay({ markDelayMs: 600_000, pollIntervalMs: 600_000 });
    await waitFor('ten entries', async () => ((await redis.xlen(streamKey)) >= 10 ? true : undefined));
    expect(await unmarkedCount(first)).to.equal(10); // appended, waiting for a read to carry their mark

    const second = randomUUID();
    await quiet.apply('deployment.create', { deploymentId: second, name: 'web' }, { fallbackEventId: randomUUID() });
    r.notifyCommitted();
    await waitFor('the eleventh entry', async () => ((await redis.xlen(streamKey)) >= 11 ? true : undefined));
    expect(await unmarkedCount(first)).to.equal(0); // carried by the read that found the new row
    expect(await unmarkedCount(second)).to.equal(1); // and the new row now waits in turn

    await r.close();
    expect(await unmarkedCount()).to.equal(0);
    const entries = await redis.xrange(streamKey, '-', '+');
    const marked = await db.dataSource.query<Array<{ stream_id: string }>>(
      `SELECT stream_id FROM outbox WHERE deployment_id = ANY($1::uuid[]) ORDER BY id`,
      [[first, second]],
    );
    expect(marked.map((m) => m.stream_id)).to.deep.equal(entries.map(([id]) => id));
  });

  it('hands over to a standby when the leader stops', async () => {
    const first = relay();
    await waitFor('a leader', () => (first.isLeader ? true : undefined));
    const standby = relay();
    await first.close();
    await waitFor('the standby to take over', () => (standby.isLeader ? true : undefined), 5000);
    const deploymentId = randomUUID();
    await tenTransitions(service, deploymentId);
    // the count goes up just after the append returns: wait for it rather than for the entries
    await waitFor('ten published by the standby', () => (standby.publishedCount >= 10 ? true : undefined));
    expect(standby.publishedCount).to.equal(10);
    expect(await redis.xlen(streamKey)).to.equal(10);
  });

  describe('a server that takes no writes (after a failover: a standby, a demoted primary)', () => {
    /** the advisory locks held by relay sessions on the test database */
    const relayLocks = async (c: Client): Promise<number> => {
      const { rows } = await c.query<{ n: string }>(
        `SELECT count(*) AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.granted AND a.datname = $1 AND a.application_name = 'lifecycle-fleet-relay'`,
        [db.name],
      );
      return Number(rows[0]?.n);
    };

    it('is no place to lead from: the relay takes no lock there, and leads and publishes once the server takes writes', async () => {
      // the test's own session, opened before: the file's pool is not used while the database is read-only (a
      // session it opened meanwhile would stay read-only)
      const watcher = new Client({ connectionString: db.url });
      await watcher.connect();
      let logged = '';
      try {
        await setReadOnly(db, true);
        const r = relay({ logger: createLogger('debug', { write: (line: string) => void (logged += line) }) });
        // refused, and refused again on its next try (its backoff)
        await waitFor('the relay refused twice', () => (logged.includes('relay cycle failed again') ? true : undefined));
        expect(logged).not.to.contain('became the active outbox relay');
        expect(r.isLeader).to.equal(false);
        expect(await relayLocks(watcher)).to.equal(0);
        expect(logged).to.contain('"code":"25006"').and.contain('relay cycle failed; retrying');

        await setReadOnly(db, false);
        await waitFor('the relay to lead', () => (r.isLeader ? true : undefined));
        expect(await relayLocks(watcher)).to.equal(1);
        const deploymentId = randomUUID();
        await tenTransitions(service, deploymentId);
        await waitFor('ten published', () => (r.publishedCount >= 10 ? true : undefined));
        expect(versionsByDeployment(await readStream(redis, streamKey)).get(deploymentId)).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
      } finally {
        await setReadOnly(db, false);
        await watcher.end();
      }
    });

    it('makes the leader step down when the server it leads from turns read-only, and lead again once it takes writes', async () => {
      // the whole server turns read-only, its open sessions too (a configuration reload, as a managed service does
      // when its disk fills): set as its superuser, undone whatever happens
      const admin = new Client({ connectionString: testEnv().adminDatabaseUrl });
      await admin.connect();
      await admin.query(`SET default_transaction_read_only = off`);
      const serverReadOnly = async (on: boolean) => {
        await admin.query(on ? `ALTER SYSTEM SET default_transaction_read_only = on` : `ALTER SYSTEM RESET default_transaction_read_only`);
        await admin.query(`SELECT pg_reload_conf()`);
        // a new session has the new setting once the server has reloaded it, and signalled every open session to
        await waitFor(`a new session to be read-${on ? 'only' : 'write'}`, async () => {
          const c = new Client({ connectionString: db.url });
          await c.connect();
          try {
            const { rows } = await c.query<{ ro: string }>(`SELECT current_setting('transaction_read_only') AS ro`);
            return rows[0]?.ro === (on ? 'on' : 'off') ? true : undefined;
          } finally {
            await c.end();
          }
        });
      };
      let logged = '';
      try {
        // it cycles only when woken: the test's row waits for its mark, which the next cycle writes
        const quiet = new TransitionService({ dataSource: db.dataSource, relay: { isLeader: true, notifyCommitted: () => undefined } });
        const r = relay({
          markDelayMs: 600_000,
          pollIntervalMs: 600_000,
          logger: createLogger('info', { write: (line: string) => void (logged += line) }),
        });
        await waitFor('a leader', () => (r.caughtUp ? true : undefined));
        const deploymentId = randomUUID();
        await quiet.apply('deployment.create', { deploymentId, name: 'web' }, { fallbackEventId: randomUUID() });
        r.notifyCommitted();
        await waitFor('its entry', async () => ((await redis.xlen(streamKey)) >= 1 ? true : undefined));
        expect(await unmarkedCount(deploymentId)).to.equal(1);

        await serverReadOnly(true);
        r.notifyCommitted(); // the mark is refused
        await waitFor('the leader to step down', () => (!r.isLeader ? true : undefined));
        expect(logged).to.contain('stepped down as the active outbox relay');
        expect(await relayLocks(admin)).to.equal(0);

        await serverReadOnly(false);
        await waitFor('the relay to lead again', () => (r.isLeader ? true : undefined));
        r.notifyCommitted(); // the read that carries the mark
        await waitFor('the row marked', async () => ((await unmarkedCount(deploymentId)) === 0 ? true : undefined));
        // published again by the new leadership (duplicates are allowed, gaps are not)
        expect(new Set(versionsByDeployment(await readStream(redis, streamKey)).get(deploymentId))).to.deep.equal(new Set([1]));
      } finally {
        await serverReadOnly(false);
        await admin.end();
      }
    });
  });

  it('loses nothing when the relay is SIGKILLed between XADD and the mark; the consumer drops the repeats', async () => {
    const deployments = Array.from({ length: 5 }, () => randomUUID());
    for (const id of deployments) await tenTransitions(service, id); // 50 rows, one batch

    const child = spawn(process.execPath, [path.join(ROOT, 'dist', 'test', 'fixtures', 'dying-relay.js')], {
      env: { ...process.env, DATABASE_URL: db.url, STREAM_KEY: streamKey },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    const signal = await new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_c, s) => resolve(s)));
    expect(signal).to.equal('SIGKILL');
    expect(out).to.contain('"xadded":50');
    expect(await redis.xlen(streamKey)).to.equal(50);
    const [unmarked] = await db.dataSource.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM outbox WHERE published_at IS NULL`);
    expect(Number(unmarked?.n)).to.equal(50); // published but never marked

    relay();
    await waitFor('the republished batch', async () => ((await redis.xlen(streamKey)) >= 100 ? true : undefined));
    const entries = await readStream(redis, streamKey);
    for (const versions of versionsByDeployment(entries).values()) {
      expect(versions).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }

    const handled: TransitionEntry[] = [];
    const consumer = new TransitionConsumer({
      redis: testEnv().redisUrl,
      streamKey,
      group: 'audit',
      consumer: 'c1',
      startId: '0',
      blockMs: 100,
      handler: (e) => void handled.push(e),
    });
    closers.push(() => consumer.close());
    void consumer.run();
    await waitFor('the consumer to go through the stream', () => (consumer.handled + consumer.dropped >= 100 ? true : undefined));
    expect(consumer.dropped).to.equal(50);
    for (const versions of versionsByDeployment(handled).values()) expect(versions).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  });

  it('lets another consumer take over, once its lease expired, what a SIGKILLed consumer left un-acked mid-batch', async () => {
    const deployments = Array.from({ length: 4 }, () => randomUUID());
    relay();
    for (const id of deployments) await tenTransitions(service, id);
    await waitFor('40 entries', async () => ((await redis.xlen(streamKey)) >= 40 ? true : undefined));
    await redis.xgroup('CREATE', streamKey, 'billing', '0');

    const child = spawn(process.execPath, [path.join(ROOT, 'dist', 'test', 'fixtures', 'dying-consumer.js')], {
      env: { ...process.env, STREAM_KEY: streamKey, GROUP: 'billing', KEEP: '5', LEASE_MS: '1000' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    const signal = await new Promise<NodeJS.Signals | null>((resolve) => child.on('exit', (_c, s) => resolve(s)));
    expect(signal).to.equal('SIGKILL');
    const byDoomed = out.trim().split('\n');
    expect(byDoomed).to.have.length(5);
    const pending = (await redis.xpending(streamKey, 'billing')) as [number, ...unknown[]];
    expect(pending[0]).to.equal(15); // the rest of its batch of 20: read, never acknowledged

    const handled: string[] = [];
    const survivor = new TransitionConsumer({
      redis: testEnv().redisUrl,
      streamKey,
      group: 'billing',
      consumer: 'survivor',
      // the doomed consumer's lease on the stream expires; the survivor takes over what it left pending, first
      leaseMs: 1000,
      blockMs: 100,
      handler: (e) => void handled.push(`${e.deploymentId}:${e.version}`),
    });
    closers.push(() => survivor.close());
    void survivor.run();
    await waitFor('the survivor to handle everything else', () => (handled.length >= 35 ? true : undefined));
    const all = [...byDoomed, ...handled].sort();
    const expected = deployments.flatMap((d) => Array.from({ length: 10 }, (_, i) => `${d}:${i + 1}`)).sort();
    expect(all).to.deep.equal(expected);
    await waitFor('nothing pending', async () => (((await redis.xpending(streamKey, 'billing')) as [number])[0] === 0 ? true : undefined));
  });

  it('republishes what the stream lost before appending anything after the gap', async () => {
    const r = relay();
    const deployments: string[] = Array.from({ length: 3 }, () => randomUUID());
    for (const id of deployments) await tenTransitions(service, id);
    await waitFor('30 entries', async () => ((await redis.xlen(streamKey)) >= 30 ? true : undefined));
    await waitFor('every row marked published', async () => ((await unmarkedCount()) === 0 ? true : undefined));
    // Redis loses its last writes (a crash before fsync, a failover): the last 7 entries vanish
    const tail = (await redis.xrevrange(streamKey, '+', '-', 'COUNT', 7)).map(([id]) => id);
    await redis.xdel(streamKey, ...tail);
    const more = randomUUID();
    await tenTransitions(service, more);
    await waitFor('every version of every deployment', async () => {
      const by = versionsByDeployment(await readStream(redis, streamKey));
      return [...deployments, more].every((d) => new Set(by.get(d)).size === 10) ? true : undefined;
    });
    // the lost entries came back before anything of the new deployment was appended after the gap
    const entries = await readStream(redis, streamKey);
    const firstNew = entries.findIndex((e) => e.deploymentId === more);
    const lastOld = entries.map((e) => deployments.includes(e.deploymentId)).lastIndexOf(true);
    expect(lastOld).to.be.below(firstNew);
    // exactly the lost seven again: the entry at the stream's tail is not republished (the reconcile's boundary is
    // "after the tail"), and nothing else is
    expect(entries.filter((e) => deployments.includes(e.deploymentId))).to.have.length(30);
    expect(entries).to.have.length(40);
    expect(entries.some((e) => tail.includes(e.streamId))).to.equal(false);
    for (const d of deployments) {
      const firsts: number[] = [];
      for (const v of versionsByDeployment(entries).get(d) ?? []) if (!firsts.includes(v)) firsts.push(v);
      expect(firsts).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }
    expect(r.isLeader).to.equal(true);
  });

  it('reconnects after Redis is killed and restarted, and republishes what the crash may have lost', async () => {
    const own = await OwnRedis.start();
    closers.push(() => own.stop());
    const r = new OutboxRelay({ databaseUrl: db.url, redis: own.url, streamKey, pollIntervalMs: 100 });
    closers.push(() => r.close());
    r.start();

    const deployments = Array.from({ length: 30 }, () => randomUUID());
    const writing = (async () => {
      for (const id of deployments) await tenTransitions(service, id);
    })();
    const probe = new (await import('ioredis')).default(own.url, { maxRetriesPerRequest: null });
    probe.on('error', () => undefined); // it is killed on purpose
    closers.push(async () => probe.disconnect());
    await waitFor('some entries', async () => ((await probe.xlen(streamKey)) >= 50 ? true : undefined));
    await own.kill('SIGKILL'); // a crash: the AOF may miss its last second
    await own.restart();
    await writing;
    await waitFor(
      'every transition in the stream',
      async () => {
        const entries = await readStream(probe, streamKey);
        const by = versionsByDeployment(entries);
        return deployments.every((d) => new Set(by.get(d)).size === 10) ? entries : undefined;
      },
      30_000,
    );
    await waitFor('every row marked published', async () => ((await unmarkedCount()) === 0 ? true : undefined), 5000);
  });

  it('says nothing on the console while Redis is away: the connection that waits for new entries handles its errors too', async () => {
    const own = await OwnRedis.start();
    closers.push(() => own.stop());
    const lent = createRedis(own.url, 'worker', 'lifecycle-fleet-consumer-quiet');
    closers.push(async () => lent.disconnect());
    let refused = 0;
    lent.on('error', () => void refused++);
    const consumer = new TransitionConsumer({ redis: lent, streamKey, group: 'quiet', consumer: 'c', blockMs: 200, handler: () => undefined });
    closers.push(() => consumer.close());
    const printed: string[] = [];
    const consoleError = console.error;
    console.error = (...args: unknown[]) => void printed.push(args.map(String).join(' '));
    try {
      void consumer.run().catch(() => undefined);
      // its second connection is made when the partition's worker first waits for new entries
      await waitFor('the connection that waits', async () =>
        String(await lent.client('LIST'))
          .split('\n')
          .filter((l) => l.includes('name=lifecycle-fleet-consumer-quiet')).length >= 2
          ? true
          : undefined,
      );
      await own.kill('SIGKILL');
      // both connections retry on one schedule from the same moment: by the third refused attempt of the one, the
      // other has met its first
      await waitFor('three refused reconnects', () => (refused >= 3 ? true : undefined));
    } finally {
      console.error = consoleError;
    }
    expect(printed.filter((line) => line.includes('Unhandled error event'))).to.deep.equal([]);
  });

  it('after a transient error in the middle of a batch (its version store away for a moment), handles the rest of the batch before anything newer', async () => {
    const deploymentId = randomUUID();
    const add = (version: number) => redis.xadd(streamKey, '*', 'type', 'state_transition', 'deploymentId', deploymentId, 'version', String(version));
    for (let v = 1; v <= 5; v++) await add(v);
    const handled: number[] = [];
    const seen = memoryVersionStore();
    let failed = false;
    const versions: VersionStore = {
      get: (id) => {
        if (!failed && handled.length === 2) {
          failed = true;
          throw Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:5432'), { code: 'ECONNREFUSED' });
        }
        return seen.get(id);
      },
      set: (id, version) => seen.set(id, version),
    };
    const consumer = new TransitionConsumer({
      redis: testEnv().redisUrl,
      streamKey,
      group: 'g',
      consumer: 'c',
      startId: '0',
      batchSize: 10,
      blockMs: 100,
      versions,
      handler: (e) => void handled.push(e.version),
    });
    closers.push(() => consumer.close());
    const running = consumer.run();
    await waitFor('the store to fail once', () => (failed ? true : undefined));
    await add(6);
    await waitFor('v6 handled', () => (handled.includes(6) ? true : undefined));
    await consumer.close();
    await running;
    expect(handled).to.deep.equal([1, 2, 3, 4, 5, 6]);
  });

  it('after Redis comes back empty mid-cycle, reconciles before appending: no permanent gap (issue 13 A)', async () => {
    const own = await OwnRedis.start();
    closers.push(() => own.stop());
    // it polls every 100 ms: its next read comes while the table is locked below
    const r = new OutboxRelay({ databaseUrl: db.url, redis: own.url, streamKey, pollIntervalMs: 100 });
    closers.push(() => r.close());
    r.start();
    const probe = new (await import('ioredis')).default(own.url, { maxRetriesPerRequest: null });
    probe.on('error', () => undefined); // it is killed on purpose
    closers.push(async () => probe.disconnect());

    const first = randomUUID();
    await tenTransitions(service, first);
    await waitFor('the first ten appended', async () => ((await probe.xlen(streamKey)) >= 10 ? true : undefined));

    // Hold the relay's next "mark + read" statement on a table lock, so that it is in flight while Redis restarts
    // empty; the second deployment's rows are committed with the lock's release, so that read finds them.
    const locker = db.dataSource.createQueryRunner();
    await locker.connect();
    closers.push(() => locker.release());
    await locker.query('BEGIN');
    await locker.query('LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE');
    const second = randomUUID();
    await locker.query(
      `INSERT INTO outbox (deployment_id, version, fields)
       SELECT $1::uuid, v, jsonb_build_object('type', 'state_transition', 'transitionId', '0', 'deploymentId', $1::text,
              'attemptId', '', 'from', '', 'to', 'pending', 'version', v::text, 'reason', 'created', 'eventId', 'e' || v, 'at', '', 'actor', 'producer')
         FROM generate_series(1, 10) AS v`,
      [second],
    );
    await waitFor('the relay to wait on the lock', async () => {
      const rows = await db.dataSource.query<unknown[]>(
        `SELECT 1 FROM pg_stat_activity WHERE application_name = 'lifecycle-fleet-relay' AND wait_event_type = 'Lock'`,
      );
      return rows.length > 0 ? true : undefined;
    });
    await own.kill('SIGKILL');
    own.wipe();
    await own.restart();
    await waitFor('the relay to reconnect to the empty server', async () =>
      String(await probe.client('LIST')).includes('name=lifecycle-fleet-relay') ? true : undefined,
    );
    expect(await probe.xlen(streamKey)).to.equal(0);
    await locker.query('COMMIT');

    // every version of both deployments reaches the new stream, the first deployment's before the second's
    await waitFor(
      'both deployments whole in the stream',
      async () => {
        const by = versionsByDeployment(await readStream(probe, streamKey));
        return [first, second].every((d) => new Set(by.get(d)).size === 10) ? true : undefined;
      },
      10_000,
    );
    await r.close();
    const entries = await readStream(probe, streamKey);
    expect(entries.map((e) => `${e.deploymentId === first ? 'a' : 'b'}${e.version}`)).to.deep.equal([
      ...Array.from({ length: 10 }, (_, i) => `a${i + 1}`),
      ...Array.from({ length: 10 }, (_, i) => `b${i + 1}`),
    ]);
    const marked = await db.dataSource.query<Array<{ stream_id: string }>>(
      `SELECT stream_id FROM outbox WHERE deployment_id = ANY($1::uuid[]) ORDER BY id`,
      [[first, second]],
    );
    expect(marked.map((m) => m.stream_id)).to.deep.equal(entries.map((e) => e.streamId));
  });

  describe('fleet tail', () => {
    const FLEET = path.join(ROOT, 'bin', 'fleet.js');
    function startTail(args: string[]) {
      const child = spawn(process.execPath, [FLEET, 'tail', ...args], {
        env: { ...process.env, DATABASE_URL: db.url, FLEET_PREFIX: prefix },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      const output = { out: '', err: '' };
      child.stdout.on('data', (chunk: Buffer) => (output.out += chunk.toString()));
      child.stderr.on('data', (chunk: Buffer) => (output.err += chunk.toString()));
      const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
      closers.push(async () => {
        if (child.exitCode === null) child.kill('SIGKILL');
        await exited;
      });
      return { child, output, exited };
    }

    it('prints transitions as they happen, as text or JSON, and stops on SIGINT', async () => {
      relay();
      const { child, output, exited } = startTail(['--json']);
      const text = startTail([]);
      // the tails start at `$`: wait until both have pinned it and are blocked reading, before writing
      await waitFor('both tails to block in XREAD', async () => {
        const clients = String(await redis.client('LIST')).split('\n');
        return clients.filter((c) => c.includes('name=lifecycle-fleet-tail') && c.includes('cmd=xread')).length >= 2 ? true : undefined;
      });
      const deploymentId = randomUUID();
      await tenTransitions(service, deploymentId);
      await waitFor('ten JSON lines', () => (output.out.trim().split('\n').length >= 10 ? true : undefined));
      const lines = output.out
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as TransitionEntry);
      expect(lines.map((l) => l.version)).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
      expect(lines[2]).to.include({ deploymentId, from: 'pending', to: 'deploying', reason: 'attempt_started' });
      await waitFor('ten text lines', () => (text.output.out.trim().split('\n').length >= 10 ? true : undefined));
      expect(text.output.out).to.contain(`${deploymentId}  v1  (new) -> pending  created`);
      child.kill('SIGINT');
      expect(await exited).to.equal(0);
      // on exit, a cursor of every partition's position (here one): resuming from it prints nothing already printed
      const cursor = /to resume every partition from here: --from (\S+)/.exec(output.err)?.[1];
      expect(cursor, output.err).to.be.a('string');
      const last = lines[lines.length - 1]?.streamId;
      expect(JSON.parse(Buffer.from(cursor ?? '', 'base64url').toString('utf8'))).to.deep.equal({ p: 1, r: 0, ids: [last] });
      // a cursor for another number of partitions is refused, naming both
      const other = startTail(['--from', Buffer.from(JSON.stringify({ p: 4, ids: ['0-0', '0-0', '0-0', '0-0'] })).toString('base64url')]);
      expect(await other.exited).to.equal(2);
      expect(other.output.err).to.contain(`--from: the cursor is for 4 partition(s), but the stream ${prefix}:transitions has 1`);
      expect(other.output.out).to.equal('');
    });

    it('resumes through a consumer group where it stopped', async () => {
      relay();
      const first = randomUUID();
      await tenTransitions(service, first);
      await waitFor('ten entries', async () => ((await redis.xlen(streamKey)) >= 10 ? true : undefined));
      const a = startTail(['--group', 'ops', '--consumer', 'me', '--from', '0', '--json']);
      await waitFor('the first ten', () => (a.output.out.trim().split('\n').length >= 10 ? true : undefined));
      a.child.kill('SIGTERM');
      expect(await a.exited).to.equal(0);
      const second = randomUUID();
      await tenTransitions(service, second);
      await waitFor('twenty entries', async () => ((await redis.xlen(streamKey)) >= 20 ? true : undefined));
      const b = startTail(['--group', 'ops', '--consumer', 'me', '--json']);
      await waitFor('the next ten', () => (b.output.out.trim().split('\n').length >= 10 ? true : undefined));
      const seen = b.output.out
        .trim()
        .split('\n')
        .map((l) => (JSON.parse(l) as TransitionEntry).deploymentId);
      expect(new Set(seen)).to.deep.equal(new Set([second]));
    });

    it('exits 3 with the resync hint when --from was trimmed away, and 2 on a malformed --from', async () => {
      let firstId = '';
      for (let i = 0; i < 50; i++) {
        const id = await redis.xadd(streamKey, '*', 'type', 'state_transition', 'deploymentId', randomUUID(), 'version', '1');
        if (i === 0) firstId = id ?? '';
      }
      await redis.xtrim(streamKey, 'MAXLEN', 10);
      const trimmed = startTail(['--from', firstId]);
      expect(await trimmed.exited).to.equal(3);
      expect(trimmed.output.err).to.contain('resync_required');
      expect(trimmed.output.err).to.contain('/api/deployments/:id/transitions?afterVersion=');
      const malformed = startTail(['--from', 'yesterday']);
      expect(await malformed.exited).to.equal(2);
      expect(malformed.output.err).to.contain('--from: must be a stream id');
    });
  });

  describe('a connection lost between a read and its reply', () => {
    /** The consumer's read script (READ_IF_CONTIGUOUS) is the one command that says MISSED. */
    const READ_SCRIPT = "'MISSED'";
    let proxy: TcpProxy;
    let proxiedUrl: string;

    beforeEach(async () => {
      const target = new URL(testEnv().redisUrl);
      proxy = new TcpProxy(target.hostname, Number(target.port));
      proxiedUrl = TcpProxy.rewrite(testEnv().redisUrl, await proxy.listen());
      closers.push(() => proxy.close());
    });

    function consumerOf(handled: TransitionEntry[], options: Partial<ConstructorParameters<typeof TransitionConsumer>[0]> = {}): TransitionConsumer {
      const consumer = new TransitionConsumer({
        redis: proxiedUrl,
        streamKey,
        group: 'g',
        consumer: 'c1',
        startId: '0',
        batchSize: 2,
        blockMs: 100,
        claimIdleMs: 3_600_000, // nothing is claimed back: what the consumer handles, it got from its reads
        handler: (e) => void handled.push(e),
        ...options,
      });
      closers.push(() => consumer.close());
      return consumer;
    }

    it('handles every entry, in order: the read ioredis sends again does not skip what the lost reply carried', async () => {
      const deploymentId = randomUUID();
      for (let v = 1; v <= 6; v++) await redis.xadd(streamKey, '*', 'type', 'state_transition', 'deploymentId', deploymentId, 'version', String(v));
      // the first read runs (v1, v2 delivered to the consumer), its reply is lost with the connection
      proxy.intercept(READ_SCRIPT, 'lose-reply');
      const handled: TransitionEntry[] = [];
      const consumer = consumerOf(handled);
      const running = consumer.run();
      await waitFor('the read to run and its reply to be lost', () => (proxy.intercepted ? true : undefined));
      proxy.restore();
      await waitFor('v6 handled', () => (handled.some((e) => e.version === 6) ? true : undefined));
      await consumer.close();
      await running;
      expect(handled.map((e) => e.version)).to.deep.equal([1, 2, 3, 4, 5, 6]);
      // nothing left pending in the group: every entry was acknowledged once handled
      const pending = (await redis.xpending(streamKey, 'g')) as [number, ...unknown[]];
      expect(pending[0]).to.equal(0);
    });

    it('stops with resync_required, not a new group at $, when the group is gone after a transient error', async () => {
      const deploymentId = randomUUID();
      const add = (version: number) =>
        redis.xadd(streamKey, '*', 'type', 'state_transition', 'deploymentId', deploymentId, 'version', String(version));
      const handled: TransitionEntry[] = [];
      const consumer = consumerOf(handled, { startId: '$' });
      const outcome = consumer.run().then(
        () => 'finished',
        (err: unknown) => err,
      );
      await waitFor('the group', async () => ((await redis.exists(streamKey)) === 1 ? true : undefined));
      await add(1);
      await waitFor('v1', () => (handled.length === 1 ? true : undefined));
      // Redis loses its data (a failover to a replica that never had the stream); the relay republishes; the
      // consumer's next read meets a transient error (LOADING) and it reads again
      proxy.intercept(READ_SCRIPT, { error: 'LOADING Redis is loading the dataset in memory' });
      await redis.del(streamKey);
      for (let v = 1; v <= 3; v++) await add(v);
      await waitFor('the read to fail', () => (proxy.intercepted ? true : undefined));
      let settled: unknown;
      void outcome.then((o) => (settled = o));
      const groupNames = async () => ((await redis.xinfo('GROUPS', streamKey)) as unknown[][]).map((g) => String(g[1]));
      // either it stops, or it makes the group anew (the bug): whichever first; then one more entry shows which
      await waitFor(
        'the consumer to stop or make a new group',
        async () => settled ?? ((await groupNames()).includes('g') ? 'new group' : undefined),
      );
      await add(4);
      const err = await Promise.race([
        outcome,
        waitFor('an entry handled in a new group', () => (handled.length > 1 ? `went on in a new group at v${handled[1]?.version}` : undefined)),
      ]);
      expect(err).to.be.instanceOf(ResyncRequiredError);
      expect(handled.map((e) => e.version)).to.deep.equal([1]);
    });
  });

  describe('a position that was trimmed away', () => {
    async function trimmedStream(): Promise<{ firstId: string }> {
      let firstId = '';
      for (let i = 0; i < 300; i++) {
        const id = await redis.xadd(streamKey, '*', 'type', 'state_transition', 'deploymentId', randomUUID(), 'version', '1');
        if (i === 0) firstId = id ?? '';
      }
      await redis.xtrim(streamKey, 'MAXLEN', 100);
      return { firstId };
    }

    it('is refused with an explicit resync signal for a new group', async () => {
      const { firstId } = await trimmedStream();
      const consumer = new TransitionConsumer({
        redis: testEnv().redisUrl,
        streamKey,
        group: 'late',
        consumer: 'c1',
        startId: firstId,
        handler: () => undefined,
      });
      closers.push(() => consumer.close());
      const err = await consumer.run().catch((e: unknown) => e);
      expect(err).to.be.instanceOf(ResyncRequiredError);
      expect((err as ResyncRequiredError).code).to.equal('resync_required');
      expect((err as Error).message).to.contain('/api/deployments/:id/transitions?afterVersion=');
    });

    it("is refused while running when the stream vanishes with Redis's data (a restart without its AOF, a failover)", async () => {
      const seen: number[] = [];
      const consumer = new TransitionConsumer({
        redis: testEnv().redisUrl,
        streamKey,
        group: 'wiped',
        consumer: 'c1',
        startId: '0',
        blockMs: 100,
        handler: (e) => void seen.push(e.version),
      });
      closers.push(() => consumer.close());
      const ended = consumer.run().catch((e: unknown) => e);
      await redis.xadd(streamKey, '*', 'type', 'state_transition', 'deploymentId', randomUUID(), 'version', '1');
      await waitFor('the first entry', () => (seen.length === 1 ? true : undefined));
      await redis.del(streamKey); // the stream and its groups gone, as after FLUSHALL
      const err = await ended;
      expect(err).to.be.instanceOf(ResyncRequiredError);
      expect((err as ResyncRequiredError).code).to.equal('resync_required');
    });

    it('is refused for an existing group that fell behind the trim', async () => {
      await redis.xgroup('CREATE', streamKey, 'sleepy', '0', 'MKSTREAM');
      await trimmedStream();
      const consumer = new TransitionConsumer({
        redis: testEnv().redisUrl,
        streamKey,
        group: 'sleepy',
        consumer: 'c1',
        handler: () => undefined,
      });
      closers.push(() => consumer.close());
      expect(await consumer.run().catch((e: unknown) => e)).to.be.instanceOf(ResyncRequiredError);
    });

    it('is detected while running: a consumer held behind the trim rejects before handling past the hole (issue 13 B)', async () => {
      const deploymentId = randomUUID();
      const add = (version: number) =>
        redis.xadd(streamKey, '*', 'type', 'state_transition', 'deploymentId', deploymentId, 'version', String(version));
      await add(1);
      let release: () => void = () => undefined;
      const held = new Promise<void>((resolve) => (release = resolve));
      const handled: number[] = [];
      const consumer = new TransitionConsumer({
        redis: testEnv().redisUrl,
        streamKey,
        group: 'slow',
        consumer: 'c1',
        startId: '0',
        batchSize: 1,
        blockMs: 100,
        handler: async (e) => {
          handled.push(e.version);
          if (e.version === 1) await held; // a slow handler, a long retry
        },
      });
      closers.push(() => consumer.close());
      const outcome = consumer.run().then(
        () => 'finished',
        (err: unknown) => err,
      );
      await waitFor('the handler to hold v1', () => (handled.length === 1 ? true : undefined));
      for (let v = 2; v <= 300; v++) await add(v);
      await redis.xtrim(streamKey, 'MAXLEN', 10);
      release();
      // either the consumer stops with the resync signal, or it goes on past the hole (the bug): whichever first
      const err = await Promise.race([
        outcome,
        waitFor('an entry handled past the hole', () => (handled.length > 1 ? `skipped to v${handled[1]}` : undefined)),
      ]);
      expect(err).to.be.instanceOf(ResyncRequiredError);
      // nothing past the hole was handled, and the caller learns where each deployment stands
      expect(handled).to.deep.equal([1]);
      expect((err as ResyncRequiredError).lastVersions).to.deep.equal(new Map([[deploymentId, 1]]));
      expect(consumer.lastHandledVersions()).to.deep.equal(new Map([[deploymentId, 1]]));
    });

    it('is not raised for a group that is ahead of the trim', async () => {
      await trimmedStream();
      await redis.xgroup('CREATE', streamKey, 'current', '$');
      const seen: number[] = [];
      const consumer = new TransitionConsumer({
        redis: testEnv().redisUrl,
        streamKey,
        group: 'current',
        consumer: 'c1',
        blockMs: 100,
        handler: (e) => void seen.push(e.version),
      });
      closers.push(() => consumer.close());
      const running = consumer.run();
      await redis.xadd(streamKey, '*', 'type', 'state_transition', 'deploymentId', randomUUID(), 'version', '7');
      await waitFor('the new entry', () => (seen.length === 1 ? true : undefined));
      await consumer.close();
      await running;
      expect(seen).to.deep.equal([7]);
    });
  });
});
