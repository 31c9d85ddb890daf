/**
 * Scenario 9 (issue 31): watchers of `GET /api/watch` on one `fleet http` process while a `fleet worker` applies
 * transitions at the fleet's half-load rate. For 1 watcher (the baseline) and then 1,000, in the same run on the same
 * processes: the latency from an entry's append (its stream id: the XADD) to the blank line that ends its event, read by
 * a watcher (sampled watchers parse every event; bench/fixtures/sse-watchers.ts); the http process's RSS per watcher
 * (with N watchers minus with none, over N) and its CPU per event and per delivery (one event to one watcher).
 * Beside them, the same entries read from Redis by a blocking XREAD in the bench process: the floor of any reader.
 */
import { execFileSync } from 'node:child_process';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { EnqueueResult } from '../../src/queues/producer';
import { MeasuredProcess } from '../lib/child';
import { log, now, percentiles, round, rssMb, sleep, type Percentiles } from '../lib/common';
import { cpuNow, cpuPerEvent } from '../lib/cpu';
import type { BenchServices } from '../lib/services';
import IORedis from 'ioredis';
import { transitionStreamKey } from '../../src/streams/outbox-relay';
import { cpuGroups, runWorkerLevel, WorkerUnderTest } from '../lib/workers';
import { paced, seedReadyDeployments } from '../lib/workload';

export interface WatchScenarioOptions {
  /** offered events per second; null: half of the maximum measured first (one throughput level at `concurrency`) */
  readonly rate: number | null;
  /** the watcher counts, in order (the first, 1, is the baseline) */
  readonly watchers: readonly number[];
  /** watchers of each run that parse and time every event (evenly spread over the connections) */
  readonly sampled: number;
  readonly seconds: number;
  readonly warmupSeconds: number;
  /** the worker's FLEET_CONCURRENCY */
  readonly concurrency: number;
  /** events of the throughput measurement that sets the rate */
  readonly maxRateEvents: number;
  /** the `fleet http` process writes a V8 CPU profile here (`--cpu-prof`) */
  readonly cpuProfDir?: string;
}

export interface WatchRun {
  readonly watchers: number;
  /**
   * where the entries came from: `fleet`, the worker applying teardowns (the whole pipeline on this machine); `replay`,
   * the bench appending copies of the fleet's own entries to the stream at the same rate, with no worker, PostgreSQL
   * or relay at work (what one fleet http does with the machine to itself)
   */
  readonly feed: 'fleet' | 'replay';
  readonly events: number;
  /** transitions read by all watchers together in the measured window */
  readonly delivered: number;
  readonly seconds: number;
  /** stream id (the XADD) -> the event read by a sampled watcher */
  readonly appendToReadMs: Percentiles;
  /** the entry's `at` (the service's decision, before its commit and the relay) -> read by a sampled watcher */
  readonly decidedToReadMs: Percentiles;
  /** the same entries' append -> read by the bench's blocking XREAD (the floor of any reader) */
  readonly redisReaderMs: Percentiles;
  readonly httpRssMb: number | null;
  /** (RSS with these watchers - RSS with none) / watchers */
  readonly rssPerWatcherKb: number | null;
  /** CPU ms per event by process (http, watchers, worker, postgres, redis, bench, other) */
  readonly cpuMsPerEvent: Record<string, number>;
  /** the http process's CPU per delivery (one event to one watcher), µs */
  readonly httpCpuUsPerDelivery: number | null;
  /** watches the fleet closed with `event: overflow` during the run (fleet_watch_overflows_total) */
  readonly overflows: number;
  /** watches ended before the run's end (overflows included) */
  readonly ended: number;
}

export interface WatchResult {
  readonly rate: number;
  /** where the rate came from */
  readonly rateSource: string;
  readonly concurrency: number;
  readonly seconds: number;
  readonly sampled: number;
  /** the http process's RSS before any watcher */
  readonly idleRssMb: number | null;
  /** the hard limit of open files (`ulimit -Hn`) the processes ran with */
  readonly fdLimit: string;
  readonly runs: readonly WatchRun[];
}

/** The hard limit of open files: Node raises its soft limit to it at start, so it bounds the connections. */
function fdHardLimit(): string {
  try {
    return execFileSync('sh', ['-c', 'ulimit -Hn'], { encoding: 'utf8' }).trim();
  } catch {
    return 'unknown';
  }
}

async function freePort(): Promise<number> {
  const server = http.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

async function overflowsOf(api: string): Promise<number> {
  const text = await (await fetch(`${api}/metrics`)).text();
  return Number(/^fleet_watch_overflows_total (\d+)/m.exec(text)?.[1] ?? 0);
}

/** The watchers' process, with its latest progress and, once stopped, its samples. */
class Watchers {
  delivered = 0;
  ended = 0;
  private samples: number[][] | null = null;
  private gotSamples: () => void = () => undefined;
  private readonly samplesIn = new Promise<void>((resolve) => (this.gotSamples = resolve));

  private constructor(readonly proc: MeasuredProcess) {
    proc.onMessage((m) => {
      if (typeof m['delivered'] === 'number') this.delivered = m['delivered'];
      if (typeof m['ended'] === 'number') this.ended = m['ended'];
      if (Array.isArray(m['samples'])) {
        this.samples = m['samples'] as number[][];
        this.gotSamples();
      }
    });
  }

  static async start(api: string, count: number, sampled: number, label: string): Promise<Watchers> {
    const proc = await MeasuredProcess.start({
      label,
      args: ['dist/bench/fixtures/sse-watchers.js'],
      env: { BENCH_WATCH_URL: `${api}/api/watch`, BENCH_WATCHERS: String(count), BENCH_SAMPLED: String(sampled) },
      ready: { kind: 'json' },
      timeoutMs: 120_000,
    });
    return new Watchers(proc);
  }

  /** Waits until the watchers have read `count` transitions in all (or `timeoutMs` passed: some fell behind). */
  async waitDelivered(count: number, timeoutMs: number): Promise<boolean> {
    const deadline = now() + timeoutMs;
    while (this.delivered < count) {
      if (now() > deadline) return false;
      await sleep(50);
    }
    return true;
  }

  async stop(): Promise<number[][]> {
    await this.proc.stop();
    await Promise.race([this.samplesIn, sleep(10_000)]);
    return this.samples ?? [];
  }
}

/** The rate: `--rate`, or half of what one worker sustains here now (the latency scenario's load). */
async function halfLoadRate(services: BenchServices, dbUrl: string, options: WatchScenarioOptions): Promise<{ rate: number; source: string }> {
  if (options.rate !== null) return { rate: options.rate, source: '--rate' };
  const ids = await seedReadyDeployments(dbUrl, 200 + options.maxRateEvents);
  const run = await runWorkerLevel(
    {
      kind: 'ours',
      concurrency: options.concurrency,
      redisUrl: services.redisUrl,
      databaseUrl: dbUrl,
      prefix: services.prefix('watch-max'),
      servicePids: services.pids,
    },
    ids,
    200,
  );
  const rate = Math.max(1, Math.round(run.eventsPerSec / 2));
  log(`watch: one worker at concurrency ${options.concurrency} sustained ${round(run.eventsPerSec)} events/s; the watch runs at half: ${rate}/s`);
  return { rate, source: `half of ${round(run.eventsPerSec)} events/s, one worker at concurrency ${options.concurrency}, measured first` };
}

export async function runWatch(services: BenchServices, options: WatchScenarioOptions): Promise<WatchResult> {
  const fdLimit = fdHardLimit();
  const most = Math.max(...options.watchers);
  if (fdLimit !== 'unlimited' && fdLimit !== 'unknown' && Number(fdLimit) < most + 256) {
    throw new Error(
      `watch: ${most} watchers need a hard limit of open files of at least ${most + 256} (ulimit -Hn is ${fdLimit}): raise it, or pass --watchers`,
    );
  }
  const dbUrl = await services.createDatabase('watch');
  const { rate, source } = await halfLoadRate(services, dbUrl, options);
  const perRun = Math.round(rate * (options.warmupSeconds + options.seconds));
  const ids = await seedReadyDeployments(dbUrl, 200 + perRun * options.watchers.length);
  const prefix = services.prefix('watch');
  const worker = await WorkerUnderTest.start({
    kind: 'ours',
    concurrency: options.concurrency,
    redisUrl: services.redisUrl,
    databaseUrl: dbUrl,
    prefix,
    report: 'each',
    servicePids: services.pids,
  });
  let server: MeasuredProcess | null = null;
  try {
    await worker.enqueueAll(ids.slice(0, 200));
    await worker.waitDone(200, 60_000);
    const port = await freePort();
    server = await MeasuredProcess.start({
      label: `${prefix}-http`,
      args: ['bin/fleet.js', 'http'],
      env: {
        REDIS_URL: services.redisUrl,
        DATABASE_URL: dbUrl,
        FLEET_PREFIX: prefix,
        FLEET_HTTP_PORT: String(port),
        FLEET_HTTP_HOST: '127.0.0.1',
        LOG_LEVEL: 'info',
      },
      ready: { kind: 'log', pattern: /http started/ },
      ...(options.cpuProfDir !== undefined ? { cpuProfDir: options.cpuProfDir } : {}),
    });
    const api = `http://127.0.0.1:${port}`;
    await sleep(2000); // the process settles (its start's garbage collected) before its idle RSS is read
    const idleRssMb = rssMb(server.pid);
    const runs: WatchRun[] = [];
    let next = 200;
    for (const count of options.watchers) {
      const slice = ids.slice(next, next + perRun);
      next += perRun;
      runs.push(await watchRun({ services, worker, server, api, count, ids: slice, rate, idleRssMb, options }));
    }
    // the most watchers again, fed by the bench: the watch's own cost, with the pipeline's off the machine's CPUs
    runs.push(await watchRun({ services, worker, server, api, count: most, ids: [], rate, idleRssMb, options, replay: prefix }));
    return {
      rate,
      rateSource: source,
      concurrency: options.concurrency,
      seconds: options.seconds,
      sampled: options.sampled,
      idleRssMb,
      fdLimit,
      runs,
    };
  } finally {
    await server?.stop();
    await worker.stop();
  }
}

interface RunSetup {
  readonly services: BenchServices;
  readonly worker: WorkerUnderTest;
  readonly server: MeasuredProcess;
  readonly api: string;
  readonly count: number;
  /** the deployments this run tears down: its warm-up's, then its measured events' */
  readonly ids: readonly string[];
  readonly rate: number;
  readonly idleRssMb: number | null;
  readonly options: WatchScenarioOptions;
  /** the prefix whose stream the bench appends to itself (the replayed feed); absent: the worker's teardowns of `ids` */
  readonly replay?: string;
}

/** Paces teardowns of `ids` at the rate; resolves with each event's enqueue result once every one is on the stream. */
async function pacedEvents(worker: WorkerUnderTest, ids: readonly string[], rate: number, doneBefore: number): Promise<EnqueueResult[]> {
  const sent: Array<Promise<EnqueueResult>> = [];
  await paced(ids.length, rate, (i) => {
    const id = ids[i];
    if (id !== undefined) sent.push(worker.enqueueTeardown(id));
  });
  const results = await Promise.all(sent);
  await worker.waitDone(doneBefore + ids.length, 120_000);
  return results;
}

/**
 * The replayed feed: appends copies of the stream's last `n` entries (each with its own `at` and transitionId) with
 * the gaps and the grouping the relay appended them with (the entries of one millisecond together: a commit's), so
 * that the watch reads them as it read the fleet's; the worker idle.
 */
async function replayEntries(redisUrl: string, prefix: string, n: number): Promise<void> {
  const redis = new IORedis(redisUrl, { maxRetriesPerRequest: 2, connectionName: 'bench-watch-replay' });
  try {
    const key = transitionStreamKey(prefix);
    const originals = (await redis.xrevrange(key, '+', '-', 'COUNT', n)).reverse();
    const first = originals[0];
    if (first === undefined) throw new Error(`watch: nothing on ${key} to replay`);
    const msOf = (id: string) => Number(id.split('-')[0]);
    const t0 = now() + 5;
    let i = 0;
    const sent: Array<Promise<unknown>> = [];
    while (i < originals.length) {
      const at = msOf(originals[i]?.[0] ?? first[0]);
      const wait = t0 + (at - msOf(first[0])) - now();
      if (wait >= 1) await sleep(Math.floor(wait));
      // every entry of that millisecond at once, as the relay appended them
      const pipeline = redis.pipeline();
      for (; i < originals.length && msOf(originals[i]?.[0] ?? '') === at; i++) {
        const fields = originals[i]?.[1] ?? [];
        const copy = fields.map((value, f) => {
          const name = f % 2 === 1 ? fields[f - 1] : undefined;
          return name === 'at' ? new Date().toISOString() : name === 'transitionId' ? `replay-${i}` : value;
        });
        pipeline.xadd(key, '*', ...copy);
      }
      sent.push(pipeline.exec());
    }
    await Promise.all(sent);
  } finally {
    redis.disconnect();
  }
}

async function watchRun(setup: RunSetup): Promise<WatchRun> {
  const { worker, server, api, count, rate, options, replay } = setup;
  const sampled = Math.min(count, options.sampled);
  const watchers = await Watchers.start(
    api,
    count,
    sampled,
    `${setup.services.prefix('watch')}-watchers-${count}${replay !== undefined ? '-replay' : ''}`,
  );
  const feed = (ids: readonly string[], n: number, doneBefore: number): Promise<EnqueueResult[]> =>
    replay !== undefined ? replayEntries(setup.services.redisUrl, replay, n).then(() => []) : pacedEvents(worker, ids, rate, doneBefore);
  try {
    const warmup = Math.round(rate * options.warmupSeconds);
    const done = worker.watcher?.count ?? 0;
    await feed(setup.ids.slice(0, warmup), warmup, done);
    await watchers.waitDelivered(warmup * count, 60_000);
    const overflowsBefore = await overflowsOf(api);
    const groups = {
      ...cpuGroups({ servicePids: setup.services.pids }, worker.proc.pid),
      http: { pid: server.pid, tree: false },
      watchers: { pid: watchers.proc.pid, tree: false },
    };
    const cpuBefore = cpuNow(groups);
    const deliveredBefore = watchers.delivered;
    const started = now();
    const windowStart = Date.now();
    const measuredCount = replay !== undefined ? Math.round(rate * options.seconds) : setup.ids.length - warmup;
    const results = await feed(setup.ids.slice(warmup), measuredCount, done + warmup);
    const measured = { length: measuredCount };
    const complete = await watchers.waitDelivered(deliveredBefore + measured.length * (count - watchers.ended), 60_000);
    const seconds = (now() - started) / 1000;
    const cpu = cpuPerEvent(cpuBefore, cpuNow(groups), measured.length);
    const httpRssMb = rssMb(server.pid);
    const delivered = watchers.delivered - deliveredBefore;
    const overflows = (await overflowsOf(api)) - overflowsBefore;
    const ended = watchers.ended;
    if (!complete) log(`watch: ${count} watchers: only ${delivered} of ${measured.length * count} deliveries within 60 s of the last append`);
    const samples = (await watchers.stop()).filter(([append]) => append !== undefined && append >= windowStart);
    const httpMs = (cpu['http'] ?? 0) * measured.length;
    const run: WatchRun = {
      watchers: count,
      feed: replay !== undefined ? 'replay' : 'fleet',
      events: measured.length,
      delivered,
      seconds: round(seconds, 2),
      appendToReadMs: percentiles(samples.map(([append, , read]) => (read ?? 0) - (append ?? 0))),
      decidedToReadMs: percentiles(samples.map(([, decided, read]) => (read ?? 0) - (decided ?? 0))),
      redisReaderMs: percentiles(redisReader(worker, results)),
      httpRssMb,
      rssPerWatcherKb: httpRssMb !== null && setup.idleRssMb !== null ? round(((httpRssMb - setup.idleRssMb) * 1024) / count, 1) : null,
      cpuMsPerEvent: cpu,
      httpCpuUsPerDelivery: delivered > 0 ? round((httpMs * 1000) / delivered, 2) : null,
      overflows,
      ended,
    };
    log(
      `watch: ${count} watcher(s) at ${rate}/s${replay !== undefined ? ' (replayed feed)' : ''}: append -> read p50 ${run.appendToReadMs.p50} / p99 ${run.appendToReadMs.p99} ms ` +
        `(redis reader p99 ${run.redisReaderMs.p99} ms); http RSS ${httpRssMb ?? '?'} MiB (${run.rssPerWatcherKb ?? '?'} KiB per watcher); ` +
        `http CPU ${cpu['http'] ?? '?'} ms per event, ${run.httpCpuUsPerDelivery ?? '?'} µs per delivery; overflows ${overflows}, ended ${ended}`,
    );
    return run;
  } catch (err) {
    await watchers.stop().catch(() => undefined);
    throw err;
  }
}

/** The measured entries' append -> read by the bench's blocking XREAD (the worker's StreamWatcher), in ms. */
function redisReader(worker: WorkerUnderTest, results: readonly EnqueueResult[]): number[] {
  const out: number[] = [];
  for (const result of results) {
    const stages = worker.stages(result);
    const readAt = worker.doneAt(result);
    if (stages !== undefined && readAt !== undefined) out.push(readAt - stages.appendedAt);
  }
  return out;
}

export function watchMarkdown(r: WatchResult): string[] {
  const out: string[] = [];
  out.push(`### 9. Watch over HTTP: one fleet http, ${r.rate} events/s (${r.rateSource}), ${r.seconds} s per row`);
  out.push('');
  out.push(
    `Latency from each entry's append (its stream id: the XADD, on the same clock) to the end of its event read by a watcher (${r.sampled} sampled watchers ` +
      "parse every event; the rest count them); beside it, from the entry's `at` (the decision, before commit and relay), and the same entries read by a " +
      `blocking XREAD in the bench process. RSS per watcher: the http process's RSS with the watchers minus with none (${r.idleRssMb ?? '?'} MiB), over their number. ` +
      `CPU per delivery: the http process's CPU over the events times the watchers that read them. Open files: hard limit ${r.fdLimit}. ` +
      "The last row, *replayed feed*, is the most watchers again with the bench appending copies of the fleet's last entries with the gaps and grouping " +
      'the relay appended them with, the worker idle: the watch path alone, without the pipeline on the same CPUs.',
  );
  out.push('');
  out.push(
    '| watchers | append -> read p50 / p99 (ms) | decided -> read p99 (ms) | Redis reader p99 (ms) | http RSS (MiB) | RSS per watcher (KiB) | http CPU per event (ms) | http CPU per delivery (µs) | watchers CPU per event (ms) | other CPU per event (ms) | overflows / ended |',
  );
  out.push('|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
  for (const x of r.runs) {
    out.push(
      `| ${x.watchers}${x.feed === 'replay' ? ' (replayed feed)' : ''} | ${x.appendToReadMs.p50} / ${x.appendToReadMs.p99} | ${x.decidedToReadMs.p99} | ${x.feed === 'replay' ? '–' : x.redisReaderMs.p99} | ${x.httpRssMb ?? '–'} | ${x.rssPerWatcherKb ?? '–'} | ` +
        `${x.cpuMsPerEvent['http'] ?? '–'} | ${x.httpCpuUsPerDelivery ?? '–'} | ${x.cpuMsPerEvent['watchers'] ?? '–'} | ${x.cpuMsPerEvent['other'] ?? '–'} | ${x.overflows} / ${x.ended} |`,
    );
  }
  out.push('');
  return out;
}
