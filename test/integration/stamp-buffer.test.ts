import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { Client } from 'pg';
import { createDataSource } from '../../ormconfig';
import { Database, type Session } from '../../src/entities/sql';
import { migrate } from '../../src/entities/schema/migrate';
import { LifecycleProducer } from '../../src/queues/producer';
import { getDeployment } from '../../src/services/read-model/views';
import { heartbeatMember, StampBuffer, type StampBufferOptions } from '../../src/services/stamps';
import { Sweeper, type SweeperOptions } from '../../src/services/sweep/sweeper';
import { TransitionService } from '../../src/services/transitions';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { ManualClock } from '../helpers/clock';
import { createDatabase, openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { OwnRedis } from '../helpers/redis-server';
import { waitFor } from '../helpers/wait';

/** The real Database, noting the text of every statement it runs (an observer: everything still reaches PostgreSQL). */
class CountingDatabase extends Database {
  readonly statements: string[] = [];
  override session<T>(fn: (session: Session) => Promise<T>): Promise<T> {
    return super.session((s) =>
      fn({
        run: (statement, params) => {
          this.statements.push(statement.text);
          return s.run(statement, params);
        },
      }),
    );
  }
  updates(): number {
    return this.statements.filter((t) => /\bUPDATE\b/.test(t)).length;
  }
}

const T0 = new Date('2026-11-23T12:00:00.000Z');
const at = (s: number): Date => new Date(T0.getTime() + s * 1000);

describe('stamp buffer: heartbeats and readiness absorbed in Redis, flushed in batches', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let redis: IORedis;
  let prefix: string;
  let clock: ManualClock;
  let counting: CountingDatabase;
  let buffer: StampBuffer;
  let service: TransitionService;
  const closers: Array<() => Promise<void>> = [];

  before(async () => {
    db = await openTestDatabase(24);
    redis = testRedis();
  });
  after(async () => {
    redis?.disconnect();
    await db?.close();
  });
  beforeEach(async () => {
    // the sweep tests judge every running attempt in the database
    await db.dataSource.query(`TRUNCATE deployments, attempts, state_transitions, outbox, processed_events`);
    prefix = uniquePrefix();
    clock = new ManualClock(at(0));
    counting = new CountingDatabase(db.dataSource);
    buffer = newBuffer();
    service = new TransitionService({ dataSource: db.dataSource, now: clock.now, stampBuffer: buffer });
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    await dropPrefix(prefix);
  });

  function newBuffer(options: Partial<StampBufferOptions> = {}): StampBuffer {
    return new StampBuffer({ redis, db: counting, prefix, ...options });
  }

  const q = <T>(sql: string, params: unknown[] = []): Promise<T[]> => db.dataSource.query<T[]>(sql, params);

  async function apply(name: string, data: Record<string, unknown>, producedAt?: Date) {
    return service.apply(name, { eventId: `${name}-${randomUUID()}`, ...data }, producedAt === undefined ? {} : { producedAt });
  }

  /**
   * A heartbeat or readiness job processed while the service's clock reads `processedAt`: the time it records (a
   * stamp is the processing worker's fleet-clock time, never the producer's). The clock is put back after, so the
   * calls model stamps processed out of order (workers whose clock estimates differ by a little, redeliveries).
   */
  async function stampAt(name: 'attempt.heartbeat' | 'deployment.readiness', data: Record<string, unknown>, processedAt: Date) {
    const saved = clock.now();
    clock.at(processedAt, 0);
    try {
      return await apply(name, data);
    } finally {
      clock.at(saved, 0);
    }
  }

  /** A deployment with a running attempt (started at the clock's time). */
  async function running(): Promise<{ deploymentId: string; attemptId: string }> {
    const ids = { deploymentId: randomUUID(), attemptId: randomUUID() };
    await apply('deployment.create', { deploymentId: ids.deploymentId, name: 'web' });
    await apply('attempt.create', ids);
    await apply('attempt.start', ids);
    return ids;
  }

  /** A ready node_port deployment (its end stamps last_ready_at at the clock's time). */
  async function ready(): Promise<{ deploymentId: string; attemptId: string }> {
    const ids = await running();
    await apply('attempt.end', { ...ids, outcome: 'succeeded', endpoint: { url: 'http://127.0.0.1:30080', kind: 'node_port' } });
    return ids;
  }

  /** `count` running attempts straight into the tables, started at +0 (the lifecycle path is not what such tests measure). */
  async function runningInBulk(count: number): Promise<Array<{ deploymentId: string; attemptId: string }>> {
    const rows = await q<{ deploymentId: string; attemptId: string }>(
      `WITH d AS (
         INSERT INTO deployments (id, name, state, version, current_attempt_id, state_changed_at)
         SELECT gen_random_uuid(), 'hb-' || i, 'deploying', 3, gen_random_uuid(), $1 FROM generate_series(1, $2::int) AS i
         RETURNING id, current_attempt_id)
       INSERT INTO attempts (id, deployment_id, number, status, started_at) SELECT current_attempt_id, id, 1, 'running', $1 FROM d
       RETURNING id AS "attemptId", deployment_id AS "deploymentId"`,
      [T0, count],
    );
    expect(rows).to.have.length(count);
    return rows;
  }

  async function heartbeatAt(attemptId: string): Promise<Date | null> {
    const [row] = await q<{ last_heartbeat_at: Date | null }>(`SELECT last_heartbeat_at FROM attempts WHERE id = $1`, [attemptId]);
    return row?.last_heartbeat_at ?? null;
  }
  async function readyAt(deploymentId: string): Promise<Date | null> {
    const [row] = await q<{ last_ready_at: Date | null }>(`SELECT last_ready_at FROM deployments WHERE id = $1`, [deploymentId]);
    return row?.last_ready_at ?? null;
  }
  const buffered = async (kind: 'heartbeat' | 'readiness'): Promise<string[]> => redis.zrange(buffer.keys[kind], 0, -1);

  /** A sweep on the test's clock whose ticks flush `flushing` (the production wiring, src/app.ts). */
  function sweeper(flushing: StampBuffer, options: Partial<SweeperOptions> = {}): Sweeper {
    const producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    closers.push(() => producer.close());
    return new Sweeper({
      dataSource: db.dataSource,
      producer,
      now: clock.now,
      flushStamps: async (now) => (await flushing.flush(now)).stamped,
      ...options,
    });
  }

  it('keeps the latest of many out-of-order heartbeats; one flush writes the maximum with one UPDATE per kind', async () => {
    const attempts = [await running(), await running(), await running()];
    const r = await ready();
    clock.at(T0, 100);
    const times = [40, 90, 10, 70, 30];
    for (const a of attempts) {
      for (const s of times) expect(await stampAt('attempt.heartbeat', a, at(s))).to.deep.include({ outcome: 'noop', reason: 'buffered' });
    }
    for (const s of [50, 95, 20]) {
      expect(await stampAt('deployment.readiness', { deploymentId: r.deploymentId }, at(s))).to.deep.include({ reason: 'buffered' });
    }
    // a producer's clock ahead of ours: stamped at our time, never in the future
    expect(await apply('deployment.readiness', { deploymentId: r.deploymentId, observedAt: at(500).toISOString() })).to.deep.include({
      reason: 'buffered',
    });
    expect(counting.statements, 'absorbing touches no PostgreSQL').to.deep.equal([]);
    for (const a of attempts) expect(await heartbeatAt(a.attemptId)).to.equal(null);

    const result = await buffer.flush(clock.now());
    expect(result).to.deep.include({ heartbeats: 3, readiness: 1, stamped: 4, dropped: 0, kept: 0 });
    expect(counting.statements).to.have.length(2);
    expect(counting.updates(), 'one UPDATE per kind per flush').to.equal(2);
    for (const a of attempts) expect((await heartbeatAt(a.attemptId))?.toISOString()).to.equal(at(90).toISOString());
    expect((await readyAt(r.deploymentId))?.toISOString()).to.equal(at(100).toISOString());
    expect(await buffered('heartbeat')).to.deep.equal([]);
    expect(await buffered('readiness')).to.deep.equal([]);

    // nothing buffered: a flush runs no statement at all
    expect(await buffer.flush(clock.now())).to.deep.include({ heartbeats: 0, readiness: 0, stamped: 0 });
    expect(counting.statements).to.have.length(2);
  });

  it('writes a runner that heartbeats late in every interval at every tick: never declared orphaned, not even after Redis loses the buffer (issue 27)', async () => {
    // the reproduction: 2 stamps per statement, 3 attempts, heartbeat and tick every 2 s, orphaned after 6 s
    const small = newBuffer({ maxPerStatement: 2 });
    const sweep = sweeper(small, { everyS: 2, orphanAfterS: 6 });
    const attempts = [await running(), await running(), await running()]; // started at +0
    // in every interval the first two heartbeat early, the third just before the tick
    const offsets = [1.5, 1.0, 0.1];
    const heartbeatsOf = async (tick: number): Promise<Date[]> => {
      const times = offsets.map((offset) => at(2 * tick - offset));
      for (const [i, a] of attempts.entries()) await stampAt('attempt.heartbeat', a, times[i] as Date);
      return times;
    };
    const inPostgres = async (): Promise<Array<string | undefined>> =>
      Promise.all(attempts.map(async (a) => (await heartbeatAt(a.attemptId))?.toISOString()));

    for (let tick = 1; tick <= 8; tick++) {
      const sent = await heartbeatsOf(tick);
      clock.at(T0, 2 * tick);
      const result = await sweep.sweep();
      expect(await inPostgres(), `after tick ${tick}: every heartbeat absorbed before it`).to.deep.equal(sent.map((t) => t.toISOString()));
      expect(result.orphaned, `tick ${tick}`).to.equal(0);
    }

    // Redis loses the buffer just before a tick: PostgreSQL holds the heartbeats of one interval ago, within the threshold
    const lastFlushed = await inPostgres();
    await heartbeatsOf(9);
    await redis.del(...Object.values(small.keys));
    clock.at(T0, 18);
    expect((await sweep.sweep()).orphaned, 'no live runner orphaned by the loss').to.equal(0);
    expect(await inPostgres()).to.deep.equal(lastFlushed);
  });

  it('writes every one of 1,500 buffered heartbeats at spread-out times within two ticks, 1,000 per statement (150,000 against 100,000, scaled)', async function () {
    // FLEET_TEST_STAMP_ATTEMPTS=150000 runs it at the real size, with the default 100,000 per statement
    const ATTEMPTS = Number(process.env.FLEET_TEST_STAMP_ATTEMPTS ?? 1500);
    this.timeout(Math.max(60_000, ATTEMPTS * 2));
    const PER_STATEMENT = Math.round(ATTEMPTS / 1.5);
    const TICK_S = 30;
    const TICKS = 3;
    const attempts = await runningInBulk(ATTEMPTS);
    const attemptIds = attempts.map((a) => a.attemptId);

    const big = newBuffer({ maxPerStatement: PER_STATEMENT });
    const sweep = sweeper(big, { everyS: TICK_S, orphanAfterS: 3 * TICK_S });
    for (let tick = 1; tick <= TICKS; tick++) {
      // attempt i heartbeats at its own moment of every interval: the moments spread evenly over the interval
      const sent = attemptIds.map((_, i) => at(TICK_S * (tick - 1) + (TICK_S * i) / ATTEMPTS));
      for (let i = 0; i < ATTEMPTS; i += 10_000) {
        await Promise.all(attempts.slice(i, i + 10_000).map((a, j) => big.absorbHeartbeat(a.attemptId, a.deploymentId, sent[i + j] as Date)));
      }
      clock.at(T0, TICK_S * tick);
      const statements = counting.statements.length;
      const result = await sweep.sweep();
      const [behind] = await q<{ n: string }>(
        `SELECT count(*) AS n FROM attempts a JOIN unnest($1::uuid[], $2::timestamptz[]) AS s(id, at) ON a.id = s.id
          WHERE a.last_heartbeat_at IS DISTINCT FROM s.at`,
        [attemptIds, sent],
      );
      // within two ticks, and in fact by the first tick after the heartbeat
      expect(Number(behind?.n), `after tick ${tick}: attempts whose latest heartbeat is not in PostgreSQL`).to.equal(0);
      expect(result.orphaned, `tick ${tick}`).to.equal(0);
      expect(counting.statements.length - statements, 'heartbeat statements per flush').to.equal(Math.ceil(ATTEMPTS / PER_STATEMENT));
    }
  });

  it("has PostgreSQL plan each flush's statements for its own stamps: no cached generic plan (made for 10 rows, it was quadratic)", async () => {
    // one connection, as a pool hands the same idle one to every flush: PostgreSQL caches a generic plan for a
    // prepared statement from its sixth run on a connection
    const one = createDataSource({ url: db.url, poolSize: 1, applicationName: 'lifecycle-fleet-test' });
    await one.initialize();
    closers.push(() => one.destroy());
    const flushing = newBuffer({ db: new Database(one) });
    const attempts = await runningInBulk(200);
    const r = await ready();
    for (let flush = 1; flush <= 8; flush++) {
      await Promise.all(attempts.map((a) => flushing.absorbHeartbeat(a.attemptId, a.deploymentId, at(flush))));
      await flushing.absorbReadiness(r.deploymentId, at(flush));
      expect(await flushing.flush(at(flush))).to.deep.include({ heartbeats: 200, readiness: 1, stamped: 201 });
    }
    const cached = await one.query<Array<{ statement: string; generic_plans: string }>>(
      `SELECT statement, generic_plans FROM pg_prepared_statements WHERE statement LIKE '%unnest%'`,
    );
    expect(cached, 'prepared batch statements on the connection').to.deep.equal([]);
  });

  it('never orphans an attempt whose latest heartbeat is still in the buffer', async () => {
    const a = await running(); // started at +0, no heartbeat in PostgreSQL
    clock.at(T0, 100);
    expect(await stampAt('attempt.heartbeat', a, at(60))).to.deep.include({ reason: 'buffered' });
    expect(await heartbeatAt(a.attemptId), 'only in Redis').to.equal(null);

    // the sweep declared it at +100 from PostgreSQL's view (liveness +0, over 90 s old)
    const result = await service.apply(
      'attempt.orphaned',
      { ...a, eventId: `attempt.orphaned.${a.attemptId}.${T0.getTime()}`, actor: 'sweep' },
      { producedAt: at(100) },
    );
    expect(result).to.deep.include({ outcome: 'noop', reason: 'alive' });
    const [attempt] = await q<{ status: string }>(`SELECT status FROM attempts WHERE id = $1`, [a.attemptId]);
    expect(attempt?.status).to.equal('running');
    expect((await heartbeatAt(a.attemptId))?.toISOString(), 'the orphan path wrote it').to.equal(at(60).toISOString());
    expect(await buffered('heartbeat')).to.deep.equal([]);

    // and a runner that really went silent is still orphaned
    clock.at(T0, 200);
    const dead = await service.apply(
      'attempt.orphaned',
      { ...a, eventId: `attempt.orphaned.${a.attemptId}.${at(60).getTime()}`, actor: 'sweep' },
      { producedAt: at(200) },
    );
    expect(dead).to.deep.include({ outcome: 'applied', to: 'unknown', reason: 'orphaned' });
  });

  it('never orphans an attempt whose latest heartbeat is still in the buffer, on the batch path too (every production orphan)', async () => {
    const a = await running();
    const b = await running();
    clock.at(T0, 100);
    expect(await stampAt('attempt.heartbeat', a, at(60))).to.deep.include({ reason: 'buffered' });
    // the worker's coalescer hands the sweep's declarations to applyMany with whatever else is in flight
    const declared = (ids: { deploymentId: string; attemptId: string }) => ({
      name: 'attempt.orphaned',
      data: { ...ids, eventId: `attempt.orphaned.${ids.attemptId}.${T0.getTime()}`, actor: 'sweep' },
      options: { producedAt: at(100) },
    });
    const results = await service.applyMany([declared(a), declared(b)]);
    expect(
      results.map((r) => (r.status === 'fulfilled' ? `${r.value.outcome} ${r.value.outcome === 'noop' ? r.value.reason : ''}` : 'error')),
    ).to.deep.equal(['noop alive', 'applied ']);
    expect((await heartbeatAt(a.attemptId))?.toISOString(), 'the orphan path wrote it').to.equal(at(60).toISOString());
    const statuses = await q<{ id: string; status: string }>(`SELECT id, status FROM attempts WHERE id = ANY($1::uuid[])`, [
      [a.attemptId, b.attemptId],
    ]);
    expect(new Map(statuses.map((r) => [r.id, r.status]))).to.deep.equal(
      new Map([
        [a.attemptId, 'running'],
        [b.attemptId, 'abandoned'],
      ]),
    );
    expect(await buffered('heartbeat')).to.deep.equal([]);
  });

  it('after a Redis restart that brings back an older heartbeat, a flush never moves a stamp backwards', async function () {
    const own = await OwnRedis.start();
    const backup = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-test-redis-backup-'));
    const local = new StampBuffer({ redis: own.url, db: counting, prefix });
    closers.push(async () => {
      await local.close();
      await own.stop();
      fs.rmSync(backup, { recursive: true, force: true });
    });
    const a = await running();
    const r = await ready();
    await local.absorbHeartbeat(a.attemptId, a.deploymentId, at(10));
    await local.absorbReadiness(r.deploymentId, at(10));
    // a snapshot of Redis holding t1 = +10 (a clean stop writes everything; then a copy of its data directory)
    await own.kill('SIGTERM');
    fs.cpSync(own.dir, backup, { recursive: true });
    await own.restart();
    await waitFor('the buffer to reconnect', async () => ((await local.latestReadiness([r.deploymentId])).get(r.deploymentId) ? true : undefined));

    await local.absorbHeartbeat(a.attemptId, a.deploymentId, at(20));
    await local.absorbReadiness(r.deploymentId, at(20));
    expect(await local.flush(at(30))).to.deep.include({ stamped: 2 });
    expect((await heartbeatAt(a.attemptId))?.toISOString()).to.equal(at(20).toISOString());
    expect((await readyAt(r.deploymentId))?.toISOString()).to.equal(at(20).toISOString());

    // Redis comes back from the old snapshot (a failover to a lagging replica, a restore): it holds +10 again
    await own.kill('SIGKILL');
    own.wipe();
    fs.cpSync(backup, own.dir, { recursive: true });
    await own.restart();
    const back = await waitFor('the old snapshot to be served', async () => (await local.latestHeartbeat([a])).get(a.attemptId));
    expect(back.toISOString()).to.equal(at(10).toISOString());

    expect(await local.flush(at(40))).to.deep.include({ heartbeats: 1, readiness: 1 });
    expect((await heartbeatAt(a.attemptId))?.toISOString(), 'GREATEST: not back to +10').to.equal(at(20).toISOString());
    expect((await readyAt(r.deploymentId))?.toISOString()).to.equal(at(20).toISOString());
  });

  it('keeps a heartbeat absorbed during a flush (between its read and its removal) for the next flush', async () => {
    const a = await running();
    const b = await running();
    clock.at(T0, 100);
    await stampAt('attempt.heartbeat', a, at(50));
    let raced = false;
    const racing = newBuffer({
      hooks: {
        beforeRemove: async () => {
          if (raced) return;
          raced = true;
          // the flush has read +50 and written it; meanwhile newer heartbeats arrive
          await stampAt('attempt.heartbeat', a, at(80));
          await stampAt('attempt.heartbeat', b, at(85));
        },
      },
    });
    expect(await racing.flush(clock.now())).to.deep.include({ heartbeats: 1, stamped: 1 });
    expect((await heartbeatAt(a.attemptId))?.toISOString()).to.equal(at(50).toISOString());
    expect((await buffer.latestHeartbeat([a, b])).get(a.attemptId)?.toISOString(), 'the newer one stayed').to.equal(at(80).toISOString());

    expect(await racing.flush(clock.now())).to.deep.include({ heartbeats: 2, stamped: 2 });
    expect((await heartbeatAt(a.attemptId))?.toISOString()).to.equal(at(80).toISOString());
    expect((await heartbeatAt(b.attemptId))?.toISOString()).to.equal(at(85).toISOString());
    expect(await buffered('heartbeat')).to.deep.equal([]);
  });

  it('a flush under way: reads and the orphan path see the stamps it took; one that dies half-way leaves the rest, and the next writes them with what came since', async () => {
    const [a1, a2, a3, a4] = [await running(), await running(), await running(), await running()];
    const r = await ready(); // last_ready_at +0
    clock.at(T0, 100);
    for (const [a, s] of [
      [a1, 10],
      [a2, 20],
      [a3, 30],
      [a4, 35],
    ] as const)
      await stampAt('attempt.heartbeat', a, at(s));
    await stampAt('deployment.readiness', { deploymentId: r.deploymentId }, at(50));
    let round = 0;
    const dying = newBuffer({
      maxPerStatement: 2,
      hooks: {
        beforeRemove: async () => {
          round++;
          if (round === 1) {
            // a1 and a2 are written; a3 and a4 are taken, in neither PostgreSQL nor the absorbing set
            expect(await buffered('heartbeat')).to.deep.equal([]);
            expect((await buffer.latestHeartbeat([a3])).get(a3.attemptId)?.toISOString(), 'the read overlay').to.equal(at(30).toISOString());
            expect((await buffer.latestReadiness([r.deploymentId])).get(r.deploymentId)?.toISOString()).to.equal(at(50).toISOString());
            expect((await buffer.flushAttempt(a3.attemptId, a3.deploymentId))?.toISOString(), 'the orphan path').to.equal(at(30).toISOString());
            await stampAt('attempt.heartbeat', a1, at(40));
          } else {
            throw new Error('the flushing process died');
          }
        },
      },
    });
    let failure: unknown;
    await dying.flush(clock.now()).catch((err: unknown) => (failure = err));
    expect((failure as Error | undefined)?.message).to.equal('the flushing process died');
    expect((await heartbeatAt(a3.attemptId))?.toISOString(), 'written by the orphan path').to.equal(at(30).toISOString());
    expect(await redis.zrange(buffer.keys.heartbeatFlushing, 0, -1, 'WITHSCORES'), 'a4: written, not removed').to.deep.equal([
      heartbeatMember(a4.attemptId, a4.deploymentId),
      String(at(35).getTime()),
    ]);
    // a newer a4 arrives: the next flush merges it with what the dead one left (the later of the two) and writes both
    await stampAt('attempt.heartbeat', a4, at(45));
    expect((await buffer.latestHeartbeat([a4])).get(a4.attemptId)?.toISOString()).to.equal(at(45).toISOString());
    expect(await buffer.flush(clock.now())).to.deep.include({ heartbeats: 2, rounds: 1, stamped: 2 });
    const times = await Promise.all([a1, a2, a3, a4].map(async (a) => (await heartbeatAt(a.attemptId))?.toISOString()));
    expect(times).to.deep.equal([at(40), at(20), at(30), at(45)].map((t) => t.toISOString()));
    expect(await redis.exists(buffer.keys.heartbeat, buffer.keys.heartbeatFlushing)).to.equal(0);
  });

  it('keeps stamps of what does not exist yet until the not-yet horizon, then drops them; drops what is not running / not ready', async () => {
    const later = { deploymentId: randomUUID(), attemptId: randomUUID() };
    const never = { deploymentId: randomUUID(), attemptId: randomUUID() };
    const neverDeployment = randomUUID();
    // exists but not stampable: a pending attempt, a deployment that is not ready
    const pending = { deploymentId: randomUUID(), attemptId: randomUUID() };
    await apply('deployment.create', { deploymentId: pending.deploymentId, name: 'web' });
    await apply('attempt.create', pending);
    // an attempt named with the wrong deployment is as good as absent
    const mismatched = { attemptId: (await running()).attemptId, deploymentId: randomUUID() };

    for (const x of [later, never, pending, mismatched]) await stampAt('attempt.heartbeat', x, at(0));
    await stampAt('deployment.readiness', { deploymentId: neverDeployment }, at(0));
    await stampAt('deployment.readiness', { deploymentId: pending.deploymentId }, at(0));

    clock.at(T0, 10);
    expect(await buffer.flush(clock.now())).to.deep.include({ heartbeats: 4, readiness: 2, stamped: 0, dropped: 2, kept: 4 });
    expect(await buffered('heartbeat')).to.have.members([later, never, mismatched].map((x) => heartbeatMember(x.attemptId, x.deploymentId)));
    expect(await buffered('readiness')).to.deep.equal([neverDeployment]);

    // `later` is created in time: the next flush stamps its heartbeat
    await apply('deployment.create', { deploymentId: later.deploymentId, name: 'web' });
    await apply('attempt.create', later);
    await apply('attempt.start', later);
    clock.at(T0, 30); // exactly at the horizon: still kept
    expect(await buffer.flush(clock.now())).to.deep.include({ stamped: 1, dropped: 0, kept: 3 });
    expect((await heartbeatAt(later.attemptId))?.toISOString()).to.equal(at(0).toISOString());

    clock.at(T0, 31); // past it: dropped
    expect(await buffer.flush(clock.now())).to.deep.include({ heartbeats: 2, readiness: 1, stamped: 0, dropped: 3, kept: 0 });
    expect(await buffered('heartbeat')).to.deep.equal([]);
    expect(await buffered('readiness')).to.deep.equal([]);
  });

  it("serves a buffered readiness stamp at once (the read model and dispatch overlay it), and PostgreSQL's alone when Redis is away", async () => {
    const r = await ready(); // last_ready_at +0
    clock.at(T0, 100);
    await stampAt('deployment.readiness', { deploymentId: r.deploymentId }, at(90));
    await stampAt('attempt.heartbeat', r, at(95)); // the attempt has ended: not overlaid
    const view = await getDeployment(db.dataSource, r.deploymentId, { stampBuffer: buffer });
    expect(view?.lastReadyAt).to.equal(at(90).toISOString());
    expect(view?.currentAttempt?.lastHeartbeatAt).to.equal(null);
    expect((await getDeployment(db.dataSource, r.deploymentId))?.lastReadyAt, 'without the buffer').to.equal(at(0).toISOString());

    // a buffer whose Redis does not answer: the read answers from PostgreSQL within readTimeoutMs
    const own = await OwnRedis.start();
    const away = new StampBuffer({ redis: own.url, db: counting, prefix, readTimeoutMs: 200 });
    closers.push(async () => {
      await away.close();
      await own.stop();
    });
    await away.latestReadiness([r.deploymentId]);
    own.pause();
    const fallback = await getDeployment(db.dataSource, r.deploymentId, { stampBuffer: away });
    expect(fallback?.lastReadyAt).to.equal(at(0).toISOString());
    own.resume();
  });

  it('costs at most 0.01 PostgreSQL commits per heartbeat through the lifecycle worker', async function () {
    const N = 2000;
    const ATTEMPTS = 200;
    const target = await createDatabase();
    const admin = new Client({ connectionString: testEnv().databaseUrl });
    await admin.connect();
    const producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    let ds = createDataSource({ url: target.url, poolSize: 8, applicationName: 'lifecycle-fleet-test' });
    let worker: LifecycleWorker | null = null;
    closers.push(async () => {
      await worker?.close(5000);
      await producer.close();
      if (ds.isInitialized) await ds.destroy();
      await admin.end();
      await target.drop();
    });
    await ds.initialize();
    await migrate(ds);
    const setup = new TransitionService({ dataSource: ds, now: clock.now });
    const attempts: Array<{ deploymentId: string; attemptId: string }> = [];
    for (let i = 0; i < ATTEMPTS; i++) {
      const ids = { deploymentId: randomUUID(), attemptId: randomUUID() };
      await setup.apply('deployment.create', { deploymentId: ids.deploymentId, name: 'web', eventId: `c-${ids.deploymentId}` });
      await setup.apply('attempt.create', { ...ids, eventId: `ac-${ids.attemptId}` });
      await setup.apply('attempt.start', { ...ids, eventId: `as-${ids.attemptId}` });
      attempts.push(ids);
    }

    // A backend reports its commits when it exits: close every connection to the database before each count.
    const commits = async (): Promise<number> => {
      if (ds.isInitialized) await ds.destroy();
      return waitFor("the database's backends to exit and report", async () => {
        const { rows } = await admin.query<{ n: string; c: string }>(
          `SELECT numbackends AS n, xact_commit AS c FROM pg_stat_database WHERE datname = $1`,
          [target.name],
        );
        return rows[0] !== undefined && Number(rows[0].n) === 0 ? Number(rows[0].c) : undefined;
      });
    };
    const before = await commits();

    ds = createDataSource({ url: target.url, poolSize: 8, applicationName: 'lifecycle-fleet-test' });
    await ds.initialize();
    const local = new StampBuffer({ redis, db: new Database(ds), prefix });
    const wired = new TransitionService({ dataSource: ds, stampBuffer: local });
    for (let i = 0; i < N; i += 200) {
      await Promise.all(
        Array.from({ length: 200 }, (_, j) => producer.heartbeat(attempts[(i + j) % ATTEMPTS] as { deploymentId: string; attemptId: string })),
      );
    }
    worker = new LifecycleWorker({ connection: testEnv().redisUrl, prefix, service: wired, stampBuffer: local, concurrency: 16 });
    await waitFor(`${N} heartbeat jobs to complete`, async () => ((await producer.queue.getCompletedCount()) === N ? true : undefined), 60_000);
    const [sample] = await producer.queue.getCompleted(0, 0);
    expect(sample?.returnvalue).to.deep.include({ outcome: 'noop', reason: 'buffered' });
    await worker.close(5000);
    worker = null;

    expect(await local.flush(new Date())).to.deep.include({ heartbeats: ATTEMPTS, stamped: ATTEMPTS });
    const after = await commits();
    const perHeartbeat = (after - before) / N;
    expect(perHeartbeat, `${after - before} commits for ${N} heartbeats`).to.be.at.most(0.01);

    const check = createDataSource({ url: target.url, poolSize: 1, applicationName: 'lifecycle-fleet-test' });
    await check.initialize();
    const [row] = await check.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM attempts WHERE last_heartbeat_at IS NOT NULL`);
    await check.destroy();
    expect(Number(row?.n)).to.equal(ATTEMPTS);
  });
});
