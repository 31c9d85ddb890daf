/**
 * Scenario 6, "fleet scale" (issue 16): readiness probing and heartbeats at fleet scale, black-box, against real
 * `node bin/fleet.js worker` processes (lifecycle worker, relay and sweep, LOG_LEVEL=warn) on the bench's own
 * Redis and PostgreSQL.
 *
 * A. Readiness. N `ready` node_port deployments (last_ready_at NULL) whose endpoints are served on loopback by
 *    bench/fixtures/scale-endpoints (answer after 30 ms; optionally a fraction never answers), W worker processes
 *    with FLEET_SWEEP_EVERY_S / FLEET_READY_WINDOW_S / FLEET_PROBE_CONCURRENCY. From the first tick that starts
 *    after every worker is up, for window÷tick ticks, sampled 250 ms before each next tick:
 *      - PostgreSQL: deployments stamped since the tick began (last_ready_at >= tick start - 1 s), fresh
 *        (last_ready_at >= now() - window), fresh among answering endpoints, ever stamped;
 *      - the fixture: probes, distinct endpoints probed, duplicates (an endpoint probed twice in one tick);
 *      - afterwards, the `maintenance` queue's completed jobs: per tick, the `sweep` job's return value (today:
 *        `{at, probed, stamped, failed, skipped, ...}`) and, when the fleet runs them, the `probe` jobs of the tick
 *        (`{tick, shard, endpoints, probed, stamped, failed, unprobed}`) summed over shards.
 *    "Fresh after one window" is the fraction fresh at the last sample (after window÷tick ticks).
 * B. Heartbeats. H deployments `deploying` with a running attempt; H `attempt.heartbeat` jobs (the SDK's job ids)
 *    enqueued onto a paused queue, then drained by one worker; PostgreSQL commits (pg_stat_database.xact_commit)
 *    from before the drain until one tick after it (so a buffered flush counts), minus the commits of an equally
 *    long idle period of the same worker. Next to it, the same jobs drained by the BullMQ no-op worker
 *    (bench/fixtures/noop-worker) at the same concurrency.
 *
 * Between runs Redis is emptied (FLUSHDB on the bench's private Redis; with REDIS_URL, only the run's prefix) and
 * the tables truncated and reseeded; workers stop with SIGTERM and are waited for.
 */
import { Queue, type Job } from 'bullmq';
import type { RedisConnection } from '../../src/redis/connection';
import { Client } from 'pg';
import { LIFECYCLE_QUEUE, MAINTENANCE_QUEUE } from '../../src/queues/names';
import { DEFAULT_JOB_OPTIONS, deriveEventId, jobIdFor } from '../../src/queues/producer';
import { createRedis } from '../../src/redis/connection';
import { MeasuredProcess } from '../lib/child';
import { log, now, round, sleep } from '../lib/common';
import { cpuNow } from '../lib/cpu';
import { endpointUrl, silentEndpoints, type EndpointMark } from '../lib/endpoints';
import { dropPrefix, type BenchServices } from '../lib/services';
import { withClient } from '../lib/workload';

/** One readiness run: N endpoints, W worker processes, a tick and a window. */
export interface ScaleRunSpec {
  /** `matrix`, or one of the issue's "must show" runs */
  readonly kind: 'matrix' | 'default-window' | 'timeouts';
  readonly endpoints: number;
  readonly workers: number;
  readonly tickS: number;
  readonly windowS: number;
  /** fraction of endpoints that never answer */
  readonly silentFraction: number;
  /** FLEET_PROBE_CONCURRENCY of every worker process (null: unset, the fleet's default) */
  readonly probeConcurrency: number | null;
}

/** One tick of a run: what PostgreSQL, the fixture and the maintenance queue say about it. */
export interface ScaleTick {
  readonly tick: number;
  /** scheduled start of the tick (ISO) */
  readonly scheduledAt: string;
  /** the `sweep` job's start after its scheduled time, ms (null: no sweep job found for the tick) */
  readonly startLagMs: number | null;
  /** PostgreSQL: deployments whose last_ready_at is at or after the tick's start (minus 1 s), read before the next tick */
  readonly stampedPg: number;
  /** PostgreSQL: fresh (last_ready_at >= now() - window) at the sample */
  readonly freshPg: number;
  /** the same among endpoints that answer */
  readonly freshAnsweringPg: number;
  /** PostgreSQL: ever stamped (last_ready_at set) at the sample */
  readonly everStampedPg: number;
  /** the fixture: probe requests in the tick's interval */
  readonly probesSeen: number;
  /** the fixture: distinct endpoints probed in the interval */
  readonly distinctProbed: number;
  /** the fixture: probes of an endpoint already probed in the interval */
  readonly duplicateProbes: number;
  /** the fixture: probes of silent endpoints */
  readonly silentProbes: number;
  /** from the jobs (null: not reported): endpoints in the readiness set */
  readonly readinessSet: number | null;
  readonly probedJobs: number | null;
  readonly stampedJobs: number | null;
  readonly failedJobs: number | null;
  /** endpoints left unprobed: `probe` jobs' `unprobed`, or today's sweep `skipped` */
  readonly unprobedJobs: number | null;
  /** `probe` jobs (shards) completed for the tick; null when the fleet runs none */
  readonly shards: number | null;
}

export interface ScaleRun {
  readonly spec: ScaleRunSpec;
  readonly ticks: readonly ScaleTick[];
  /** which jobs the fleet ran: `probe` (shards) or `sweep` only (the fleet before issue 16) */
  readonly jobShape: 'probe' | 'sweep-only' | 'none';
  readonly sweepJobs: number;
  readonly probeJobs: number;
  readonly failedMaintenanceJobs: number;
  /** endpoints that answer (N minus the silent ones) */
  readonly answering: number;
  /** after window÷tick ticks */
  readonly freshAfterWindow: {
    readonly fresh: number;
    readonly fraction: number;
    readonly freshAnswering: number;
    readonly fractionAnswering: number;
  };
  readonly everStamped: number;
  /** mean over the ticks (PostgreSQL) */
  readonly stampedPerTick: number;
  /** fixture probes per second over the measured ticks */
  readonly probesPerSec: number;
  readonly duplicateProbes: number;
  /** the fixture's CPU use over the ticks, share of one core, and its worst event-loop delay */
  readonly fixture: {
    readonly cpuShare: number;
    readonly loopDelayMaxMs: number;
    readonly lateAnswers: number;
    readonly maxInFlight: number;
    readonly saturated: boolean;
  };
  /** busy CPU over the ticks, in cores: the workers together, PostgreSQL, Redis, the fixture, everything else */
  readonly cpuCores: Record<string, number>;
  readonly workerPeakRssMb: readonly (number | null)[];
  readonly seconds: number;
}

export interface HeartbeatPath {
  readonly jobs: number;
  readonly drainS: number;
  readonly jobsPerSec: number;
  readonly failed: number;
}

export interface HeartbeatResult {
  readonly heartbeats: number;
  readonly concurrency: number;
  readonly tickS: number;
  readonly fleet: HeartbeatPath & {
    /** xact_commit from before the drain to one tick (+ stats settle) after it */
    readonly commitsWindow: number;
    readonly windowS: number;
    /** xact_commit over an equally long idle period of the same worker */
    readonly commitsIdle: number;
    readonly commitsPerHeartbeat: number;
    /** attempts whose last_heartbeat_at reached the heartbeats' time, read after the window */
    readonly stampedInPg: number;
  };
  readonly noop: HeartbeatPath;
  readonly ratio: number;
}

export interface ScaleResult {
  readonly probeConcurrency: number | null;
  readonly delayMs: number;
  readonly probeTimeoutMs: number;
  readonly endpointProcesses: number;
  readonly runs: readonly ScaleRun[];
  readonly heartbeats: HeartbeatResult | null;
  readonly notes: readonly string[];
}

export interface ScaleOptions {
  readonly sizes: readonly number[];
  readonly workers: readonly number[];
  readonly tickS: number;
  readonly windowS: number;
  /** silent fraction of the matrix runs */
  readonly silentFraction: number;
  readonly probeConcurrency: number | null;
  /** the "must show" runs, each null to skip */
  readonly defaultWindowRun: ScaleRunSpec | null;
  readonly timeoutsRun: ScaleRunSpec | null;
  readonly matrix: boolean;
  /** heartbeats to drain (0: skip part B) */
  readonly heartbeats: number;
  readonly heartbeatTickS: number;
  /** worker concurrency (FLEET_CONCURRENCY) of the heartbeat part, both paths */
  readonly heartbeatConcurrency: number;
  /** how long PostgreSQL's cumulative statistics get to arrive before a read (its idle flush interval is 10 s) */
  readonly statsSettleMs: number;
  /** fixture processes serving the endpoints */
  readonly endpointProcesses: number;
  readonly delayMs: number;
}

const SAMPLE_BEFORE_TICK_MS = 250;
const PROBE_TIMEOUT_MS = 2000; // the Sweeper's per-probe deadline

interface Fixture {
  readonly procs: readonly MeasuredProcess[];
  readonly ports: readonly number[];
  readonly controls: readonly number[];
}

export async function runScale(services: BenchServices, options: ScaleOptions): Promise<ScaleResult> {
  const dbUrl = await services.createDatabase('scale');
  const redis = createRedis(services.redisUrl, 'producer', 'lifecycle-fleet-bench-scale');
  const runs: ScaleRun[] = [];
  const notes: string[] = [];
  const specs: ScaleRunSpec[] = [];
  if (options.matrix) {
    for (const endpoints of options.sizes) {
      for (const workers of options.workers) {
        specs.push({
          kind: 'matrix',
          endpoints,
          workers,
          tickS: options.tickS,
          windowS: options.windowS,
          silentFraction: options.silentFraction,
          probeConcurrency: options.probeConcurrency,
        });
      }
    }
  }
  if (options.defaultWindowRun !== null) specs.push(options.defaultWindowRun);
  if (options.timeoutsRun !== null) specs.push(options.timeoutsRun);
  let heartbeats: HeartbeatResult | null = null;
  try {
    for (const spec of specs) {
      const run = await runReadiness(services, redis, dbUrl, spec, options);
      runs.push(run);
      if (run.fixture.saturated) {
        notes.push(
          `${describeSpec(spec)}: the endpoint fixture was saturated (CPU ${round(run.fixture.cpuShare * 100)}% of a core, event-loop delay up to ${run.fixture.loopDelayMaxMs} ms, ${run.fixture.lateAnswers} answers late): ` +
            'one Node process could not serve the load on this machine; rerun with --scale-endpoint-procs 2',
        );
      }
    }
    if (options.heartbeats > 0) heartbeats = await runHeartbeats(services, redis, dbUrl, options);
  } finally {
    redis.disconnect();
  }
  return {
    probeConcurrency: options.probeConcurrency,
    delayMs: options.delayMs,
    probeTimeoutMs: PROBE_TIMEOUT_MS,
    endpointProcesses: options.endpointProcesses,
    runs,
    heartbeats,
    notes,
  };
}

export function describeSpec(spec: ScaleRunSpec): string {
  return `${spec.endpoints} endpoints x ${spec.workers} worker(s), tick ${spec.tickS} s / window ${spec.windowS} s${spec.silentFraction > 0 ? `, ${round(spec.silentFraction * 100)}% silent` : ''}`;
}

/** Empties the run's Redis: FLUSHDB on the bench's private server, else only the prefix. */
async function cleanRedis(services: BenchServices, redis: RedisConnection, prefix: string): Promise<void> {
  if (services.pids.redis !== undefined) await redis.flushdb();
  else await dropPrefix(redis, prefix);
}

async function startFixture(spec: ScaleRunSpec, options: ScaleOptions, label: string): Promise<Fixture> {
  const procs = await Promise.all(
    Array.from({ length: Math.max(1, options.endpointProcesses) }, (_, i) =>
      MeasuredProcess.start({
        label: `${label}-endpoints-${i}`,
        args: ['dist/bench/fixtures/scale-endpoints.js'],
        env: {
          BENCH_ENDPOINTS: String(spec.endpoints),
          BENCH_DELAY_MS: String(options.delayMs),
          BENCH_SILENT_FRACTION: String(spec.silentFraction),
          BENCH_PORTS: String(Math.max(1, Math.round(8 / Math.max(1, options.endpointProcesses)))),
        },
        ready: { kind: 'json' },
      }),
    ),
  );
  const ports: number[] = [];
  const controls: number[] = [];
  for (const p of procs) {
    const ps = p.readyMessage['ports'];
    const control = p.readyMessage['control'];
    if (!Array.isArray(ps) || typeof control !== 'number') throw new Error('scale-endpoints fixture reported no ports');
    ports.push(...ps.filter((x): x is number => typeof x === 'number'));
    controls.push(control);
  }
  return { procs, ports, controls };
}

async function getJson(port: number, path: string): Promise<unknown> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`);
  if (!res.ok) throw new Error(`fixture ${path}: HTTP ${res.status}`);
  return res.json();
}

/** The fixture processes' counts since their previous mark, summed (they serve disjoint endpoints). */
async function markFixture(fixture: Fixture): Promise<EndpointMark> {
  const marks = (await Promise.all(fixture.controls.map((c) => getJson(c, '/mark')))) as EndpointMark[];
  const sum = (k: keyof EndpointMark) => marks.reduce((a, m) => a + m[k], 0);
  const max = (k: keyof EndpointMark) => Math.max(0, ...marks.map((m) => m[k]));
  return {
    probes: sum('probes'),
    distinct: sum('distinct'),
    duplicates: sum('duplicates'),
    silentProbes: sum('silentProbes'),
    maxInFlight: sum('maxInFlight'),
    cpuMs: max('cpuMs'), // the busiest process: is one of them saturated?
    wallMs: max('wallMs'),
    loopDelayP99Ms: max('loopDelayP99Ms'),
    loopDelayMaxMs: max('loopDelayMaxMs'),
    lateAnswers: sum('lateAnswers'),
    everProbed: sum('everProbed'),
  };
}

async function seedReadiness(dbUrl: string, spec: ScaleRunSpec, ports: readonly number[]): Promise<void> {
  await withClient(dbUrl, async (c) => {
    await c.query(`TRUNCATE deployments, attempts, state_transitions, outbox, processed_events`);
    // endpoint n on port ports[n % P], as endpointUrl() builds it
    await c.query(
      `INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, last_ready_at, state_changed_at)
       SELECT gen_random_uuid(), 'scale-' || i, 'ready', 3,
              'http://127.0.0.1:' || ($2::int[])[1 + i % cardinality($2::int[])] || '/e/' || i, 'node_port',
              NULL, now() - interval '1 hour'
         FROM generate_series(1, $1::int) AS i`,
      [spec.endpoints, ports],
    );
    await c.query(`VACUUM ANALYZE deployments`);
    const { rows } = await c.query<{ url: string }>(`SELECT endpoint_url AS url FROM deployments WHERE name = 'scale-1'`);
    if (rows[0]?.url !== endpointUrl(1, ports)) throw new Error(`seeded URL ${rows[0]?.url ?? '?'} is not ${endpointUrl(1, ports)}`);
  });
}

function workerEnv(services: BenchServices, dbUrl: string, prefix: string, extra: Record<string, string>): Record<string, string> {
  return {
    REDIS_URL: services.redisUrl,
    DATABASE_URL: dbUrl,
    FLEET_PREFIX: prefix,
    LOG_LEVEL: 'warn',
    FLEET_ENDPOINT_ALLOW: '', // unset: the fleet reads an empty value as unset
    ...extra,
  };
}

/** Starts `count` `fleet worker` processes; ready once that many lifecycle workers are connected to Redis. */
async function startWorkers(count: number, label: string, env: Record<string, string>, redisUrl: string, prefix: string): Promise<MeasuredProcess[]> {
  const conn = createRedis(redisUrl, 'producer', 'lifecycle-fleet-bench-scale-ready');
  const queue = new Queue(LIFECYCLE_QUEUE, { connection: conn, prefix, skipWaitingForReady: true });
  queue.on('error', () => undefined);
  try {
    const check = async (): Promise<boolean> => (await queue.getWorkersCount()) >= count;
    const started = await Promise.allSettled(
      Array.from({ length: count }, (_, i) =>
        MeasuredProcess.start({
          label: `${label}-w${i + 1}`,
          args: ['bin/fleet.js', 'worker'],
          env,
          ready: { kind: 'poll', check },
          timeoutMs: 60_000,
        }),
      ),
    );
    const procs = started.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : []));
    const failed = started.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failed !== undefined) {
      await Promise.all(procs.map((p) => p.stop()));
      throw failed.reason;
    }
    return procs;
  } finally {
    await queue.close();
    conn.disconnect();
  }
}

/** When the next `sweep` tick is scheduled (ms since the epoch): the job scheduler's `next`, else by watching jobs. */
async function nextTick(maintenance: Queue, tickMs: number, notBefore: number): Promise<number> {
  const deadline = Date.now() + tickMs * 3 + 10_000;
  while (Date.now() < deadline) {
    const scheduler = await maintenance.getJobScheduler('sweep').catch(() => undefined);
    const next = scheduler?.next;
    if (typeof next === 'number') {
      let t = next;
      while (t < notBefore) t += tickMs;
      return t;
    }
    // no scheduler named `sweep`: the first sweep job seen to start after notBefore marks a tick
    const jobs = await maintenance.getJobs(['active', 'completed'], 0, 50);
    const starts = jobs.filter((j) => j.name === 'sweep' && (j.processedOn ?? 0) >= notBefore).map((j) => j.processedOn ?? 0);
    if (starts.length > 0) return Math.min(...starts) + tickMs;
    await sleep(100);
  }
  throw new Error('no sweep tick seen on the maintenance queue');
}

/**
 * Waits (up to `timeoutMs`) until the maintenance jobs of the measured ticks have finished: no `sweep` job that
 * started before `end`, and no `probe` job created before it, is still waiting or running (a tick may overrun).
 */
async function measuredTicksDone(maintenance: Queue, end: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const pending = await maintenance.getJobs(['active', 'waiting', 'delayed', 'prioritized'], 0, -1);
    const ours = pending.filter((j) => (j.name === 'sweep' && (j.processedOn ?? Infinity) < end) || (j.name === 'probe' && j.timestamp < end - 500));
    if (ours.length === 0) return;
    await sleep(200);
  }
  log(`scale: the measured ticks' maintenance jobs were still running ${timeoutMs} ms after the last tick; reading what finished`);
}

async function sleepUntil(t: number): Promise<void> {
  const wait = t - Date.now();
  if (wait > 0) await sleep(wait);
}

interface PgSample {
  readonly stamped: number;
  readonly fresh: number;
  readonly freshAnswering: number;
  readonly ever: number;
}

async function samplePg(c: Client, since: Date, windowS: number, silent: readonly number[]): Promise<PgSample> {
  const { rows } = await c.query<{ stamped: string; fresh: string; fresh_answering: string; ever: string }>(
    `SELECT count(*) FILTER (WHERE last_ready_at >= $1) AS stamped,
            count(*) FILTER (WHERE last_ready_at >= now() - make_interval(secs => $2)) AS fresh,
            count(*) FILTER (WHERE last_ready_at >= now() - make_interval(secs => $2)
                               AND NOT (substring(endpoint_url from '/e/([0-9]+)$')::int = ANY ($3::int[]))) AS fresh_answering,
            count(*) FILTER (WHERE last_ready_at IS NOT NULL) AS ever
       FROM deployments WHERE state = 'ready' AND endpoint_kind = 'node_port'`,
    [since, windowS, silent],
  );
  const r = rows[0];
  return {
    stamped: Number(r?.stamped ?? 0),
    fresh: Number(r?.fresh ?? 0),
    freshAnswering: Number(r?.fresh_answering ?? 0),
    ever: Number(r?.ever ?? 0),
  };
}

const num = (o: unknown, k: string): number | null => {
  if (typeof o !== 'object' || o === null) return null;
  const v = (o as Record<string, unknown>)[k];
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
};
const str = (o: unknown, k: string): string | null => {
  if (typeof o !== 'object' || o === null) return null;
  const v = (o as Record<string, unknown>)[k];
  return typeof v === 'string' ? v : typeof v === 'number' ? String(v) : null;
};
/** A tick id as a time: ISO 8601, or milliseconds since the epoch; null otherwise. */
const tickTime = (tick: string | null): number | null => {
  if (tick === null) return null;
  if (/^\d{12,}$/.test(tick)) return Number(tick);
  const t = Date.parse(tick);
  return Number.isFinite(t) ? t : null;
};

interface JobTick {
  readinessSet: number | null;
  probed: number | null;
  stamped: number | null;
  failed: number | null;
  unprobed: number | null;
  shards: number | null;
  startLagMs: number | null;
}

/** Per tick (1..k), what the maintenance queue's completed jobs say, in both shapes (see the module comment). */
async function jobTicks(
  maintenance: Queue,
  t1: number,
  tickMs: number,
  k: number,
): Promise<{ byTick: JobTick[]; sweepJobs: number; probeJobs: number; failed: number }> {
  const jobs: Job[] = await maintenance.getJobs(['completed'], 0, -1);
  const failed = (await maintenance.getJobCounts('failed'))['failed'] ?? 0;
  const byTick: JobTick[] = Array.from({ length: k }, () => ({
    readinessSet: null,
    probed: null,
    stamped: null,
    failed: null,
    unprobed: null,
    shards: null,
    startLagMs: null,
  }));
  const indexOf = (t: number): number | null => {
    const i = Math.round((t - t1) / tickMs);
    return i >= 0 && i < k ? i : null;
  };
  const add = (a: number | null, b: number | null): number | null => (b === null ? a : (a ?? 0) + b);
  let sweepJobs = 0;
  let probeJobs = 0;
  // the sweep jobs first: a tick's id (`at`) may name the tick of its shards
  const tickIndex = new Map<string, number>();
  for (const job of jobs.filter((j) => j.name === 'sweep')) {
    const rv: unknown = job.returnvalue;
    const at = tickTime(str(rv, 'at')) ?? job.processedOn ?? null;
    const i = at === null ? null : indexOf(at);
    if (i === null) continue;
    sweepJobs++;
    const atId = str(rv, 'at');
    if (atId !== null) tickIndex.set(atId, i);
    const row = byTick[i];
    if (row === undefined) continue;
    row.startLagMs = job.processedOn === undefined ? null : Math.round(job.processedOn - (t1 + i * tickMs));
    const endpoints = num(rv, 'endpoints');
    const probed = num(rv, 'probed');
    const skipped = num(rv, 'skipped');
    row.readinessSet = endpoints ?? (probed !== null && skipped !== null ? probed + skipped : null);
    // today's shape: the sweep job probes and stamps itself
    if (probed !== null) {
      row.probed = add(row.probed, probed);
      row.stamped = add(row.stamped, num(rv, 'stamped'));
      row.failed = add(row.failed, num(rv, 'failed'));
      row.unprobed = add(row.unprobed, skipped);
    }
  }
  const probes = jobs.filter((j) => j.name === 'probe');
  const shardRows = new Map<number, JobTick>();
  for (const job of probes) {
    const rv: unknown = job.returnvalue;
    const data: unknown = job.data;
    const tick = str(rv, 'tick') ?? str(data, 'tick');
    const i = (tick !== null ? tickIndex.get(tick) : undefined) ?? indexOf(tickTime(tick) ?? job.timestamp);
    if (i === null) continue;
    probeJobs++;
    let row = shardRows.get(i);
    if (row === undefined) {
      row = { readinessSet: null, probed: null, stamped: null, failed: null, unprobed: null, shards: 0, startLagMs: null };
      shardRows.set(i, row);
    }
    row.shards = (row.shards ?? 0) + 1;
    row.readinessSet = add(row.readinessSet, num(rv, 'endpoints'));
    row.probed = add(row.probed, num(rv, 'probed'));
    row.stamped = add(row.stamped, num(rv, 'stamped'));
    row.failed = add(row.failed, num(rv, 'failed'));
    row.unprobed = add(row.unprobed, num(rv, 'unprobed'));
  }
  for (const [i, shard] of shardRows) {
    const row = byTick[i];
    if (row === undefined) continue;
    // the new shape: the shards probe; the sweep job's `endpoints` is the set (the shards' sum if it says none)
    row.readinessSet ??= shard.readinessSet;
    row.probed = shard.probed;
    row.stamped = shard.stamped;
    row.failed = shard.failed;
    row.unprobed = shard.unprobed;
    row.shards = shard.shards;
  }
  return { byTick, sweepJobs, probeJobs, failed };
}

async function runReadiness(
  services: BenchServices,
  redis: RedisConnection,
  dbUrl: string,
  spec: ScaleRunSpec,
  options: ScaleOptions,
): Promise<ScaleRun> {
  const label = `scale-${spec.kind}-${spec.endpoints}-w${spec.workers}`;
  const prefix = services.prefix(label);
  const tickMs = spec.tickS * 1000;
  const k = Math.max(1, Math.round(spec.windowS / spec.tickS));
  log(`scale: ${describeSpec(spec)}: seeding`);
  const started = now();
  await cleanRedis(services, redis, prefix);
  const fixture = await startFixture(spec, options, label);
  const silent = silentEndpoints(spec.endpoints, spec.silentFraction);
  const maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix, skipWaitingForReady: true });
  maintenance.on('error', () => undefined);
  const pg = new Client({ connectionString: dbUrl, application_name: 'lifecycle-fleet-bench-scale' });
  await pg.connect();
  let workers: MeasuredProcess[] = [];
  try {
    await seedReadiness(dbUrl, spec, fixture.ports);
    await Promise.all(fixture.controls.map((c) => getJson(c, '/reset')));
    workers = await startWorkers(
      spec.workers,
      label,
      workerEnv(services, dbUrl, prefix, {
        FLEET_SWEEP_EVERY_S: String(spec.tickS),
        FLEET_READY_WINDOW_S: String(spec.windowS),
        ...(spec.probeConcurrency !== null ? { FLEET_PROBE_CONCURRENCY: String(spec.probeConcurrency) } : {}),
      }),
      services.redisUrl,
      prefix,
    );
    const allUp = Date.now();
    // the first tick that starts with every worker up (a tick already running when the last came up is not counted)
    const t1 = await nextTick(maintenance, tickMs, allUp + SAMPLE_BEFORE_TICK_MS + 100);
    log(`scale: ${spec.workers} worker(s) up; measuring ${k} tick(s) from ${new Date(t1).toISOString()}`);
    await sleepUntil(t1 - SAMPLE_BEFORE_TICK_MS);
    await markFixture(fixture); // what came before tick 1 is not counted
    const pids = {
      postgres: services.pids.postgres,
      redis: services.pids.redis,
      fixture: fixture.procs[0]?.pid,
      ...Object.fromEntries(workers.map((w, i) => [`worker${i}`, w.pid])),
    };
    const groups = Object.fromEntries(
      Object.entries(pids).flatMap(([name, pid]) => (pid === undefined ? [] : [[name, { pid, tree: name === 'postgres' }]])),
    );
    const cpuBefore = cpuNow(groups);
    const measureStart = now();
    const samples: Array<{ pg: PgSample; mark: EndpointMark }> = [];
    for (let i = 0; i < k; i++) {
      const tickStart = t1 + i * tickMs;
      await sleepUntil(tickStart + tickMs - SAMPLE_BEFORE_TICK_MS);
      const [mark, sample] = await Promise.all([markFixture(fixture), samplePg(pg, new Date(tickStart - 1000), spec.windowS, silent)]);
      samples.push({ pg: sample, mark });
      log(
        `scale: tick ${i + 1}/${k}: stamped ${sample.stamped}, fresh ${sample.fresh}/${spec.endpoints}, probes ${mark.probes} ` +
          `(${mark.distinct} distinct, ${mark.duplicates} duplicate), fixture CPU ${round((mark.cpuMs / Math.max(1, mark.wallMs)) * 100)}%`,
      );
    }
    const seconds = (now() - measureStart) / 1000;
    const cpuAfter = cpuNow(groups);
    await measuredTicksDone(maintenance, t1 + k * tickMs, tickMs * 2 + 5000);
    const jt = await jobTicks(maintenance, t1, tickMs, k);
    const ticks: ScaleTick[] = samples.map((s, i) => {
      const j = jt.byTick[i];
      return {
        tick: i + 1,
        scheduledAt: new Date(t1 + i * tickMs).toISOString(),
        startLagMs: j?.startLagMs ?? null,
        stampedPg: s.pg.stamped,
        freshPg: s.pg.fresh,
        freshAnsweringPg: s.pg.freshAnswering,
        everStampedPg: s.pg.ever,
        probesSeen: s.mark.probes,
        distinctProbed: s.mark.distinct,
        duplicateProbes: s.mark.duplicates,
        silentProbes: s.mark.silentProbes,
        readinessSet: j?.readinessSet ?? null,
        probedJobs: j?.probed ?? null,
        stampedJobs: j?.stamped ?? null,
        failedJobs: j?.failed ?? null,
        unprobedJobs: j?.unprobed ?? null,
        shards: j?.shards ?? null,
      };
    });
    const last = samples[samples.length - 1];
    const answering = spec.endpoints - silent.length;
    const totalProbes = samples.reduce((a, s) => a + s.mark.probes, 0);
    const fixtureCpuMs = samples.reduce((a, s) => a + s.mark.cpuMs, 0);
    const fixtureWallMs = samples.reduce((a, s) => a + s.mark.wallMs, 0);
    const loopDelayMaxMs = Math.max(0, ...samples.map((s) => s.mark.loopDelayMaxMs));
    const lateAnswers = samples.reduce((a, s) => a + s.mark.lateAnswers, 0);
    const cpuShare = fixtureCpuMs / Math.max(1, fixtureWallMs);
    const cores = (name: string): number => round(((cpuAfter[name] ?? 0) - (cpuBefore[name] ?? 0)) / (seconds * 1000), 2);
    const workerCores = workers.reduce((a, _, i) => a + cores(`worker${i}`), 0);
    const machine = cores('_machine');
    const cpuCores: Record<string, number> = {
      workers: round(workerCores, 2),
      postgres: cores('postgres'),
      redis: cores('redis'),
      fixture: cores('fixture'),
      // cpuNow's _machine is the whole machine's busy time; `other` is the rest (the bench itself included)
      other: round(Math.max(0, machine - workerCores - cores('postgres') - cores('redis') - cores('fixture')), 2),
    };
    const run: ScaleRun = {
      spec,
      ticks,
      jobShape: jt.probeJobs > 0 ? 'probe' : jt.sweepJobs > 0 ? 'sweep-only' : 'none',
      sweepJobs: jt.sweepJobs,
      probeJobs: jt.probeJobs,
      failedMaintenanceJobs: jt.failed,
      answering,
      freshAfterWindow: {
        fresh: last?.pg.fresh ?? 0,
        fraction: round((last?.pg.fresh ?? 0) / spec.endpoints, 4),
        freshAnswering: last?.pg.freshAnswering ?? 0,
        fractionAnswering: round((last?.pg.freshAnswering ?? 0) / Math.max(1, answering), 4),
      },
      everStamped: last?.pg.ever ?? 0,
      stampedPerTick: round(samples.reduce((a, s) => a + s.pg.stamped, 0) / Math.max(1, samples.length)),
      probesPerSec: round(totalProbes / seconds),
      duplicateProbes: samples.reduce((a, s) => a + s.mark.duplicates, 0),
      fixture: {
        cpuShare: round(cpuShare, 2),
        loopDelayMaxMs,
        lateAnswers,
        maxInFlight: Math.max(0, ...samples.map((s) => s.mark.maxInFlight)),
        // a fixture near a full core, or answering late, limits the probers rather than the fleet
        saturated: cpuShare > 0.85 || lateAnswers > totalProbes * 0.01,
      },
      cpuCores,
      workerPeakRssMb: [],
      seconds: round((now() - started) / 1000, 1),
    };
    const rss = await Promise.all(workers.map((w) => w.stop()));
    workers = [];
    log(
      `scale: ${describeSpec(spec)}: stamped/tick ${run.stampedPerTick}, fresh after ${k} tick(s) ${round(run.freshAfterWindow.fraction * 100, 1)}% ` +
        `(answering ${round(run.freshAfterWindow.fractionAnswering * 100, 1)}%), probes/s ${run.probesPerSec}, jobs: ${run.jobShape} ` +
        `(${run.sweepJobs} sweep, ${run.probeJobs} probe, ${run.failedMaintenanceJobs} failed), CPU cores ${JSON.stringify(cpuCores)}`,
    );
    return { ...run, workerPeakRssMb: rss, seconds: round((now() - started) / 1000, 1) };
  } finally {
    await Promise.all(workers.map((w) => w.stop()));
    await Promise.all(fixture.procs.map((p) => p.stop()));
    await maintenance.close();
    await pg.end();
  }
}

/** H deployments `deploying`, each with its running attempt (fresh heartbeat, so none is due in the run). */
async function seedAttempts(dbUrl: string, n: number): Promise<Array<{ deploymentId: string; attemptId: string }>> {
  return withClient(dbUrl, async (c) => {
    await c.query(`TRUNCATE deployments, attempts, state_transitions, outbox, processed_events`);
    const { rows } = await c.query<{ d: string; a: string }>(
      `WITH ids AS MATERIALIZED (
         SELECT i, gen_random_uuid() AS d, gen_random_uuid() AS a FROM generate_series(1, $1::int) AS i
       ), dep AS (
         INSERT INTO deployments (id, name, state, version, current_attempt_id, state_changed_at)
         SELECT d, 'hb-' || i, 'deploying', 3, a, now() FROM ids
       ), att AS (
         INSERT INTO attempts (id, deployment_id, number, status, started_at, last_heartbeat_at)
         SELECT a, d, 1, 'running', now() - interval '10 seconds', now() - interval '10 seconds' FROM ids
       )
       SELECT d, a FROM ids ORDER BY i`,
      [n],
    );
    await c.query('VACUUM ANALYZE deployments');
    await c.query('VACUUM ANALYZE attempts');
    return rows.map((r) => ({ deploymentId: r.d, attemptId: r.a }));
  });
}

/** `attempt.heartbeat` jobs as the SDK makes them (its eventIds and jobIds, the producer's default options). */
async function enqueueHeartbeats(queue: Queue, attempts: ReadonlyArray<{ deploymentId: string; attemptId: string }>): Promise<void> {
  const jobs = attempts.map((a) => {
    const eventId = deriveEventId('attempt.heartbeat', a);
    return { name: 'attempt.heartbeat', data: { deploymentId: a.deploymentId, attemptId: a.attemptId, eventId }, opts: { jobId: jobIdFor(eventId) } };
  });
  for (let i = 0; i < jobs.length; i += 1000) await queue.addBulk(jobs.slice(i, i + 1000));
}

/** Resumes the paused queue and waits until nothing is waiting, active or delayed; returns seconds taken. */
async function drain(queue: Queue, jobs: number, timeoutMs: number): Promise<{ seconds: number; failed: number }> {
  const started = now();
  await queue.resume();
  for (;;) {
    const c = await queue.getJobCounts('waiting', 'active', 'delayed', 'prioritized', 'failed');
    const left = (c['waiting'] ?? 0) + (c['active'] ?? 0) + (c['delayed'] ?? 0) + (c['prioritized'] ?? 0);
    if (left === 0) return { seconds: (now() - started) / 1000, failed: c['failed'] ?? 0 };
    if (now() - started > timeoutMs) throw new Error(`${jobs} jobs not drained in ${timeoutMs} ms (${left} left)`);
    await sleep(20);
  }
}

/** The database's committed transactions so far, as PostgreSQL's cumulative statistics show them now. */
async function commits(c: Client): Promise<number> {
  await c.query('SELECT pg_stat_force_next_flush()').catch(() => undefined); // PG15+: our own pending counts
  await c.query('SELECT pg_stat_clear_snapshot()');
  const { rows } = await c.query<{ n: string }>(`SELECT xact_commit AS n FROM pg_stat_database WHERE datname = current_database()`);
  return Number(rows[0]?.n ?? 0);
}

async function runHeartbeats(services: BenchServices, redis: RedisConnection, dbUrl: string, options: ScaleOptions): Promise<HeartbeatResult> {
  const n = options.heartbeats;
  const concurrency = options.heartbeatConcurrency;
  log(`scale: heartbeats: seeding ${n} running attempts`);
  const attempts = await seedAttempts(dbUrl, n);

  // the BullMQ no-op worker at the same concurrency: the queue's own limit
  const noopPrefix = services.prefix('scale-hb-noop');
  await cleanRedis(services, redis, noopPrefix);
  const noopQueue = new Queue(LIFECYCLE_QUEUE, {
    connection: redis,
    prefix: noopPrefix,
    defaultJobOptions: DEFAULT_JOB_OPTIONS,
    skipWaitingForReady: true,
  });
  noopQueue.on('error', () => undefined);
  let noop: HeartbeatPath;
  const noopProc = await MeasuredProcess.start({
    label: 'scale-hb-noop',
    args: ['dist/bench/fixtures/noop-worker.js'],
    env: { REDIS_URL: services.redisUrl, FLEET_PREFIX: noopPrefix, FLEET_CONCURRENCY: String(concurrency), BENCH_REPORT: 'every:1000' },
    ready: { kind: 'json' },
  });
  try {
    await noopQueue.pause();
    await enqueueHeartbeats(noopQueue, attempts);
    const d = await drain(noopQueue, n, 300_000);
    noop = { jobs: n, drainS: round(d.seconds, 2), jobsPerSec: round(n / d.seconds), failed: d.failed };
    log(`scale: heartbeats: no-op ${JSON.stringify(noop)}`);
  } finally {
    await noopProc.stop();
    await noopQueue.close();
  }

  // the fleet worker
  const prefix = services.prefix('scale-hb-fleet');
  await cleanRedis(services, redis, prefix);
  const queue = new Queue(LIFECYCLE_QUEUE, { connection: redis, prefix, defaultJobOptions: DEFAULT_JOB_OPTIONS, skipWaitingForReady: true });
  queue.on('error', () => undefined);
  const pg = new Client({ connectionString: dbUrl, application_name: 'lifecycle-fleet-bench-scale' });
  await pg.connect();
  const [worker] = await startWorkers(
    1,
    'scale-hb-fleet',
    workerEnv(services, dbUrl, prefix, {
      FLEET_CONCURRENCY: String(concurrency),
      FLEET_SWEEP_EVERY_S: String(options.heartbeatTickS),
      FLEET_READY_WINDOW_S: String(options.heartbeatTickS * 4),
      FLEET_ORPHAN_AFTER_S: '3600', // no attempt becomes due while the bench watches
    }),
    services.redisUrl,
    prefix,
  );
  try {
    await queue.pause();
    const enqueuedFrom = new Date();
    await enqueueHeartbeats(queue, attempts);
    await sleep(options.statsSettleMs); // everything before the window reaches the statistics
    const c0 = await commits(pg);
    const t0 = now();
    const d = await drain(queue, n, 300_000);
    // a buffered flush happens at least once per tick: give it one, then let the statistics arrive
    await sleep(options.heartbeatTickS * 1000 + options.statsSettleMs);
    const c1 = await commits(pg);
    const windowMs = now() - t0;
    await sleep(windowMs);
    const c2 = await commits(pg);
    const { rows } = await pg.query<{ n: string }>(`SELECT count(*) AS n FROM attempts WHERE status = 'running' AND last_heartbeat_at >= $1`, [
      enqueuedFrom,
    ]);
    const stampedInPg = Number(rows[0]?.n ?? 0);
    const commitsWindow = c1 - c0;
    const commitsIdle = c2 - c1;
    const fleet = {
      jobs: n,
      drainS: round(d.seconds, 2),
      jobsPerSec: round(n / d.seconds),
      failed: d.failed,
      commitsWindow,
      windowS: round(windowMs / 1000, 1),
      commitsIdle,
      commitsPerHeartbeat: round(Math.max(0, commitsWindow - commitsIdle) / n, 4),
      stampedInPg,
    };
    log(`scale: heartbeats: fleet ${JSON.stringify(fleet)}`);
    return { heartbeats: n, concurrency, tickS: options.heartbeatTickS, fleet, noop, ratio: round(fleet.jobsPerSec / noop.jobsPerSec, 3) };
  } finally {
    await worker?.stop();
    await queue.close();
    await pg.end();
  }
}
