import { spawn, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import { expect } from 'chai';
import { Queue, type Job } from 'bullmq';
import type { Logger as TypeOrmLogger } from 'typeorm';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { ServerWatch } from '../../src/redis/connection';
import { createDataSource } from '../../src/entities/schema/data-source';
import { TcpProxy } from '../helpers/proxy';
import { resolveEndpoint, type ResolvedEndpoint } from '../../src/services/dispatch/resolve-endpoint';
import { getDeployment } from '../../src/services/read-model/views';
import { SWEEP_SQL } from '../../src/entities/sql';
import { Sweeper, type SweeperOptions, type SweepResult } from '../../src/services/sweep/sweeper';
import { TransitionService } from '../../src/services/transitions';
import type { Endpoint } from '../../src/machine';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { ensureSweepScheduler, SweepWorker } from '../../src/workers/sweep-worker';
import { ManualClock } from '../helpers/clock';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { closedPortUrl, ReadyServer, type ReadyMode } from '../helpers/ready-server';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';
import { applied, runningAttempt } from '../helpers/lifecycle';
import { createLogger } from '../../src/log';
import { repoRoot } from '../../src/util';

const ROOT = repoRoot();
const PUBLIC = 'https://public.example.com';

interface Row {
  state: string;
  version: number;
  endpoint_url: string | null;
  last_ready_at: Date | null;
}

/** Counts the SQL statements a DataSource issues. */
class CountingLogger implements TypeOrmLogger {
  readonly queries: string[] = [];
  logQuery(query: string): void {
    this.queries.push(query);
  }
  logQueryError(): void {}
  logQuerySlow(): void {}
  logSchemaBuild(): void {}
  logMigration(): void {}
  log(): void {}
}

/** Every index a JSON plan scans, and every node type in it. */
function planSummary(plan: unknown): { indexes: string[]; nodes: string[] } {
  const indexes: string[] = [];
  const nodes: string[] = [];
  const walk = (node: unknown): void => {
    if (Array.isArray(node)) {
      node.forEach(walk);
      return;
    }
    if (typeof node !== 'object' || node === null) return;
    const record = node as Record<string, unknown>;
    if (typeof record['Node Type'] === 'string') nodes.push(record['Node Type']);
    if (typeof record['Index Name'] === 'string') indexes.push(record['Index Name']);
    Object.values(record).forEach(walk);
  };
  walk(plan);
  return { indexes, nodes };
}

describe('sweep: readiness heartbeats, orphans and deadlines', function () {
  this.timeout(30_000);
  let db: TestDatabase;
  let prefix: string;
  let producer: LifecycleProducer;
  const servers: ReadyServer[] = [];
  const workers: LifecycleWorker[] = [];

  before(async () => {
    db = await openTestDatabase(16);
  });
  after(async () => {
    await db?.close();
  });
  beforeEach(async () => {
    await db.dataSource.query(`TRUNCATE deployments, attempts, state_transitions, outbox, processed_events`);
    prefix = uniquePrefix();
    producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
  });
  afterEach(async () => {
    await Promise.all(workers.splice(0).map((w) => w.close(5000)));
    await Promise.all(servers.splice(0).map((s) => s.close()));
    await producer.close();
    await dropPrefix(prefix);
  });

  async function server(mode: ReadyMode): Promise<ReadyServer> {
    const s = new ReadyServer(mode);
    servers.push(s);
    await s.listen();
    return s;
  }

  function sweeper(clock: ManualClock, options: Partial<SweeperOptions> = {}): Sweeper {
    return new Sweeper({ dataSource: db.dataSource, producer, now: clock.now, readyWindowS: 120, ...options });
  }

  /** A deployment that became ready (or failed) with this endpoint at the clock's time: ready stamps last_ready_at. */
  async function ended(service: TransitionService, endpoint: Endpoint, outcome: 'succeeded' | 'failed' = 'succeeded'): Promise<string> {
    const ids = await runningAttempt(service);
    await applied(service, 'attempt.end', { ...ids, outcome, endpoint });
    return ids.deploymentId;
  }

  async function rowsOf(ids: Record<string, string>): Promise<Record<string, Row>> {
    const rows = await db.dataSource.query<Array<Row & { id: string }>>(
      `SELECT id, state, version, endpoint_url, last_ready_at FROM deployments WHERE id = ANY($1)`,
      [Object.values(ids)],
    );
    const byId = new Map(rows.map((r) => [r.id, r]));
    return Object.fromEntries(
      Object.entries(ids).map(([key, id]) => {
        const r = byId.get(id);
        if (r === undefined) throw new Error(`no row for ${key}`);
        return [key, { state: r.state, version: r.version, endpoint_url: r.endpoint_url, last_ready_at: r.last_ready_at }];
      }),
    );
  }

  /** Waits for lifecycle jobs to complete or fail. */
  async function settled(jobIds: string[]): Promise<Job[]> {
    return waitFor(`${jobIds.join(', ')} to settle`, async () => {
      const jobs = await Promise.all(jobIds.map((id) => producer.queue.getJob(id)));
      if (jobs.some((j) => j === undefined)) return undefined;
      const defined = jobs as Job[];
      const states = await Promise.all(defined.map((j) => j.getState()));
      if (!states.every((s) => s === 'completed' || s === 'failed')) return undefined;
      return Promise.all(defined.map(async (j) => (await producer.queue.getJob(j.id ?? '')) ?? j));
    });
  }

  async function settledOne(jobId: string): Promise<Job> {
    const [job] = await settled([jobId]);
    if (job === undefined) throw new Error('unreachable');
    return job;
  }

  it('stamps last_ready_at while /ready answers 2xx; 503, a hang, a closed port or a redirect leave stamp and URL alone', async () => {
    const t0 = new Date('2030-01-01T00:00:00.000Z');
    const clock = new ManualClock(t0);
    const service = new TransitionService({ dataSource: db.dataSource, now: clock.now });
    const healthy = await server('ok');
    const unavailable = await server('unavailable');
    const hanging = await server('hang');
    const elsewhere = await server('ok');
    const redirecting = await server('redirect');
    redirecting.redirectTo = `${elsewhere.url}/ready`;
    const ids = {
      healthy: await ended(service, { url: `${healthy.url}/`, kind: 'node_port' }), // trailing slash: probes /ready
      unavailable: await ended(service, { url: unavailable.url, kind: 'node_port' }),
      hanging: await ended(service, { url: hanging.url, kind: 'node_port' }),
      closed: await ended(service, { url: await closedPortUrl(), kind: 'node_port' }),
      redirecting: await ended(service, { url: redirecting.url, kind: 'node_port' }),
      // never probed: cluster DNS is served regardless; a failed deployment is not served at all
      clusterDns: await ended(service, { url: `${healthy.url}/cluster`, kind: 'cluster_dns' }),
      failed: await ended(service, { url: `${healthy.url}/failed`, kind: 'node_port' }, 'failed'),
    };
    const before = await rowsOf(ids);
    expect(before.healthy?.last_ready_at?.toISOString()).to.equal(t0.toISOString());
    const sweep = sweeper(clock, { probeTimeoutMs: 300 });

    clock.at(t0, 30);
    const first = await sweep.sweep();
    expect(first).to.deep.include({
      at: clock.now().toISOString(),
      queued: false,
      endpoints: 5,
      probed: 5,
      stamped: 1,
      failed: 4,
      unprobed: 0,
      stale: 0,
      orphaned: 0,
      expired: 0,
    });
    expect(first).to.deep.include({ probeFailures: { http_503: 1, timeout: 1, refused: 1, redirect: 1 } });
    expect(healthy.requests).to.deep.equal(['/ready']);
    expect(hanging.requests).to.deep.equal(['/ready']);
    expect(elsewhere.requests, 'the redirect was followed').to.deep.equal([]);

    let rows = await rowsOf(ids);
    expect(rows.healthy?.last_ready_at?.toISOString()).to.equal(clock.now().toISOString());
    for (const key of ['unavailable', 'hanging', 'closed', 'redirecting', 'clusterDns'] as const) {
      expect(rows[key]?.last_ready_at?.toISOString(), key).to.equal(t0.toISOString());
    }
    for (const [key, row] of Object.entries(rows)) {
      expect(row.endpoint_url, `${key} kept its URL`).to.equal(before[key]?.endpoint_url);
      expect(row.version, `${key}: stamps never bump version`).to.equal(before[key]?.version);
      expect(row.state, key).to.equal(before[key]?.state);
    }

    // The answers swap; the stamps follow them.
    healthy.mode = 'unavailable';
    unavailable.mode = 'ok';
    clock.at(t0, 60);
    const second = await sweep.sweep();
    expect(second).to.deep.include({ probed: 5, stamped: 1, failed: 4, stale: 0 });
    rows = await rowsOf(ids);
    expect(rows.healthy?.last_ready_at?.toISOString()).to.equal(new Date(t0.getTime() + 30_000).toISOString());
    expect(rows.unavailable?.last_ready_at?.toISOString()).to.equal(clock.now().toISOString());

    // At +150 the window (120 s) reaches back to +30: `healthy` (stamped at +30) is exactly at the edge, so
    // still fresh; the three stamped only at t0 are stale.
    clock.at(t0, 150);
    const third = await sweep.sweep();
    expect(third).to.deep.include({ stamped: 1, failed: 4, stale: 3 });
    const dispatched: Record<string, ResolvedEndpoint> = {};
    for (const [key, id] of Object.entries(ids)) {
      const view = await getDeployment(db.dataSource, id);
      if (view === null) throw new Error(key);
      dispatched[key] = resolveEndpoint(view, clock.now(), { readyWindowS: 120, publicEndpointUrl: PUBLIC });
    }
    expect(dispatched.healthy).to.deep.equal({ url: `${healthy.url}/`, source: 'private', reason: 'ready_heartbeat_fresh' });
    expect(dispatched.unavailable?.source).to.equal('private');
    expect(dispatched.hanging).to.deep.equal({ url: PUBLIC, source: 'public', reason: 'ready_heartbeat_stale' });
    expect(dispatched.clusterDns).to.deep.equal({ url: `${healthy.url}/cluster`, source: 'private', reason: 'cluster_dns' });
    expect(dispatched.failed).to.deep.equal({ url: PUBLIC, source: 'public', reason: 'not_ready' });
  });

  it('does not flap on one slow or one missed tick; a sustained 503 falls back within window + one tick', async () => {
    const TICK_S = 30;
    const WINDOW_S = 120;
    const t0 = new Date('2030-01-01T00:00:00.000Z');
    const clock = new ManualClock(t0);
    const service = new TransitionService({ dataSource: db.dataSource, now: clock.now });
    const node = await server('ok');
    const id = await ended(service, { url: node.url, kind: 'node_port' }); // ready at t0, stamped at t0
    const sweep = sweeper(clock, { probeTimeoutMs: 200, readyWindowS: WINDOW_S });
    const readyVersion = (await rowsOf({ id })).id?.version;

    const FAILURE_STARTS_S = 181; // just after the tick at +180 saw it healthy
    const plan: Array<[number, ReadyMode | 'missed']> = [
      [0, 'missed'], // (the deployment just became ready)
      [30, 'ok'],
      [60, 'ok'],
      [90, 'hang'], // a slow tick: the probe times out
      [120, 'missed'], // a missed tick: no sweep ran at all
      [150, 'ok'],
      [180, 'ok'],
      [210, 'unavailable'], // sustained 503 from +181 on
      [240, 'unavailable'],
      [270, 'unavailable'],
      [300, 'unavailable'],
      [330, 'unavailable'],
      [360, 'ok'], // recovered
    ];
    const sources: string[] = []; // dispatch's answer at each second from t0
    for (const [second, behaviour] of plan) {
      clock.at(t0, second);
      if (behaviour !== 'missed') {
        node.mode = behaviour;
        await sweep.sweep();
      }
      const view = await getDeployment(db.dataSource, id);
      if (view === null) throw new Error('deployment vanished');
      for (let s = second; s < second + TICK_S; s++) {
        sources[s] = resolveEndpoint(view, new Date(t0.getTime() + s * 1000), { readyWindowS: WINDOW_S, publicEndpointUrl: PUBLIC }).source;
      }
    }

    const firstPublic = sources.indexOf('public');
    expect(
      sources.slice(0, firstPublic).every((s) => s === 'private'),
      'private throughout the slow and the missed tick',
    ).to.equal(true);
    expect(firstPublic).to.equal(301); // last stamp at +180, window 120 s: +300 is the edge, still private
    expect(firstPublic - FAILURE_STARTS_S).to.be.at.most(WINDOW_S + TICK_S);
    expect(sources.slice(firstPublic, 360).every((s) => s === 'public')).to.equal(true);
    expect(
      sources.slice(360).every((s) => s === 'private'),
      'served again after recovery',
    ).to.equal(true);
    const flips = sources.filter((s, i) => i > 0 && s !== sources[i - 1]).length;
    expect(flips).to.equal(2);

    const row = (await rowsOf({ id })).id;
    // the URL as stored: WHATWG URL's normalised form
    expect(row).to.deep.include({ state: 'ready', endpoint_url: `${node.url}/`, version: readyVersion });
  });

  it('never moves a stamp backwards: an overlapping tick that started earlier cannot undo a newer stamp', async () => {
    const t0 = new Date('2030-01-01T00:00:00.000Z');
    const clock = new ManualClock(t0);
    const service = new TransitionService({ dataSource: db.dataSource, now: clock.now });
    const node = await server('ok');
    const id = await ended(service, { url: node.url, kind: 'node_port' }); // stamped t0 by the end
    clock.at(t0, 60);
    expect(await sweeper(clock).sweep()).to.deep.include({ stamped: 1 });
    // a slower tick that read its clock at +30 finishes after the one at +60
    const slow = new ManualClock(new Date(t0.getTime() + 30_000));
    expect(await sweeper(slow).sweep()).to.deep.include({ probed: 1 });
    const [row] = await db.dataSource.query<Array<{ last_ready_at: Date }>>(`SELECT last_ready_at FROM deployments WHERE id = $1`, [id]);
    expect(row?.last_ready_at.toISOString()).to.equal(new Date(t0.getTime() + 60_000).toISOString());
  });

  it('probes least recently probed first, round-robin: under overload every endpoint gets its turn whatever it answers, and the tick says it fell short', async () => {
    const TICK_S = 30;
    const t0 = new Date('2030-01-01T00:00:00.000Z');
    const clock = new ManualClock(t0);
    const service = new TransitionService({ dataSource: db.dataSource, now: clock.now });
    const hanging = await server('hang');
    const healthy = await server('ok');
    // ten endpoints, every other one hangs until the probe times out
    const names: string[] = [];
    for (let i = 0; i < 10; i++) {
      const name = `n${i}`;
      names.push(name);
      await ended(service, { url: `${(i % 2 === 0 ? hanging : healthy).url}/${name}`, kind: 'node_port' });
    }
    let logged = '';
    const logger = createLogger('warn', { write: (line: string) => void (logged += line) });
    // One lane, and a budget of 3 probe starts per tick: the tick's clock moves 100 ms per probe the endpoints have
    // received, and no probe starts at or past 250 ms into the tick.
    let tickStart = t0.getTime();
    const requests = () => hanging.requests.length + healthy.requests.length;
    let requestsAtTick = 0;
    const now = () => new Date(tickStart + (requests() - requestsAtTick) * 100);
    const sweep = sweeper(clock, { now, probeConcurrency: 1, probeBudgetMs: 250, probeTimeoutMs: 200, everyS: TICK_S, logger, shardSize: 4 });
    const probedBy: string[][] = [];
    const results: SweepResult[] = [];
    for (let tick = 1; tick <= 5; tick++) {
      tickStart = t0.getTime() + tick * TICK_S * 1000;
      requestsAtTick = requests();
      const [h, g] = [hanging.requests.length, healthy.requests.length];
      results.push(await sweep.sweep());
      probedBy.push([...hanging.requests.slice(h), ...healthy.requests.slice(g)].map((p) => p.split('/')[1] ?? ''));
    }
    const perTick = results.map((r) => (r.queued ? -1 : r.probed));
    expect(perTick).to.deep.equal([3, 3, 3, 3, 3]);
    // 15 probes over 10 endpoints, in turn: nine distinct in the first three ticks, the tenth first in the fourth,
    // and any four ticks in a row reach every endpoint
    const ticks = probedBy.map((t) => new Set(t));
    const union = (from: number, to: number) => new Set(probedBy.slice(from, to).flat());
    expect(union(0, 3).size, probedBy.join(' | ')).to.equal(9);
    const tenth = names.find((n) => !union(0, 3).has(n)) ?? '';
    expect(ticks[3]?.has(tenth), probedBy.join(' | ')).to.equal(true);
    expect(union(0, 4).size).to.equal(10);
    expect(union(1, 5).size).to.equal(10);
    expect(union(3, 5).size, 'nothing twice before the rest once').to.equal(6);
    // the answering ones are stamped on their turn, though the hanging ones fail every time
    const rows = await db.dataSource.query<Array<{ endpoint_url: string; last_probed_at: Date | null; last_ready_at: Date }>>(
      `SELECT endpoint_url, last_probed_at, last_ready_at FROM deployments WHERE state = 'ready'`,
    );
    expect(rows.every((r) => r.last_probed_at !== null)).to.equal(true);
    expect(rows.filter((r) => r.endpoint_url.startsWith(healthy.url) && r.last_ready_at.getTime() > t0.getTime())).to.have.length(5);

    // every tick after the first says it fell short: 7 of the 10 were not probed during the last tick
    const second = results[1];
    expect(second).to.deep.include({ endpoints: 10, unprobedLastTick: 7, probedLastTick: 3, neededPerTick: 4, unprobed: 7 });
    const warns = logged.split('\n').filter((l) => l.includes('readiness probing fell short'));
    expect(warns, logged).to.have.length(4);
    expect(JSON.parse(warns[0] ?? '{}')).to.deep.include({ level: 40, endpoints: 10, unprobedLastTick: 7, neededPerTick: 4 });
  });

  describe('a tick whose two sides fail differently: each failure said by its own kind', () => {
    /** A real lock conflict PostgreSQL broke: a serialization failure (40001) of a REPEATABLE READ update. */
    async function lockConflict(): Promise<Error> {
      const service = new TransitionService({ dataSource: db.dataSource });
      const { deploymentId } = await runningAttempt(service);
      const reader = db.dataSource.createQueryRunner();
      try {
        await reader.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
        await reader.query('SELECT 1 FROM deployments WHERE id = $1', [deploymentId]); // the snapshot
        await db.dataSource.query('UPDATE deployments SET name = name WHERE id = $1', [deploymentId]);
        const lost = await reader.query('UPDATE deployments SET name = name WHERE id = $1', [deploymentId]).then(
          () => null,
          (err: unknown) => err,
        );
        if (!(lost instanceof Error)) throw new Error('the second update of the row did not fail');
        expect((lost as Error & { code?: unknown }).code).to.equal('40001');
        return lost;
      } finally {
        await reader.query('ROLLBACK');
        await reader.release();
      }
    }

    function captured() {
      let text = '';
      const logger = createLogger('debug', { write: (line: string) => void (text += line) });
      const said = () =>
        text
          .split('\n')
          .filter((l) => l !== '')
          .map((l) => JSON.parse(l) as { level: number; msg: string; part?: string; err?: { message?: string } })
          .filter((l) => l.level >= 40)
          .map((l) => [l.msg, l.part ?? null, l.err?.message ?? null]);
      return { logger, said };
    }

    it('only the attempts lose a lock conflict: the lock conflict is said, as a warning, and no outage', async () => {
      const conflict = await lockConflict();
      const { logger, said } = captured();
      const reports: string[] = [];
      const pgWatch = new ServerWatch('PostgreSQL (test)', (_level, message) => reports.push(message));
      const sweep = new Sweeper({ dataSource: db.dataSource, producer, logger, pgWatch, flushStamps: () => Promise.reject(conflict) });
      expect(
        await sweep.sweep().then(
          () => null,
          (err: unknown) => err,
        ),
      ).to.equal(conflict);
      expect(said()).to.deep.equal([['sweep failed: a lock conflict (deadlock) lost on every try; the next tick tries again', 'attempts', null]]);
      expect(reports).to.deep.equal([]);
    });

    it('readiness meets PostgreSQL away while the attempts lose a lock conflict: "a server is away", and the watch is told', async () => {
      const conflict = await lockConflict();
      const target = new URL(db.url);
      const proxy = new TcpProxy(target.hostname, Number(target.port));
      const proxied = createDataSource({ url: TcpProxy.rewrite(db.url, await proxy.listen()), poolSize: 1 });
      await proxied.initialize();
      const { logger, said } = captured();
      const reports: string[] = [];
      const pgWatch = new ServerWatch('PostgreSQL (test)', (_level, message) => reports.push(message));
      const sweep = new Sweeper({ dataSource: proxied, producer, logger, pgWatch, flushStamps: () => Promise.reject(conflict) });
      try {
        await proxy.close(); // nothing listens there any more
        const failed = await sweep.sweep().then(
          () => null,
          (err: unknown) => err,
        );
        expect(failed, 'the tick throws its first failure').to.equal(conflict);
        expect(said()).to.deep.equal([['sweep failed: a server is away; retrying every tick', 'readiness', null]]);
        expect(reports).to.deep.equal(['lost PostgreSQL (test), retrying']);
      } finally {
        await proxied.destroy();
      }
    });

    it('readiness fails for a bug while the attempts lose a lock conflict: the bug is logged as an error, the conflict not alone', async () => {
      const conflict = await lockConflict(); // leaves a deploying attempt: no shard of its own
      const service = new TransitionService({ dataSource: db.dataSource });
      await ended(service, { url: 'http://127.0.0.1:1/', kind: 'node_port' }); // one ready endpoint: one shard to queue
      const { logger, said } = captured();
      const shardQueue = { addBulk: () => Promise.reject(new TypeError('a bug in queueing the shards')) };
      const sweep = new Sweeper({ dataSource: db.dataSource, producer, logger, shardQueue, flushStamps: () => Promise.reject(conflict) });
      const failed = await sweep.sweep().then(
        () => null,
        (err: unknown) => err,
      );
      expect(failed).to.equal(conflict);
      expect(said()).to.deep.equal([['sweep failed', 'readiness', 'a bug in queueing the shards']]);
    });
  });

  describe('through the lifecycle worker', () => {
    /**
     * Starts at a fixed second a day in the past: every stamp and declaration is on this clock (a heartbeat records
     * the clock when it is processed), and the jobs' real timestamps, a day later, count for nothing.
     */
    function pastClock(): { t0: Date; clock: ManualClock } {
      const t0 = new Date(Math.floor(Date.now() / 1000) * 1000 - 24 * 3600 * 1000);
      return { t0, clock: new ManualClock(t0) };
    }

    function startWorker(service: TransitionService, concurrency = 8): void {
      workers.push(new LifecycleWorker({ connection: testEnv().redisUrl, prefix, service, concurrency }));
    }

    async function heartbeat(...attempts: Array<{ deploymentId: string; attemptId: string }>): Promise<void> {
      const jobs = await Promise.all(attempts.map((a) => producer.heartbeat(a)));
      const settledJobs = await settled(jobs.map((j) => j.jobId));
      for (const job of settledJobs) expect(job.returnvalue).to.deep.include({ outcome: 'noop', reason: 'stamped' });
    }

    const stateOf = async (deploymentId: string) =>
      (
        await db.dataSource.query<Array<{ state: string; status: string; reason: string | null }>>(
          `SELECT d.state, a.status, a.reason FROM deployments d JOIN attempts a ON a.deployment_id = d.id WHERE d.id = $1 ORDER BY a.number DESC LIMIT 1`,
          [deploymentId],
        )
      )[0];

    it('re-checks an orphan when it is applied: a heartbeat since makes it a noop `alive`, and a later death still orphans (issue 13 C)', async () => {
      const { t0, clock } = pastClock();
      const service = new TransitionService({ dataSource: db.dataSource, now: clock.now, orphanAfterS: 90 });
      const sweep = sweeper(clock, { orphanAfterS: 90, progressDeadlineS: 1800 });
      const a = await runningAttempt(service);
      clock.at(t0, 100);
      expect((await sweep.sweep()).orphaned).to.equal(1);
      const firstId = `attempt.orphaned.${a.attemptId}.${t0.getTime()}`;
      expect(await producer.queue.getJobState(firstId)).to.equal('waiting');
      // a heartbeat produced before the sweep ran, applied after it declared the orphan (it waited in a backlog): it
      // records when it was processed (t0 + 100 s), not when it was produced
      expect(await service.apply('attempt.heartbeat', { ...a, eventId: 'hb-1' }, { producedAt: new Date(t0.getTime() + 95_000) })).to.deep.include({
        reason: 'stamped',
      });
      const [stamp] = await db.dataSource.query<Array<{ at: Date }>>(`SELECT last_heartbeat_at AS at FROM attempts WHERE id = $1`, [a.attemptId]);
      expect(stamp?.at.getTime()).to.equal(t0.getTime() + 100_000);
      startWorker(service);
      const declared = await settledOne(firstId);
      expect(declared.returnvalue).to.deep.include({ outcome: 'noop', reason: 'alive' });
      expect(await stateOf(a.deploymentId)).to.deep.include({ state: 'deploying', status: 'running' });
      // not recorded as the eventId's outcome: it is no decision about the attempt
      expect(await db.dataSource.query(`SELECT 1 FROM processed_events WHERE event_id = $1`, [firstId])).to.have.length(0);

      // then the runner really goes silent: the next declaration has an id of its own, and applies
      clock.at(t0, 190);
      expect((await sweep.sweep()).orphaned, 'exactly 90 s after the heartbeat: not yet').to.equal(0);
      clock.at(t0, 191);
      expect((await sweep.sweep()).orphaned).to.equal(1);
      const second = await settledOne(`attempt.orphaned.${a.attemptId}.${t0.getTime() + 100_000}`);
      expect(second.returnvalue).to.deep.include({ outcome: 'applied', to: 'unknown', reason: 'orphaned' });
      expect(await stateOf(a.deploymentId)).to.deep.equal({ state: 'unknown', status: 'abandoned', reason: 'orphaned' });
    });

    it('does not orphan attempts whose heartbeats wait in a backlog behind the declaration (issue 13 C)', async () => {
      const { t0, clock } = pastClock();
      const service = new TransitionService({ dataSource: db.dataSource, now: clock.now, orphanAfterS: 90 });
      const sweep = sweeper(clock, { orphanAfterS: 90, progressDeadlineS: 1800 });
      const attempts = [await runningAttempt(service), await runningAttempt(service), await runningAttempt(service), await runningAttempt(service)];
      const [dead, ...alive] = attempts as [{ deploymentId: string; attemptId: string }, ...Array<{ deploymentId: string; attemptId: string }>];
      // no worker yet: a backlog. The live runners' heartbeats are queued; the sweep finds every attempt silent.
      clock.at(t0, 95);
      for (const x of alive) await producer.heartbeat(x);
      expect((await sweep.sweep()).orphaned).to.equal(4);
      // the backlog drains later: the heartbeats record the time they are processed, which is after the tick
      clock.at(t0, 97);
      startWorker(service, 1); // one at a time, in queue order: the heartbeats, then the declarations behind them
      const jobs = await settled(attempts.map((x) => `attempt.orphaned.${x.attemptId}.${t0.getTime()}`));
      expect(jobs.map((j) => (j.returnvalue as { reason: string }).reason)).to.deep.equal(['orphaned', 'alive', 'alive', 'alive']);
      expect(await stateOf(dead.deploymentId)).to.deep.include({ state: 'unknown' });
      for (const x of alive) expect(await stateOf(x.deploymentId)).to.deep.include({ state: 'deploying', status: 'running' });
      const stamps = await db.dataSource.query<Array<{ at: Date }>>(`SELECT last_heartbeat_at AS at FROM attempts WHERE id = ANY($1)`, [
        alive.map((x) => x.attemptId),
      ]);
      expect(stamps.map((r) => r.at.getTime())).to.deep.equal(alive.map(() => t0.getTime() + 97_000));
    });

    it('declares again an expiry that a worker with another setting answered not_due, once a worker agrees', async () => {
      const { t0, clock } = pastClock();
      const disagreeing = new LifecycleWorker({
        connection: testEnv().redisUrl,
        prefix,
        service: new TransitionService({ dataSource: db.dataSource, now: clock.now, progressDeadlineS: 1800 }),
      });
      const sweep = sweeper(clock, { orphanAfterS: 90, progressDeadlineS: 600 });
      const service = new TransitionService({ dataSource: db.dataSource, now: clock.now, progressDeadlineS: 600 });
      const a = await runningAttempt(service);
      await service.apply('attempt.heartbeat', { ...a, eventId: 'hb' }, { producedAt: new Date(t0.getTime() + 599_000) });
      clock.at(t0, 601);
      expect(await sweep.sweep()).to.deep.include({ expired: 1 });
      const jobId = `attempt.expired.${a.attemptId}`;
      expect((await settledOne(jobId)).returnvalue).to.deep.include({ outcome: 'noop', reason: 'not_due' });
      await disagreeing.close();
      startWorker(service);
      clock.at(t0, 631);
      expect(await sweep.sweep()).to.deep.include({ expired: 1 });
      await waitFor('the expiry applied', async () => ((await stateOf(a.deploymentId))?.state === 'failed' ? true : undefined));
      expect(await stateOf(a.deploymentId)).to.deep.equal({ state: 'failed', status: 'failed', reason: 'progress_deadline_exceeded' });
    });

    it('re-checks an expiry too: not_due when the attempt started after the cutoff, applied when due', async () => {
      const { t0, clock } = pastClock();
      const service = new TransitionService({ dataSource: db.dataSource, now: clock.now, progressDeadlineS: 1800 });
      const a = await runningAttempt(service);
      clock.at(t0, 1000);
      // declared by someone whose clock or setting disagrees: the attempt started 1000 s before, not 1800
      const early = await service.apply('attempt.expired', { ...a, eventId: 'expiry-1' }, { producedAt: clock.now() });
      expect(early).to.deep.include({ outcome: 'noop', reason: 'not_due' });
      clock.at(t0, 1801);
      // the same eventId: a "not yet" is no decision, so it can still apply
      const due = await service.apply('attempt.expired', { ...a, eventId: 'expiry-1' }, { producedAt: clock.now() });
      expect(due).to.deep.include({ outcome: 'applied', to: 'failed', reason: 'progress_deadline_exceeded' });
    });

    it('turns an attempt whose heartbeats stopped into unknown; teardown is refused until forced, resolved or ended late', async () => {
      const { t0, clock } = pastClock();
      const service = new TransitionService({ dataSource: db.dataSource, now: clock.now });
      startWorker(service);
      const sweep = sweeper(clock, { orphanAfterS: 90, progressDeadlineS: 1800 });
      const [lateEnd, forced, resolved, alive] = [
        await runningAttempt(service),
        await runningAttempt(service),
        await runningAttempt(service),
        await runningAttempt(service),
      ];
      if (lateEnd === undefined || forced === undefined || resolved === undefined || alive === undefined) throw new Error('unreachable');

      clock.at(t0, 60);
      await heartbeat(lateEnd, forced, resolved, alive); // then three runners go silent
      clock.at(t0, 120);
      await heartbeat(alive);
      expect((await sweep.sweep()).orphaned).to.equal(0);
      clock.at(t0, 150); // the silent ones' last heartbeat (+60) is exactly 90 s old: not yet
      expect((await sweep.sweep()).orphaned).to.equal(0);
      clock.at(t0, 151);
      const result = await sweep.sweep();
      expect(result).to.deep.include({ orphaned: 3, expired: 0 });

      // the id names the liveness the orphan was declared for: their last heartbeat, at +60
      const orphanJobs = await settled([lateEnd, forced, resolved].map((a) => `attempt.orphaned.${a.attemptId}.${t0.getTime() + 60_000}`));
      for (const job of orphanJobs) {
        expect(job.returnvalue).to.deep.include({ outcome: 'applied', from: 'deploying', to: 'unknown', reason: 'orphaned' });
      }
      for (const a of [lateEnd, forced, resolved]) {
        expect(await stateOf(a.deploymentId)).to.deep.equal({ state: 'unknown', status: 'abandoned', reason: 'orphaned' });
      }
      expect(await stateOf(alive.deploymentId)).to.deep.include({ state: 'deploying', status: 'running' });
      clock.at(t0, 152);
      expect((await sweep.sweep()).orphaned, 'an abandoned attempt is not orphaned twice').to.equal(0);

      // Teardown is refused on unknown...
      for (const a of [lateEnd, forced, resolved]) {
        const refused = await settledOne((await producer.teardown({ deploymentId: a.deploymentId })).jobId);
        expect(await refused.getState()).to.equal('failed');
        expect(refused.failedReason).to.match(/^unknown_state: /);
        expect(refused.attemptsMade).to.equal(1);
      }
      // ...until a late attempt.end brings the truth,
      const end = await settledOne((await producer.endAttempt({ ...lateEnd, outcome: 'succeeded' })).jobId);
      expect(end.returnvalue).to.deep.include({ outcome: 'applied', from: 'unknown', to: 'ready' });
      // or it is forced,
      const force = await settledOne((await producer.teardown({ deploymentId: forced.deploymentId, force: true })).jobId);
      expect(force.returnvalue).to.deep.include({ outcome: 'applied', from: 'unknown', to: 'pending', reason: 'torn_down' });
      // or a person resolves it.
      const resolve = await settledOne(
        (await producer.resolve({ deploymentId: resolved.deploymentId, outcome: 'failed', reason: 'runner lost' })).jobId,
      );
      expect(resolve.returnvalue).to.deep.include({ outcome: 'applied', from: 'unknown', to: 'failed', reason: 'resolved' });
      for (const a of [lateEnd, resolved]) {
        const teardown = await settledOne((await producer.teardown({ deploymentId: a.deploymentId })).jobId);
        expect(teardown.returnvalue).to.deep.include({ outcome: 'applied', to: 'pending', reason: 'torn_down' });
      }
    });

    it('retries an earlier failed orphan job for an attempt that is still due, instead of adding nothing', async () => {
      const { t0, clock } = pastClock();
      const service = new TransitionService({ dataSource: db.dataSource, now: clock.now });
      const sweep = sweeper(clock, { orphanAfterS: 90, progressDeadlineS: 1800 });
      const a = await runningAttempt(service);
      if (a === undefined) throw new Error('unreachable');
      // The first orphan job meets a database outage and gives up (a zero retry budget makes that immediate).
      const outage = new TransitionService({
        dataSource: db.dataSource,
        now: clock.now,
        hooks: {
          beforeUpdate: () => {
            throw Object.assign(new Error('Connection terminated unexpectedly'), { code: 'ECONNRESET' });
          },
        },
      });
      const failing = new LifecycleWorker({ connection: testEnv().redisUrl, prefix, service: outage, retryBudgetMs: 0 });
      clock.at(t0, 200);
      expect((await sweep.sweep()).orphaned).to.equal(1);
      const jobId = `attempt.orphaned.${a.attemptId}.${t0.getTime()}`; // declared for its start: it never sent a heartbeat
      const failed = await settledOne(jobId);
      await failing.close();
      expect(await failed.getState()).to.equal('failed');
      expect(await stateOf(a.deploymentId)).to.deep.include({ state: 'deploying' });

      // The next tick finds the attempt still due: the failed job is retried, and now it applies.
      startWorker(service);
      clock.at(t0, 230);
      await sweep.sweep();
      await waitFor('the retried orphan job', async () => ((await producer.queue.getJobState(jobId)) === 'completed' ? true : undefined));
      expect(await stateOf(a.deploymentId)).to.deep.equal({ state: 'unknown', status: 'abandoned', reason: 'orphaned' });
    });

    it('fails an attempt past the progress deadline with progress_deadline_exceeded, heartbeats or not', async () => {
      const { t0, clock } = pastClock();
      const service = new TransitionService({ dataSource: db.dataSource, now: clock.now, progressDeadlineS: 600 });
      startWorker(service);
      const sweep = sweeper(clock, { orphanAfterS: 90, progressDeadlineS: 600 });
      clock.at(t0, -1);
      const silent = await runningAttempt(service); // started a second earlier, never heartbeats: due both ways at +600
      clock.at(t0, 0);
      const steady = await runningAttempt(service);
      for (let s = 60; s <= 600; s += 60) {
        clock.at(t0, s);
        await heartbeat(steady);
      }

      clock.at(t0, 600); // steady started exactly 600 s ago: not yet; silent is past both thresholds
      expect(await sweep.sweep()).to.deep.include({ expired: 1, orphaned: 0 });
      await settled([`attempt.expired.${silent.attemptId}`]);
      expect(
        await producer.queue
          .getJobs(['waiting', 'active', 'completed', 'failed', 'delayed'])
          .then((jobs) => jobs.filter((j) => j.name === 'attempt.orphaned')),
        'past the deadline wins over orphaned',
      ).to.deep.equal([]);

      clock.at(t0, 601);
      expect(await sweep.sweep()).to.deep.include({ expired: 1, orphaned: 0 });
      const job = await settledOne(`attempt.expired.${steady.attemptId}`);
      expect(job.returnvalue).to.deep.include({ outcome: 'applied', from: 'deploying', to: 'failed', reason: 'progress_deadline_exceeded' });
      for (const a of [silent, steady]) {
        expect(await stateOf(a.deploymentId)).to.deep.equal({ state: 'failed', status: 'failed', reason: 'progress_deadline_exceeded' });
        const [t] = await db.dataSource.query<Array<{ reason: string }>>(
          `SELECT reason FROM state_transitions WHERE deployment_id = $1 ORDER BY version DESC LIMIT 1`,
          [a.deploymentId],
        );
        expect(t?.reason).to.equal('progress_deadline_exceeded');
      }
      clock.at(t0, 602);
      expect(await sweep.sweep()).to.deep.include({ expired: 0, orphaned: 0 });
    });
  });
});

describe('sweep at scale: 100 000 deployments and 100 000 attempts', function () {
  this.timeout(30_000);
  const t0 = new Date('2030-01-01T00:00:00.000Z');
  let db: TestDatabase;
  let prefix: string;
  let producer: LifecycleProducer;
  let node: ReadyServer | null = null;

  before(async () => {
    db = await openTestDatabase(8);
    prefix = uniquePrefix();
    producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    // Every state and endpoint kind, but no ready node_port endpoint and no running attempt that is due.
    await db.dataSource.query(
      `INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, last_ready_at, state_changed_at)
       SELECT gen_random_uuid(), 'd-' || i, (ARRAY['pending', 'failed', 'ready', 'unknown'])[1 + i % 4], 3,
              CASE WHEN i % 2 = 0 THEN 'http://10.0.' || (i % 250) || '.1:30080' END,
              CASE WHEN i % 4 = 0 THEN 'node_port' WHEN i % 4 = 2 THEN 'cluster_dns' END,
              $1::timestamptz, $1::timestamptz
         FROM generate_series(1, 100000) AS i`,
      [t0],
    );
    await db.dataSource.query(
      `INSERT INTO attempts (id, deployment_id, number, status, started_at, ended_at, last_heartbeat_at)
       SELECT gen_random_uuid(), id, 1,
              CASE WHEN row_number() OVER () % 100 = 0 THEN 'running' ELSE 'succeeded' END,
              $1::timestamptz - interval '60 seconds', NULL, $1::timestamptz - interval '10 seconds'
         FROM deployments`,
      [t0],
    );
    await db.dataSource.query(`ANALYZE deployments`);
    await db.dataSource.query(`ANALYZE attempts`);
  });
  after(async () => {
    await node?.close();
    await producer?.close();
    await dropPrefix(prefix);
    await db?.close();
  });

  it('costs two statements when there is nothing to do, both index scans on the partial indexes', async () => {
    const counter = new CountingLogger();
    db.dataSource.setOptions({ logger: counter });
    const clock = new ManualClock(t0);
    const result = await new Sweeper({ dataSource: db.dataSource, producer, now: clock.now }).sweep();
    expect(result).to.deep.include({ endpoints: 0, shards: 0, probed: 0, stamped: 0, failed: 0, unprobed: 0, stale: 0, orphaned: 0, expired: 0 });
    expect(counter.queries).to.have.length(2);
    process.stdout.write(`      (no-op tick over 100k deployments / 100k attempts: ${result.durationMs} ms, ${counter.queries.length} statements)\n`);

    const explain = async (sql: string, params: unknown[]) =>
      planSummary((await db.dataSource.query<Array<{ 'QUERY PLAN': unknown }>>(`EXPLAIN (FORMAT JSON) ${sql}`, params))[0]?.['QUERY PLAN']);
    const ready = await explain(SWEEP_SQL.readySet.text, []);
    expect(ready.indexes).to.deep.equal(['deployments_ready_node_port_idx']);
    expect(ready.nodes).to.not.include('Seq Scan');
    const due = await explain(SWEEP_SQL.dueAttempts.text, [new Date(t0.getTime() - 90_000), new Date(t0.getTime() - 1_800_000), 5000]);
    expect(due.indexes).to.have.members(['attempts_running_started_idx', 'attempts_running_liveness_idx']);
    expect(due.nodes).to.not.include('Seq Scan');
  });

  it('stamps 3000 ready endpoints with one UPDATE per shard of 1000, reading the readiness set once', async () => {
    node = new ReadyServer('ok');
    await node.listen();
    await db.dataSource.query(
      `INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, last_ready_at, state_changed_at)
       SELECT gen_random_uuid(), 'r-' || i, 'ready', 7, $2 || '/n/' || i, 'node_port', $1::timestamptz - interval '60 seconds', $1::timestamptz
         FROM generate_series(1, 3000) AS i`,
      [t0, node.url],
    );
    const counter = new CountingLogger();
    db.dataSource.setOptions({ logger: counter });
    const clock = new ManualClock(t0);
    const result = await new Sweeper({ dataSource: db.dataSource, producer, now: clock.now, shardSize: 1000 }).sweep();
    expect(result).to.deep.include({ shards: 3, probed: 3000, stamped: 3000, failed: 0, unprobed: 0, stale: 0 });
    const updates = counter.queries.filter((q) => /\bUPDATE deployments\b/.test(q));
    expect(updates).to.have.length(3);
    expect(counter.queries).to.have.length(8); // the readiness set, per shard its rows and its UPDATE, the attempts query
    expect(node.requests).to.have.length(3000);
    expect(node.requests.every((p) => /^\/n\/\d+\/ready$/.test(p))).to.equal(true);
    const [totals] = await db.dataSource.query<Array<{ stamped: string; versions: string }>>(
      `SELECT count(*) FILTER (WHERE last_ready_at = $1) AS stamped, sum(version) AS versions
         FROM deployments WHERE name LIKE 'r-%'`,
      [t0],
    );
    expect(totals).to.deep.equal({ stamped: '3000', versions: String(7 * 3000) });
    process.stdout.write(`      (3000 probes and three UPDATEs: ${result.durationMs} ms)\n`);
  });
});

describe('sweep scheduler: one scheduler, one sweep per tick, fleet-wide', function () {
  this.timeout(40_000);
  let prefix: string;
  let queue: Queue;
  let connection: ReturnType<typeof testRedis>;
  const children: ChildProcess[] = [];

  beforeEach(() => {
    prefix = uniquePrefix();
    connection = testRedis();
    queue = new Queue(MAINTENANCE_QUEUE, { connection, prefix });
  });
  afterEach(async () => {
    for (const child of children.splice(0)) if (child.exitCode === null) child.kill('SIGKILL');
    await queue.close();
    connection.disconnect();
    await dropPrefix(prefix);
  });

  const pendingCount = async () => {
    const c = await queue.getJobCounts('delayed', 'waiting', 'prioritized', 'active');
    return Object.values(c).reduce((a, b) => a + b, 0);
  };
  const ensure = (everyS: number) => ensureSweepScheduler({ connection: testEnv().redisUrl, prefix, everyS });

  it('registers once under concurrent calls, updates a changed interval, repairs a lost iteration, survives a dead lock holder', async () => {
    const first = await Promise.all(Array.from({ length: 10 }, () => ensure(60)));
    expect(first.map((r) => r.action).sort()).to.deep.equal(['created', ...Array<string>(9).fill('unchanged')]);
    let schedulers = await queue.getJobSchedulers();
    expect(schedulers).to.have.length(1);
    expect(schedulers[0]).to.deep.include({ key: 'sweep', name: 'sweep', every: 60_000 });
    expect(await pendingCount()).to.equal(1);

    const changed = await ensure(5);
    expect(changed.action).to.equal('updated');
    schedulers = await queue.getJobSchedulers();
    expect(schedulers).to.have.length(1);
    expect(schedulers[0]?.every).to.equal(5000);
    expect(await pendingCount()).to.equal(1);
    const [next] = await queue.getJobs(['delayed', 'waiting']);
    expect(next?.id).to.equal(`repeat:sweep:${schedulers[0]?.next}`);
    expect((schedulers[0]?.next ?? Infinity) - Date.now()).to.be.at.most(5000);
    expect(next?.opts).to.deep.include({ attempts: 1, removeOnComplete: { age: 86_400, count: 1000 } });

    const again = await Promise.all(Array.from({ length: 10 }, () => ensure(5)));
    expect(again.every((r) => r.action === 'unchanged')).to.equal(true);
    expect(await pendingCount()).to.equal(1);

    // The scheduler survives but its next iteration is gone (what the BullMQ bugs above leave behind; simulated by
    // deleting the job): repaired, not duplicated.
    const redis = testRedis();
    try {
      const lost = `repeat:sweep:${schedulers[0]?.next}`;
      await redis.del(`${prefix}:${MAINTENANCE_QUEUE}:${lost}`);
      await redis.zrem(`${prefix}:${MAINTENANCE_QUEUE}:delayed`, lost);
      await redis.lrem(`${prefix}:${MAINTENANCE_QUEUE}:wait`, 0, lost); // a new interval's first iteration is due at once
      expect(await queue.getJobState(lost)).to.equal('unknown');
      expect(await pendingCount()).to.equal(0);
      expect((await ensure(5)).action).to.equal('repaired');
      expect(await queue.getJobSchedulers()).to.have.length(1);
      expect(await pendingCount()).to.equal(1);

      // A process that died holding the registration lock delays the next registration by the lock's TTL, no more.
      await redis.set(`${prefix}:${MAINTENANCE_QUEUE}:sweep-scheduler-lock`, 'dead-process', 'PX', 300);
      const started = Date.now();
      expect((await ensure(5)).action).to.equal('unchanged');
      expect(Date.now() - started).to.be.at.least(250);
    } finally {
      redis.disconnect();
    }
  });

  it('runs each tick as a job returning the sweep result, and a running worker re-registers a removed scheduler', async () => {
    const result: SweepResult = {
      at: new Date(0).toISOString(),
      tick: '0',
      endpoints: 0,
      shards: 0,
      unprobedLastTick: 0,
      probedLastTick: 0,
      neededPerTick: 0,
      flushed: 0,
      queued: true,
      orphaned: 0,
      expired: 0,
      durationMs: 3,
    };
    let sweeps = 0;
    const worker = new SweepWorker({
      connection: testEnv().redisUrl,
      prefix,
      everyS: 1,
      recheckEveryMs: 200,
      sweeper: {
        sweep: async () => {
          sweeps++;
          return result;
        },
        runShard: () => Promise.reject(new Error('no shards here')),
      },
    });
    try {
      expect((await worker.start()).action).to.equal('created');
      const [job] = await waitFor('a sweep job to complete', async () => {
        const done = await queue.getJobs(['completed']);
        return done.length > 0 ? done : undefined;
      });
      expect(job?.name).to.equal('sweep');
      expect(job?.returnvalue).to.deep.equal(result);

      // Someone removes the scheduler (a script, Bull Board) while every process keeps running.
      expect(await queue.removeJobScheduler('sweep')).to.equal(true);
      expect(await queue.getJobSchedulers()).to.have.length(0);
      await waitFor('the periodic check to register it again', async () => ((await queue.getJobSchedulers()).length === 1 ? true : undefined));
      const before = sweeps;
      await waitFor('sweeps to resume', () => (sweeps > before ? true : undefined));
      expect(await queue.getJobSchedulers()).to.have.length(1);
    } finally {
      await worker.close(5000);
      await worker.close(5000); // safe twice
    }
  });

  it('three worker processes started together for several ticks: one scheduler, exactly one sweep per tick', async () => {
    const db = await openTestDatabase(2);
    try {
      const outputs: string[] = ['', '', ''];
      const exits: Array<Promise<number | null>> = [];
      for (let i = 0; i < 3; i++) {
        const child = spawn(process.execPath, [path.join(ROOT, 'dist', 'test', 'fixtures', 'sweep-process.js')], {
          env: { ...process.env, DATABASE_URL: db.url, FLEET_PREFIX: prefix, FLEET_SWEEP_EVERY_S: '1', LOG_LEVEL: 'warn' },
          stdio: ['ignore', 'pipe', 'inherit'],
        });
        children.push(child);
        child.stdout?.on('data', (chunk: Buffer) => (outputs[i] += chunk.toString()));
        exits.push(new Promise((resolve) => child.on('exit', (code) => resolve(code))));
      }
      const lines = () =>
        outputs.map((o) =>
          o
            .split('\n')
            .filter((l) => l !== '')
            .map((l) => JSON.parse(l) as Record<string, unknown>),
        );
      await waitFor('three processes to register and start', () => (lines().every((l) => l.some((e) => 'registered' in e)) ? true : undefined));
      const completed = () => queue.getJobs(['completed'], 0, -1);
      await waitFor('six ticks to complete', async () => ((await completed()).length >= 6 ? true : undefined), 20_000);
      for (const child of children) child.kill('SIGTERM');
      expect(await Promise.all(exits), 'clean exits').to.deep.equal([0, 0, 0]);

      const registrations = lines().flatMap((l) => l.filter((e) => 'registered' in e).map((e) => (e.registered as { action: string }).action));
      expect(registrations.sort()).to.deep.equal(['created', 'unchanged', 'unchanged']);
      const schedulers = await queue.getJobSchedulers();
      expect(schedulers).to.have.length(1);
      expect(schedulers[0]?.every).to.equal(1000);

      const jobs = await completed();
      const ticks = jobs.map((j) => Number(/^repeat:sweep:(\d+)$/.exec(j.id ?? '')?.[1])).sort((a, b) => a - b);
      const firstTick = ticks[0] ?? NaN;
      const lastTick = ticks[ticks.length - 1] ?? NaN;
      // BullMQ keeps `every` iterations on one grid: the first registration's time plus whole intervals.
      expect(
        ticks.every((t) => Number.isInteger(t) && (t - firstTick) % 1000 === 0),
        'every job is a tick on the 1 s grid',
      ).to.equal(true);
      expect(new Set(ticks).size).to.equal(ticks.length);
      expect(ticks.length, 'one job per tick, none missing, none extra').to.equal((lastTick - firstTick) / 1000 + 1);
      expect(await queue.getJobCounts('failed')).to.deep.equal({ failed: 0 });
      expect(jobs.every((j) => j.attemptsMade === 1 && typeof (j.returnvalue as SweepResult | null)?.durationMs === 'number')).to.equal(true);
      // Each job ran its sweep exactly once, in exactly one process.
      const sweeps = lines()
        .flat()
        .filter((e) => 'swept' in e).length;
      expect(sweeps).to.equal(jobs.length);
      const byProcess = new Map<string, number>();
      for (const j of jobs) byProcess.set(j.processedBy ?? '?', (byProcess.get(j.processedBy ?? '?') ?? 0) + 1);
      process.stdout.write(`      (${jobs.length} ticks; sweeps per process: ${[...byProcess.values()].join(', ')})\n`);
      expect(await pendingCount()).to.be.at.most(1);
    } finally {
      await db.close();
    }
  });
});
