/**
 * Readiness probing shared across workers (docs/architecture.md, "Readiness probing"): a tick's shards go to the
 * maintenance queue as `probe` jobs that any sweep worker runs, each exactly once, and never after its tick's
 * deadline; the tick's heartbeat flush comes before orphan detection.
 */
import { randomUUID } from 'node:crypto';
import { Writable } from 'node:stream';
import { expect } from 'chai';
import { Queue, type Job } from 'bullmq';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { StampBuffer } from '../../src/services/stamps';
import { Database } from '../../src/entities/sql';
import {
  PROBE_JOB_NAME,
  Sweeper,
  type ShardJobData,
  type ShardReport,
  type SweeperOptions,
  type SweepResult,
} from '../../src/services/sweep/sweeper';
import { TransitionService } from '../../src/services/transitions';
import { SWEEP_JOB_NAME, SWEEP_JOB_OPTIONS, SweepWorker, type SweepJobResult, type SweepWorkerOptions } from '../../src/workers/sweep-worker';
import { createLogger, type Logger } from '../../src/log';
import { ManualClock } from '../helpers/clock';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { ReadyServer } from '../helpers/ready-server';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';
import { runningAttempt } from '../helpers/lifecycle';

const ENDPOINTS = 40;

/** Collects everything a pino logger writes, one JSON record a line. */
class Capture extends Writable {
  text = '';
  override _write(chunk: Buffer, _encoding: string, callback: () => void): void {
    this.text += chunk.toString();
    callback();
  }
  records(msg: string): Array<Record<string, unknown>> {
    return this.text
      .split('\n')
      .filter((line) => line.trim() !== '')
      .map((line) => JSON.parse(line) as Record<string, unknown>)
      .filter((record) => record.msg === msg);
  }
}

describe('readiness shards: probing shared across sweep workers', function () {
  this.timeout(30_000);
  let db: TestDatabase;
  let prefix: string;
  let producer: LifecycleProducer;
  let queue: Queue;
  let connection: ReturnType<typeof testRedis>;
  let node: ReadyServer;
  const workers: SweepWorker[] = [];
  const t0 = new Date('2030-01-01T00:00:00.000Z');

  before(async () => {
    db = await openTestDatabase(8);
  });
  after(async () => {
    await db?.close();
  });
  beforeEach(async () => {
    await db.dataSource.query(`TRUNCATE deployments, attempts, state_transitions, outbox, processed_events`);
    prefix = uniquePrefix();
    producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    connection = testRedis();
    queue = new Queue(MAINTENANCE_QUEUE, { connection, prefix });
    node = new ReadyServer('ok');
    await node.listen();
    await db.dataSource.query(
      `INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, last_ready_at, state_changed_at)
       SELECT gen_random_uuid(), 'r-' || i, 'ready', 3, $2 || '/e/' || i, 'node_port', NULL, $1::timestamptz - interval '1 hour'
         FROM generate_series(1, ${ENDPOINTS}) AS i`,
      [t0, node.url],
    );
  });
  afterEach(async () => {
    await Promise.all(workers.splice(0).map((w) => w.close(5000)));
    await node.close();
    await producer.close();
    await queue.close();
    connection.disconnect();
    await dropPrefix(prefix);
  });

  function sweeper(clock: ManualClock, options: Partial<SweeperOptions> = {}): Sweeper {
    return new Sweeper({ dataSource: db.dataSource, producer, shardQueue: queue, now: clock.now, shardSize: 10, probeBudgetMs: 10_000, ...options });
  }

  /** A sweep worker taking maintenance jobs without registering the scheduler (the test plans its own ticks). */
  function startWorker(name: string, runner: SweepWorkerOptions['sweeper'], logger?: Logger): SweepWorker {
    const worker = new SweepWorker({
      connection: testEnv().redisUrl,
      prefix,
      everyS: 3600,
      name,
      sweeper: runner,
      concurrency: 2,
      recheckEveryMs: 0,
      logger,
    });
    workers.push(worker);
    worker.worker.run().catch(() => undefined);
    return worker;
  }

  async function shardJobs(count: number): Promise<Array<Job<unknown, ShardReport>>> {
    return waitFor(`${count} probe jobs to complete`, async () => {
      const done = (await queue.getJobs(['completed'], 0, -1)) as Array<Job<unknown, ShardReport>>;
      const probes = done.filter((j) => j.name === PROBE_JOB_NAME);
      return probes.length >= count ? probes : undefined;
    });
  }

  async function stampedCount(): Promise<number> {
    const [row] = await db.dataSource.query<Array<{ n: string }>>(
      `SELECT count(*) AS n FROM deployments WHERE last_ready_at IS NOT NULL AND last_probed_at IS NOT NULL`,
    );
    return Number(row?.n);
  }

  it('puts a tick on the queue as shards that two workers share, each endpoint probed once', async () => {
    const clock = new ManualClock(t0);
    const planner = sweeper(clock);
    startWorker('worker-a', sweeper(clock));
    startWorker('worker-b', sweeper(clock));
    const result: SweepResult = await planner.sweep('1000');
    expect(result).to.deep.include({ queued: true, tick: '1000', endpoints: ENDPOINTS, shards: 4 });
    const jobs = await shardJobs(4);
    expect(jobs.map((j) => j.id).sort()).to.deep.equal(['probe-1000-0', 'probe-1000-1', 'probe-1000-2', 'probe-1000-3']);
    expect(jobs.every((j) => j.returnvalue.ran === 'probed' && j.returnvalue.stamped === 10)).to.equal(true);
    expect(new Set(node.requests).size).to.equal(ENDPOINTS);
    expect(node.requests).to.have.length(ENDPOINTS);
    expect(await stampedCount()).to.equal(ENDPOINTS);
    // a finished shard keeps its report but not its ids
    expect((jobs[0]?.data as { ids: unknown[] }).ids).to.deep.equal([]);
  });

  it('never runs a shard after its tick: shards still waiting when the next tick comes are skipped, the next tick probes everything once', async () => {
    const clock = new ManualClock(t0);
    const planner = sweeper(clock);
    await planner.sweep('1000'); // nobody takes these in time
    clock.at(t0, 30); // past the first tick's 10 s budget
    await planner.sweep('2000');
    await planner.sweep('2000'); // a tick planned twice adds nothing
    expect(await queue.getJobCounts('prioritized')).to.deep.equal({ prioritized: 8 });
    startWorker('worker-a', sweeper(clock));
    const jobs = await shardJobs(8);
    const late = jobs.filter((j) => j.id?.startsWith('probe-1000-'));
    const ran = jobs.filter((j) => j.id?.startsWith('probe-2000-'));
    expect(late.map((j) => j.returnvalue)).to.have.length(4);
    expect(late.every((j) => j.returnvalue.ran === 'late' && j.returnvalue.probed === 0 && j.returnvalue.unprobed === 10)).to.equal(true);
    expect(ran.every((j) => j.returnvalue.ran === 'probed' && j.returnvalue.probed === 10)).to.equal(true);
    expect(node.requests, 'each endpoint once').to.have.length(ENDPOINTS);
    expect(new Set(node.requests).size).to.equal(ENDPOINTS);
    const [row] = await db.dataSource.query<Array<{ min: Date }>>(`SELECT min(last_ready_at) AS min FROM deployments`);
    expect(row?.min.toISOString(), 'stamped by the probes of the second tick').to.equal(clock.now().toISOString());
  });

  it('never runs a shard twice: one delivered again after it started (its worker stalled) is claimed already', async () => {
    const clock = new ManualClock(t0);
    await sweeper(clock).sweep('1000');
    startWorker('worker-a', sweeper(clock));
    const [first] = await shardJobs(4);
    if (first === undefined) throw new Error('no job');
    const probes = node.requests.length;
    // what BullMQ does with a stalled job: the same id, delivered again
    const id = first.id ?? '';
    const again = (await queue.getJob(id)) as Job;
    await again.remove();
    await queue.add(PROBE_JOB_NAME, { ...(first.data as object), ids: [randomUUID()] }, { jobId: id, priority: 1 });
    const redelivered = await waitFor('the redelivered shard to complete', async () => {
      if ((await queue.getJobState(id)) !== 'completed') return undefined;
      return (await queue.getJob(id)) as Job<unknown, ShardReport> | undefined;
    });
    expect(redelivered.returnvalue).to.deep.include({ ran: 'duplicate', probed: 0 });
    expect(node.requests).to.have.length(probes);
  });

  it('never sweeps a tick twice: a tick job delivered again after it started (its worker stalled) is claimed already', async () => {
    const clock = new ManualClock(t0);
    const swept: string[] = [];
    const counting = (inner: Sweeper): SweepWorkerOptions['sweeper'] => ({
      sweep: (tick) => {
        swept.push(tick ?? '');
        return inner.sweep(tick);
      },
      runShard: (data) => inner.runShard(data),
    });
    const capture = new Capture();
    const logger = createLogger('info', capture);
    const tick = String(t0.getTime());
    const id = `repeat:sweep:${tick}`; // the id the job scheduler gives a tick's job
    const completed = (what: string) =>
      waitFor(what, async () => {
        if ((await queue.getJobState(id)) !== 'completed') return undefined;
        return (await queue.getJob(id)) as Job<unknown, SweepJobResult> | undefined;
      });
    const a = startWorker('worker-a', counting(sweeper(clock)), logger);
    await queue.add(SWEEP_JOB_NAME, {}, { ...SWEEP_JOB_OPTIONS, jobId: id });
    expect((await completed('the tick to complete')).returnvalue).to.deep.include({ tick, queued: true, shards: 4 });
    await shardJobs(4);
    // worker-a is cut off and its lock lapses; what BullMQ does then: the same id, delivered again, to another worker
    await a.close(5000);
    startWorker('worker-b', counting(sweeper(clock)), logger);
    await ((await queue.getJob(id)) as Job).remove();
    await queue.add(SWEEP_JOB_NAME, {}, { ...SWEEP_JOB_OPTIONS, jobId: id });
    expect((await completed('the redelivered tick to complete')).returnvalue).to.deep.equal({ tick, ran: 'duplicate' });
    expect(swept, 'sweep() ran once for the tick').to.deep.equal([tick]);
    expect(capture.records('sweep tick started').map((r) => [r.tick, r.jobId])).to.deep.equal([[tick, id]]);
    expect(capture.records('sweep tick delivered again after it started: not run twice').map((r) => [r.tick, r.jobId, r.claimedBy])).to.deep.equal([
      [tick, id, 'worker-a'],
    ]);
    const claim = `${prefix}:${MAINTENANCE_QUEUE}:sweep-claim:${tick}`;
    expect(await connection.get(claim)).to.equal('worker-a');
    expect(await connection.pttl(claim), 'kept past any redelivery: max(10 min, 10 ticks)').to.be.greaterThan(9 * 3600_000);
    expect(node.requests, 'each endpoint once').to.have.length(ENDPOINTS);
  });

  it('stamps no endpoint whose URL changed while its probe was in flight: the old URL answering says nothing of the new', async () => {
    const clock = new ManualClock(t0);
    await sweeper(clock).sweep('1000');
    const [job] = (await queue.getJobs(['prioritized'], 0, -1)).filter((j) => j.id === 'probe-1000-0');
    const data = job?.data as ShardJobData;
    const moved = data.ids[0] as string;
    const [before] = await db.dataSource.query<Array<{ endpoint_url: string }>>(`SELECT endpoint_url FROM deployments WHERE id = $1`, [moved]);
    const oldPath = `${new URL(before?.endpoint_url ?? '').pathname}/ready`;
    // while the shard's probe of the old URL is in flight, the deployment's endpoint moves (as a new attempt's end with
    // another endpoint would move it)
    node.beforeAnswer = async (path) => {
      if (path === oldPath) await db.dataSource.query(`UPDATE deployments SET endpoint_url = $2 WHERE id = $1`, [moved, `${node.url}/moved`]);
    };
    const report = await sweeper(clock).runShard(data);
    expect(report).to.deep.include({ probed: 10, failed: 0, stamped: 9 });
    const [row] = await db.dataSource.query<Array<{ last_ready_at: Date | null; last_probed_at: Date | null }>>(
      `SELECT last_ready_at, last_probed_at FROM deployments WHERE id = $1`,
      [moved],
    );
    expect(row?.last_ready_at, 'not stamped by the old URL').to.equal(null);
    expect(row?.last_probed_at?.toISOString(), 'but probed: the round-robin moves on').to.equal(t0.toISOString());
  });

  it('writes the buffered heartbeats before it looks for orphans: an attempt alive only in Redis is not orphaned', async () => {
    const clock = new ManualClock(t0);
    const service = new TransitionService({ dataSource: db.dataSource, now: clock.now });
    const ids = await runningAttempt(service);
    const buffer = new StampBuffer({ redis: testEnv().redisUrl, db: new Database(db.dataSource), prefix });
    try {
      // started at t0; the last heartbeat (at +80 s) waits in Redis; at +120 s PostgreSQL alone says 120 s silent
      await buffer.absorbHeartbeat(ids.attemptId, ids.deploymentId, new Date(t0.getTime() + 80_000));
      clock.at(t0, 120);
      const tick = sweeper(clock, { flushStamps: async (now) => (await buffer.flush(now)).stamped });
      expect(await tick.sweep('3000')).to.deep.include({ flushed: 1, orphaned: 0 });
      const [row] = await db.dataSource.query<Array<{ last_heartbeat_at: Date }>>(`SELECT last_heartbeat_at FROM attempts WHERE id = $1`, [
        ids.attemptId,
      ]);
      expect(row?.last_heartbeat_at.toISOString()).to.equal(new Date(t0.getTime() + 80_000).toISOString());
      // without the flush the same tick declares it orphaned
      await db.dataSource.query(`UPDATE attempts SET last_heartbeat_at = NULL WHERE id = $1`, [ids.attemptId]);
      expect(await sweeper(clock).sweep('3001')).to.deep.include({ flushed: 0, orphaned: 1 });
    } finally {
      await buffer.close();
    }
  });
});
