/**
 * `npm run bench`: runs every scenario against its own Redis and PostgreSQL (or REDIS_URL / DATABASE_URL), prints
 * the tables, and writes bench/results/latest.{json,md,svg}. See bench/README.md.
 *
 *   node dist/bench/run.js [--quick] [--only throughput,latency,sweep,dispatch,scale,hosts,consumers,watch] [--rate N --concurrency C]
 *                          [--cpu-prof] [--out DIR] [scale options]
 *
 * --quick        small counts: checks the harness in about a minute, figures not meant to be compared
 * --only         a subset of the scenarios; latency without throughput needs --rate (and --concurrency)
 * --levels 16,32 the throughput scenario's worker concurrencies; --kinds ours,unbatched its workers; --rounds 1
 * --cpu-prof     the measured `fleet worker` processes (and the watch scenario's `fleet http`) write V8 CPU profiles to
 *                .fleet/bench/profiles
 * --out          where results go (default bench/results)
 * --watchers 1,1000  the watch scenario's watcher counts on one fleet http (the first is the baseline); it runs at
 *                --rate, or half of throughput's best in this run, or half of a short throughput level it measures first
 * --before DIR   also run an earlier commit's `fleet worker` (DIR: a built checkout) as the kind `before` in
 *                throughput and latency, next to ours: a change's before and after in one run
 *
 * `hosts` (issue 17: horizontal throughput with 1, 2 and 4 worker hosts, network namespaces; root) runs only when
 * named in --only (about 5 minutes). Its options:
 * --hosts-sizes 1,2,4        worker hosts of each run [--quick: 1,2]
 * --hosts-events 16000       measured events per run [--quick: 2000]
 * --hosts-concurrency 16     FLEET_CONCURRENCY of every worker process
 * --hosts-warmup 300         warm-up events per host [--quick: 100]
 * --hosts-rounds 2           runs of each size, rounds one after the other (the best counts) [--quick: 1]
 *
 * `scale` (issue 16: readiness and heartbeats at fleet scale) runs only when named in --only (about 20 minutes).
 * Its options (see bench/README.md):
 * --scale-sizes 10000,50000,100000   readiness set sizes of the matrix
 * --scale-workers 1,2,4              worker processes of the matrix
 * --scale-tick 10 --scale-window 40  the matrix's FLEET_SWEEP_EVERY_S / FLEET_READY_WINDOW_S
 * --scale-timeouts 0                 fraction of the matrix's endpoints that never answer
 * --probe-concurrency N              FLEET_PROBE_CONCURRENCY of every worker process (default: unset, the fleet's default)
 * --scale-parts matrix,default,timeouts,heartbeats   which parts run
 * --scale-heartbeats 20000           heartbeat jobs of part B
 * --scale-endpoint-procs 1           fixture processes serving the endpoints
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { log, repoRoot, round } from './lib/common';
import { chart, evaluateTargets, markdown, rssSummary, type BenchResults } from './lib/report';
import { startBenchServices } from './lib/services';
import { DEFAULT_WORKER_KINDS, WORKER_KINDS, type WorkerKind } from './lib/workers';
import { runDispatch, type DispatchResult } from './scenarios/dispatch';
import { runLatency, type LatencyResult } from './scenarios/latency';
import { runSweep, type SweepScenarioResult } from './scenarios/sweep';
import { runHosts, type HostsOptions, type HostsResult } from './scenarios/hosts';
import { runScale, type ScaleOptions, type ScaleResult } from './scenarios/scale';
import { runThroughput, type ThroughputResult } from './scenarios/throughput';
import { runConsumers, type ConsumersResult } from './scenarios/consumers';
import { runWatch, type WatchResult } from './scenarios/watch';

const SCENARIOS = ['throughput', 'latency', 'sweep', 'dispatch', 'scale', 'hosts', 'consumers', 'watch'] as const;
type Scenario = (typeof SCENARIOS)[number];
/**
 * what runs without --only: `scale` takes about 20 minutes on its own, `hosts` needs root, `consumers` (issue 29)
 * about 6 minutes, `watch` (issue 31) about 2 minutes and a thousand connections; they are asked for by name
 */
const DEFAULT_SCENARIOS: readonly Scenario[] = ['throughput', 'latency', 'sweep', 'dispatch'];
const SCALE_PARTS = ['matrix', 'default', 'timeouts', 'heartbeats'] as const;
type ScalePart = (typeof SCALE_PARTS)[number];

interface ScaleArgs {
  sizes: number[] | null;
  workers: number[] | null;
  tickS: number | null;
  windowS: number | null;
  timeouts: number;
  probeConcurrency: number | null;
  parts: ReadonlySet<ScalePart>;
  heartbeats: number | null;
  endpointProcs: number;
}

interface HostsArgs {
  sizes: number[] | null;
  events: number | null;
  concurrency: number;
  warmup: number | null;
  rounds: number | null;
}

interface Args {
  readonly quick: boolean;
  readonly only: ReadonlySet<Scenario>;
  readonly rate: number | null;
  readonly concurrency: number | null;
  readonly cpuProf: boolean;
  readonly out: string;
  readonly scale: ScaleArgs;
  readonly hosts: HostsArgs;
  /** --levels: the throughput scenario's worker concurrencies [1,4,16,32,64; --quick: 4,16] */
  readonly levels: number[] | null;
  /** --kinds: the throughput scenario's workers [ours,unbatched,noop,naive]; `traced` (ours with tracing on) and `partitioned` (ours with 16 stream partitions) on request */
  readonly kinds: WorkerKind[] | null;
  /** --rounds: the throughput scenario's rounds [2; --quick: 1] */
  readonly rounds: number | null;
  /**
   * --before DIR: a built checkout of an earlier commit (`git worktree add DIR <commit> && (cd DIR && npm ci && npm
   * run build)`); its `fleet worker` runs as the kind `before` next to ours in throughput and latency
   */
  readonly before: string | null;
  /** --watchers 1,1000: the watch scenario's watcher counts, the first the baseline [1,1000; --quick: 1,100] */
  readonly watchers: number[] | null;
}

function parseArgs(argv: readonly string[]): Args {
  let quick = false;
  let only = new Set<Scenario>(DEFAULT_SCENARIOS);
  const scale: ScaleArgs = {
    sizes: null,
    workers: null,
    tickS: null,
    windowS: null,
    timeouts: 0,
    probeConcurrency: null,
    parts: new Set(SCALE_PARTS),
    heartbeats: null,
    endpointProcs: 1,
  };
  const ints = (v: string, what: string): number[] => {
    const xs = v.split(',').map(Number);
    if (xs.length === 0 || xs.some((x) => !Number.isInteger(x) || x < 1))
      throw new Error(`${what}: a comma-separated list of positive whole numbers, got ${v}`);
    return xs;
  };
  const positive = (v: string, what: string): number => {
    const x = Number(v);
    if (!Number.isInteger(x) || x < 1) throw new Error(`${what}: a positive whole number, got ${v}`);
    return x;
  };
  const hosts: HostsArgs = { sizes: null, events: null, concurrency: 16, warmup: null, rounds: null };
  let rate: number | null = null;
  let concurrency: number | null = null;
  let cpuProf = false;
  let out = defaultOut();
  let levels: number[] | null = null;
  let kinds: WorkerKind[] | null = null;
  let rounds: number | null = null;
  let before: string | null = null;
  let watchers: number[] | null = null;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a ?? ''} needs a value`);
      return v;
    };
    if (a === '--quick') quick = true;
    else if (a === '--levels') levels = ints(value(), '--levels');
    else if (a === '--watchers') watchers = ints(value(), '--watchers');
    else if (a === '--rounds') rounds = positive(value(), '--rounds');
    else if (a === '--kinds') {
      const names = value().split(',');
      const unknown = names.filter((n) => !(WORKER_KINDS as readonly string[]).includes(n));
      if (unknown.length > 0 || !names.includes('ours'))
        throw new Error(`--kinds: ours and any of ${WORKER_KINDS.join(', ')}; got ${names.join(', ')}`);
      kinds = names as WorkerKind[];
    } else if (a === '--before') {
      before = path.resolve(value());
      if (!fs.existsSync(path.join(before, 'bin', 'fleet.js')) || !fs.existsSync(path.join(before, 'dist'))) {
        throw new Error(`--before: ${before} is not a built checkout (bin/fleet.js and dist/ are needed: npm ci && npm run build there)`);
      }
    } else if (a === '--cpu-prof') cpuProf = true;
    else if (a === '--only') {
      const names = value().split(',');
      const unknown = names.filter((n) => !(SCENARIOS as readonly string[]).includes(n));
      if (unknown.length > 0) throw new Error(`--only: unknown scenario(s) ${unknown.join(', ')}; known: ${SCENARIOS.join(', ')}`);
      only = new Set(names as Scenario[]);
    } else if (a === '--rate') rate = Number(value());
    else if (a === '--concurrency') concurrency = Number(value());
    else if (a === '--out') out = path.resolve(value());
    else if (a === '--scale-sizes') scale.sizes = ints(value(), a);
    else if (a === '--scale-workers') scale.workers = ints(value(), a);
    else if (a === '--scale-tick') scale.tickS = positive(value(), a);
    else if (a === '--scale-window') scale.windowS = positive(value(), a);
    else if (a === '--scale-heartbeats') scale.heartbeats = Number(value());
    else if (a === '--scale-endpoint-procs') scale.endpointProcs = positive(value(), a);
    else if (a === '--hosts-sizes') hosts.sizes = ints(value(), a);
    else if (a === '--hosts-events') hosts.events = positive(value(), a);
    else if (a === '--hosts-concurrency') hosts.concurrency = positive(value(), a);
    else if (a === '--hosts-warmup') hosts.warmup = positive(value(), a);
    else if (a === '--hosts-rounds') hosts.rounds = positive(value(), a);
    else if (a === '--scale-timeouts') {
      scale.timeouts = Number(value());
      if (!(scale.timeouts >= 0 && scale.timeouts < 1)) throw new Error(`--scale-timeouts: a fraction in [0, 1), got ${scale.timeouts}`);
    } else if (a === '--probe-concurrency') {
      const v = value();
      scale.probeConcurrency = v === 'default' ? null : positive(v, a);
    } else if (a === '--scale-parts') {
      const names = value().split(',');
      const unknown = names.filter((n) => !(SCALE_PARTS as readonly string[]).includes(n));
      if (unknown.length > 0) throw new Error(`--scale-parts: unknown part(s) ${unknown.join(', ')}; known: ${SCALE_PARTS.join(', ')}`);
      scale.parts = new Set(names as ScalePart[]);
    } else throw new Error(`unknown argument ${a ?? ''}`);
  }
  const tickS = scale.tickS ?? (quick ? 3 : 10);
  const windowS = scale.windowS ?? tickS * (quick ? 3 : 4);
  if (windowS <= tickS) throw new Error(`--scale-window (${windowS}) must be longer than --scale-tick (${tickS}), as FLEET_READY_WINDOW_S must`);
  scale.tickS = tickS;
  scale.windowS = windowS;
  if (hosts.sizes !== null && Math.max(...hosts.sizes) > 16) throw new Error('--hosts-sizes: at most 16 worker hosts');
  if (before !== null && kinds !== null && !kinds.includes('before')) kinds = [...kinds, 'before'];
  return { quick, only, rate, concurrency, cpuProf, out, scale, hosts, levels, kinds, rounds, before, watchers };
}

/**
 * The hosts scenario's plan. Full: 1, 2, 4 hosts, 16,000 events (about 20 s on 1 host on an idle machine), two
 * rounds. --quick: 1, 2 hosts, 2000 events, one round.
 */
function hostsOptions(a: HostsArgs, quick: boolean, cpuProfDir: string | undefined): HostsOptions {
  return {
    sizes: a.sizes ?? (quick ? [1, 2] : [1, 2, 4]),
    events: a.events ?? (quick ? 2000 : 16_000),
    warmupPerHost: a.warmup ?? (quick ? 100 : 300),
    concurrency: a.concurrency,
    rounds: a.rounds ?? (quick ? 1 : 2),
    ...(cpuProfDir !== undefined ? { cpuProfDir } : {}),
  };
}

/**
 * The scale scenario's plan. Full: the matrix (10k/50k/100k x 1/2/4 at a compressed tick), 100,000 endpoints with
 * 4 processes at the default tick and window, 20,000 endpoints with 10% silent and 2 processes at the default tick
 * and window, 20,000 heartbeats. --quick: 2,000 endpoints, 1-2 processes, 3 s ticks, 2,000 heartbeats.
 */
function scaleOptions(a: ScaleArgs, quick: boolean): ScaleOptions {
  const tickS = a.tickS ?? 10;
  const windowS = a.windowS ?? 40;
  const spec = (kind: 'default-window' | 'timeouts', endpoints: number, workers: number, silentFraction: number) => ({
    kind,
    endpoints,
    workers,
    // the issue asks for the default tick and window (30 s / 120 s); --quick compresses them to check the harness
    tickS: quick ? tickS : 30,
    windowS: quick ? windowS : 120,
    silentFraction,
    probeConcurrency: a.probeConcurrency,
  });
  return {
    sizes: a.sizes ?? (quick ? [2000] : [10_000, 50_000, 100_000]),
    workers: a.workers ?? (quick ? [1, 2] : [1, 2, 4]),
    tickS,
    windowS,
    silentFraction: a.timeouts,
    probeConcurrency: a.probeConcurrency,
    matrix: a.parts.has('matrix'),
    defaultWindowRun: a.parts.has('default') ? spec('default-window', quick ? 2000 : 100_000, quick ? 2 : 4, 0) : null,
    timeoutsRun: a.parts.has('timeouts') ? spec('timeouts', quick ? 2000 : 20_000, 2, 0.1) : null,
    heartbeats: a.parts.has('heartbeats') ? (a.heartbeats ?? (quick ? 2000 : 20_000)) : 0,
    heartbeatTickS: quick ? 3 : 10,
    heartbeatConcurrency: 16,
    statsSettleMs: quick ? 3000 : 11_000,
    endpointProcesses: a.endpointProcs,
    delayMs: 30,
  };
}

function defaultOut(): string {
  return path.join(repoRoot(), 'bench', 'results');
}

/** A full run puts its tables into bench/README.md, between the results markers. */
function updateReadme(table: string): void {
  const file = path.join(repoRoot(), 'bench', 'README.md');
  const start = '<!-- results:start -->';
  const end = '<!-- results:end -->';
  const text = fs.readFileSync(file, 'utf8');
  const i = text.indexOf(start);
  const j = text.indexOf(end);
  if (i < 0 || j < i) return;
  fs.writeFileSync(file, `${text.slice(0, i + start.length)}\n${table.replace(/^### /gm, '#### ')}\n${text.slice(j)}`);
}

function gitDescription(root: string = repoRoot()): string {
  try {
    const commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: root, encoding: 'utf8' }).trim();
    const dirty = execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: root, encoding: 'utf8' }).trim() !== '';
    return `${commit}${dirty ? ' (uncommitted changes)' : ''}`;
  } catch {
    return 'unknown';
  }
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const startedAt = new Date();
  const loadAvgStart = os.loadavg().map((v) => round(v, 2));
  // `hosts` starts servers of its own inside its lab: the loopback ones only when another scenario needs them
  const services = [...args.only].some((x) => x !== 'hosts') ? await startBenchServices() : null;
  let throughput: ThroughputResult | null = null;
  let latency: LatencyResult | null = null;
  let sweep: SweepScenarioResult | null = null;
  let dispatch: DispatchResult | null = null;
  let scale: ScaleResult | null = null;
  let hosts: HostsResult | null = null;
  let consumers: ConsumersResult | null = null;
  let watch: WatchResult | null = null;
  try {
    const cpuProfDir = args.cpuProf ? path.join(repoRoot(), '.fleet', 'bench', 'profiles') : undefined;
    if (cpuProfDir !== undefined) fs.mkdirSync(cpuProfDir, { recursive: true });
    if (services !== null && args.only.has('throughput')) {
      throughput = await runThroughput(services, {
        concurrencies: args.levels ?? (args.quick ? [4, 16] : [1, 4, 16, 32, 64]),
        directConcurrencies: args.quick ? [16] : [1, 4, 16, 32, 64],
        events: (c) => (args.quick ? 500 : c === 1 ? 1000 : 3000),
        warmup: args.quick ? 100 : 300,
        kinds: args.kinds ?? (args.before !== null ? [...DEFAULT_WORKER_KINDS, 'before'] : DEFAULT_WORKER_KINDS),
        ...(args.before !== null ? { beforeRoot: args.before } : {}),
        rounds: args.rounds ?? (args.quick ? 1 : 2),
        ...(cpuProfDir !== undefined ? { cpuProfDir } : {}),
      });
    }
    if (services !== null && args.only.has('latency')) {
      const rate = args.rate ?? (throughput !== null ? Math.round(throughput.best.ours.eventsPerSec * 0.5) : null);
      const concurrency = args.concurrency ?? throughput?.best.ours.concurrency ?? 16;
      if (rate === null) throw new Error('latency needs the throughput scenario or --rate');
      latency = await runLatency(services, {
        rate,
        concurrency,
        // the same load with fewer jobs in flight: what an operator tuning for latency would run
        alsoConcurrencies: [4].filter((c) => c !== concurrency),
        seconds: args.quick ? 3 : 10,
        warmup: 200,
        ...(args.before !== null ? { beforeRoot: args.before } : {}),
        ...(cpuProfDir !== undefined ? { cpuProfDir } : {}),
      });
    }
    if (services !== null && args.only.has('sweep')) {
      sweep = await runSweep(services, args.quick ? [1000, 10_000] : [1000, 10_000, 100_000]);
    }
    if (services !== null && args.only.has('dispatch')) {
      dispatch = await runDispatch(services, { httpRequests: args.quick ? 2000 : 10_000, maxSeconds: args.quick ? 2 : 5 });
    }
    if (services !== null && args.only.has('scale')) {
      scale = await runScale(services, scaleOptions(args.scale, args.quick));
    }
    if (args.only.has('hosts')) {
      hosts = await runHosts(hostsOptions(args.hosts, args.quick, cpuProfDir));
    }
    if (services !== null && args.only.has('consumers')) {
      // 2,000 transitions over 1,000 deployments, interleaved; a 20 ms handler (the workload). Many
      // deployments with few transitions each, so that they spread evenly enough over 16 partitions for the busiest
      // consumer's share not to bound 8 consumers below the target (250 deployments did: see bench/README.md)
      consumers = await runConsumers(services, {
        partitions: [16, 1],
        consumers: [1, 2, 4, 8],
        deployments: args.quick ? 100 : 1000,
        versions: 2,
        handlerMs: 20,
        leaseMs: 10_000,
      });
    }
    if (services !== null && args.only.has('watch')) {
      watch = await runWatch(services, {
        // the latency scenario's load: half of what ours sustained in this run, else --rate, else measured first
        rate: args.rate ?? (throughput !== null ? Math.round(throughput.best.ours.eventsPerSec * 0.5) : null),
        concurrency: args.concurrency ?? throughput?.best.ours.concurrency ?? 16,
        watchers: args.watchers ?? (args.quick ? [1, 100] : [1, 1000]),
        sampled: 20,
        seconds: args.quick ? 3 : 10,
        warmupSeconds: args.quick ? 1 : 2,
        maxRateEvents: args.quick ? 1000 : 3000,
        ...(cpuProfDir !== undefined ? { cpuProfDir } : {}),
      });
    }
  } finally {
    await services?.stop();
  }

  const finishedAt = new Date();
  const partial = { throughput, latency, sweep, dispatch, scale, hosts, consumers, watch, rss: rssSummary(throughput, latency) };
  const cpus = os.cpus();
  const results: BenchResults = {
    meta: {
      startedAt: startedAt.toISOString(),
      finishedAt: finishedAt.toISOString(),
      durationS: Math.round((finishedAt.getTime() - startedAt.getTime()) / 1000),
      command: `node dist/bench/run.js ${process.argv.slice(2).join(' ')}`.trim(),
      node: process.versions.node,
      cpus: cpus.length,
      cpuModel: cpus[0]?.model.trim() ?? 'unknown',
      memGb: round(os.totalmem() / 2 ** 30, 1),
      loadAvgStart,
      loadAvgEnd: os.loadavg().map((v) => round(v, 2)),
      services: services?.description ?? (hosts !== null && hosts.skipped === null ? hosts.services : 'none (hosts skipped)'),
      git: gitDescription(),
      ...(args.before !== null ? { before: gitDescription(args.before) } : {}),
      quick: args.quick,
    },
    ...partial,
    targets: evaluateTargets(partial),
  };
  fs.mkdirSync(args.out, { recursive: true });
  const table = markdown(results);
  fs.writeFileSync(path.join(args.out, 'latest.json'), `${JSON.stringify(results, null, 2)}\n`);
  fs.writeFileSync(path.join(args.out, 'latest.md'), `${table}\n`);
  fs.writeFileSync(path.join(args.out, 'latest.svg'), chart(results));
  const defaultSet = args.only.size === DEFAULT_SCENARIOS.length && DEFAULT_SCENARIOS.every((x) => args.only.has(x));
  if (!args.quick && defaultSet && args.out === defaultOut()) updateReadme(table);
  process.stdout.write(`\n${table}\n`);
  log(`results: ${path.relative(process.cwd(), args.out) || '.'}/latest.{json,md,svg}`);
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  },
);
