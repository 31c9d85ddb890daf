/**
 * Clocks that disagree (issue 17, part 6). Processes run under Debian's `faketime` with their clocks minutes off:
 *
 * - a producer whose clock is 120 s behind (and one 120 s ahead) enqueues an attempt's heartbeats through the SDK
 *   every 10 s of fleet time; the lifecycle worker, the stamp buffer and the sweep run in this process on one
 *   injected clock (the fleet clock's place: every component reads its time from there) with a 90 s orphan
 *   threshold. Over six minutes no tick declares the live attempt orphaned; once its heartbeats stop, it is orphaned
 *   within the threshold plus one tick.
 * - a process whose clock is 300 s behind reads the fleet clock within 1 s of Redis's TIME.
 *
 * Time passes by moving the injected clock, never by sleeping. Without `faketime` the suite is skipped, saying so.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import * as readline from 'node:readline';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { FleetClock } from '../../src/redis/fleet-clock';
import { LifecycleProducer } from '../../src/queues/producer';
import { createRedis, type RedisConnection } from '../../src/redis/connection';
import { StampBuffer } from '../../src/services/stamps';
import { Sweeper } from '../../src/services/sweep/sweeper';
import { TransitionService } from '../../src/services/transitions';
import { Database } from '../../src/entities/sql';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { repoRoot } from '../../src/util';
import { ManualClock, ShiftedRedis } from '../helpers/clock';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';
import { runningAttempt } from '../helpers/lifecycle';

const FIXTURES = path.join(repoRoot(), 'dist', 'test', 'fixtures');
const HAVE_FAKETIME = spawnSync('faketime', ['-f', '+0s', 'true']).status === 0;
const ORPHAN_AFTER_S = 90;
const TICK_S = 10;

/** A child process that answers in JSON lines. */
class LineChild {
  private readonly lines: AsyncIterator<string>;
  private stderr = '';

  constructor(readonly child: ChildProcess) {
    if (child.stdout === null || child.stderr === null) throw new Error('spawn with piped stdout and stderr');
    this.lines = readline.createInterface({ input: child.stdout })[Symbol.asyncIterator]();
    child.stderr.on('data', (chunk: Buffer) => (this.stderr += chunk.toString()));
  }

  async next<T>(): Promise<T> {
    const line = await this.lines.next();
    if (line.done === true) throw new Error(`the child exited without answering: ${this.stderr}`);
    return JSON.parse(line.value) as T;
  }

  send(line: string): void {
    this.child.stdin?.write(`${line}\n`);
  }

  /** Ends its input (the fixture closes and exits), then SIGTERM if it has not exited within a second. */
  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((resolve) => this.child.once('exit', resolve));
    this.child.stdin?.end();
    const kill = setTimeout(() => this.child.kill('SIGTERM'), 1000);
    await exited;
    clearTimeout(kill);
  }
}

function underFaketime(skewS: number, fixture: string, env: Record<string, string>): LineChild {
  const offset = `${skewS >= 0 ? '+' : ''}${skewS}s`;
  return new LineChild(
    spawn('faketime', ['-f', offset, process.execPath, path.join(FIXTURES, fixture)], {
      env: { ...process.env, ...env },
      stdio: ['pipe', 'pipe', 'pipe'],
    }),
  );
}

async function redisTimeMs(redis: IORedis): Promise<number> {
  const [s, us] = await redis.time();
  return Number(s) * 1000 + Number(us) / 1000;
}

describe('clocks that disagree: hosts minutes off (faketime)', function () {
  this.timeout(120_000);
  let db: TestDatabase;
  let redis: IORedis;
  let prefix: string;
  const closers: Array<() => Promise<void>> = [];

  before(async function () {
    if (!HAVE_FAKETIME) {
      // never silently: the run says the clock tests did not run, and why
      console.log('      SKIPPED: `faketime` is not installed (Debian: apt-get install faketime); the clock tests did not run');
      this.skip();
    }
    db = await openTestDatabase(8);
    redis = testRedis();
  });
  after(async () => {
    redis?.disconnect();
    await db?.close();
  });
  beforeEach(async () => {
    await db.dataSource.query(`TRUNCATE deployments, attempts, state_transitions, outbox, processed_events`);
    prefix = uniquePrefix();
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    await dropPrefix(prefix);
  });

  for (const skewS of [-120, 120]) {
    it(`a producer ${Math.abs(skewS)} s ${skewS < 0 ? 'behind' : 'ahead'}, heartbeating every 10 s with a 90 s threshold: no false orphan; silenced, orphaned within threshold + one tick`, async () => {
      // the fleet's clock starts at the real time, so the producer's job timestamps are really 120 s off it
      const t0 = new Date(Math.floor(Date.now() / 1000) * 1000);
      const clock = new ManualClock(t0);
      const { redisUrl } = testEnv();
      const buffer = new StampBuffer({ redis: redisUrl, db: new Database(db.dataSource), prefix });
      closers.push(() => buffer.close());
      const service = new TransitionService({ dataSource: db.dataSource, now: clock.now, orphanAfterS: ORPHAN_AFTER_S, stampBuffer: buffer });
      const worker = new LifecycleWorker({ connection: redisUrl, prefix, service, stampBuffer: buffer, concurrency: 4 });
      closers.push(() => worker.close(5000));
      const producer = new LifecycleProducer({ connection: redisUrl, prefix });
      closers.push(() => producer.close());
      const sweeper = new Sweeper({
        dataSource: db.dataSource,
        producer,
        now: clock.now,
        flushStamps: async (now) => (await buffer.flush(now)).stamped,
        everyS: TICK_S,
        readyWindowS: 120,
        orphanAfterS: ORPHAN_AFTER_S,
        progressDeadlineS: 1800,
      });

      const ids = await runningAttempt(service);

      const runner = underFaketime(skewS, 'heartbeat-producer.js', {
        REDIS_URL: redisUrl,
        FLEET_PREFIX: prefix,
        ...{ DEPLOYMENT_ID: ids.deploymentId, ATTEMPT_ID: ids.attemptId },
      });
      closers.push(() => runner.stop());
      const { ready } = await runner.next<{ ready: number }>();
      expect((ready - Date.now()) / 1000, "the producer's clock is off").to.be.closeTo(skewS, 5);

      // six minutes of fleet time: a heartbeat every 10 s, a sweep tick every 10 s
      let orphaned = 0;
      let lastBeat = t0;
      for (let i = 0; i < 36; i++) {
        lastBeat = clock.advance(TICK_S);
        runner.send('beat');
        const { jobId, timestamp } = await runner.next<{ jobId: string; timestamp: number }>();
        expect((timestamp - Date.now()) / 1000, "the job's timestamp is the producer's clock").to.be.closeTo(skewS, 5);
        const state = await waitFor(`heartbeat ${jobId} processed`, async () => {
          const s = await producer.queue.getJobState(jobId);
          return s === 'completed' || s === 'failed' ? s : undefined;
        });
        expect(state).to.equal('completed');
        orphaned += (await sweeper.sweep()).orphaned;
      }
      expect(orphaned, 'false orphans').to.equal(0);
      const [stamp] = await db.dataSource.query<Array<{ at: Date }>>(`SELECT last_heartbeat_at AS at FROM attempts WHERE id = $1`, [ids.attemptId]);
      expect(stamp?.at.toISOString(), 'the last heartbeat records the fleet clock').to.equal(lastBeat.toISOString());

      // the runner goes silent: the ticks go on
      await runner.stop();
      let declaredAt: Date | null = null;
      while (declaredAt === null) {
        const now = clock.advance(TICK_S);
        expect((now.getTime() - lastBeat.getTime()) / 1000, 'orphaned within threshold + one tick').to.be.at.most(ORPHAN_AFTER_S + TICK_S);
        if ((await sweeper.sweep()).orphaned === 1) declaredAt = now;
      }
      expect((declaredAt.getTime() - lastBeat.getTime()) / 1000).to.be.greaterThan(ORPHAN_AFTER_S);
      await waitFor('the orphan applied', async () => {
        const [row] = await db.dataSource.query<Array<{ state: string }>>(`SELECT state FROM deployments WHERE id = $1`, [ids.deploymentId]);
        return row?.state === 'unknown' ? true : undefined;
      });
    });
  }

  it('a process whose clock is 300 s behind reads the fleet clock within 1 s of Redis TIME', async () => {
    const child = underFaketime(-300, 'fleet-clock-process.js', { REDIS_URL: testEnv().redisUrl });
    closers.push(() => child.stop());
    const reported = await child.next<{ local: number; fleet: number; offset: number; uncertaintyMs: number }>();
    const redisNow = await redisTimeMs(redis);
    expect((reported.local - Date.now()) / 1000, "the process's own clock is off").to.be.closeTo(-300, 5);
    expect(reported.offset / 1000).to.be.closeTo(300, 5);
    // read before the line reached us: at most Redis's now (give or take the half round trip the offset is known
    // within: on a busy machine that is more than a few ms), and within 1 s of it
    expect(reported.uncertaintyMs).to.be.a('number').and.at.least(0);
    expect(reported.fleet).to.be.at.most(redisNow + reported.uncertaintyMs + 1);
    expect(redisNow - reported.fleet).to.be.lessThan(1000);
  });
});

describe("the fleet clock when Redis's clock jumps (a failover to a host whose clock differs)", function () {
  this.timeout(60_000);
  let shifted: ShiftedRedis | null = null;
  let redis: RedisConnection;
  const local = () => performance.timeOrigin + performance.now(); // the fleet clock's own local time

  before(async function () {
    const started = await ShiftedRedis.start();
    if (typeof started === 'string') {
      console.log(`      SKIPPED: ${started}; the clock-jump tests did not run`);
      this.skip();
    }
    shifted = started;
    redis = createRedis(started.server.url, 'producer', 'fleet-clock-jump-test');
  });
  after(async () => {
    redis?.disconnect();
    await shifted?.stop();
  });

  /** One sample; its round trip is at most the call's duration, which is returned. */
  async function timedSample(clock: FleetClock): Promise<number> {
    const start = performance.now();
    expect(await clock.sample(), 'the sample was taken').to.equal(true);
    return performance.now() - start;
  }

  /** A sample answered slowly: the server frozen for a moment (a loaded new master). How long does not matter, only
   * that its round trip is longer than the ones before it. */
  async function slowSample(clock: FleetClock): Promise<number> {
    shifted?.server.pause();
    const sampling = timedSample(clock);
    await new Promise((resolve) => setTimeout(resolve, 200));
    shifted?.server.resume();
    return sampling;
  }

  /** Redis's clock minus this process's, from one TIME: the interval it must lie in. */
  async function trueOffset(): Promise<{ low: number; high: number }> {
    const sent = local();
    const [s, us] = await redis.time();
    const received = local();
    const redisMs = Number(s) * 1000 + Number(us) / 1000;
    return { low: redisMs - received, high: redisMs - sent };
  }

  /** The documented bound: the offset in use is off by at most half the round trip of its sample (+1 ms of rounding). */
  async function expectWithinBound(clock: FleetClock, roundTripMs: number, what: string): Promise<void> {
    const truth = await trueOffset();
    expect(clock.offset, what).to.be.within(truth.low - roundTripMs / 2 - 1, truth.high + roundTripMs / 2 + 1);
  }

  it('a jump of +60 s then -120 s: the next sample starts the samples over, within half its round trip of Redis', async () => {
    const clock = new FleetClock({ redis, maxRoundTripMs: 10_000 });
    let fastest = Infinity;
    for (let i = 0; i < 5; i++) fastest = Math.min(fastest, await timedSample(clock));
    await expectWithinBound(clock, fastest, 'before the jump');

    shifted?.shift(60_000);
    let slow = await slowSample(clock);
    expect(slow, 'the sample after the jump is slower than the kept one').to.be.greaterThan(fastest);
    await expectWithinBound(clock, slow, 'after the jump, at once');
    const before = clock.now().getTime();
    const [s, us] = await redis.time();
    const after = clock.now().getTime();
    const redisMs = Number(s) * 1000 + Number(us) / 1000;
    expect(redisMs, "the fleet clock's time: Redis's").to.be.within(before - slow / 2 - 1, after + slow / 2 + 1);
    // a faster sample after it is used again
    const fast = await timedSample(clock);
    await expectWithinBound(clock, Math.min(slow, fast), 'after a faster sample');

    // and back past where it was: the offset follows at once; the time itself holds still (it never goes back)
    const held = clock.now().getTime();
    shifted?.shift(-60_000);
    slow = await slowSample(clock);
    await expectWithinBound(clock, slow, 'after jumping back');
    expect(clock.now().getTime()).to.equal(held);
    clock.close();
  });
});
