/**
 * `npm run bench`: runs every scenario against its own Redis and PostgreSQL (or REDIS_URL / DATABASE_URL), prints
 * the tables, and writes bench/results/latest.{json,md,svg}. See bench/README.md.
 *
 *   node dist/bench/run.js [--quick] [--only throughput,latency,sweep,dispatch] [--rate N --concurrency C]
 *                          [--cpu-prof] [--out DIR]
 *
 * --quick        small counts: checks the harness in about a minute, figures not meant to be compared
 * --only         a subset of the scenarios; latency without throughput needs --rate (and --concurrency)
 * --cpu-prof     the measured `fleet worker` processes write V8 CPU profiles to .fleet/bench/profiles
 * --out          where results go (default bench/results)
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { log, repoRoot, round } from './lib/common';
import { chart, evaluateTargets, markdown, rssSummary, type BenchResults } from './lib/report';
import { startBenchServices } from './lib/services';
import { runDispatch, type DispatchResult } from './scenarios/dispatch';
import { runLatency, type LatencyResult } from './scenarios/latency';
import { runSweep, type SweepScenarioResult } from './scenarios/sweep';
import { runThroughput, type ThroughputResult } from './scenarios/throughput';

const SCENARIOS = ['throughput', 'latency', 'sweep', 'dispatch'] as const;
type Scenario = (typeof SCENARIOS)[number];

interface Args {
  readonly quick: boolean;
  readonly only: ReadonlySet<Scenario>;
  readonly rate: number | null;
  readonly concurrency: number | null;
  readonly cpuProf: boolean;
  readonly out: string;
}

function parseArgs(argv: readonly string[]): Args {
  let quick = false;
  let only = new Set<Scenario>(SCENARIOS);
  let rate: number | null = null;
  let concurrency: number | null = null;
  let cpuProf = false;
  let out = defaultOut();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a ?? ''} needs a value`);
      return v;
    };
    if (a === '--quick') quick = true;
    else if (a === '--cpu-prof') cpuProf = true;
    else if (a === '--only') {
      const names = value().split(',');
      const unknown = names.filter((n) => !(SCENARIOS as readonly string[]).includes(n));
      if (unknown.length > 0) throw new Error(`--only: unknown scenario(s) ${unknown.join(', ')}; known: ${SCENARIOS.join(', ')}`);
      only = new Set(names as Scenario[]);
    } else if (a === '--rate') rate = Number(value());
    else if (a === '--concurrency') concurrency = Number(value());
    else if (a === '--out') out = path.resolve(value());
    else throw new Error(`unknown argument ${a ?? ''}`);
  }
  return { quick, only, rate, concurrency, cpuProf, out };
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

function gitDescription(): string {
  try {
    const commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: repoRoot(), encoding: 'utf8' }).trim();
    const dirty = execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: repoRoot(), encoding: 'utf8' }).trim() !== '';
    return `${commit}${dirty ? ' (uncommitted changes)' : ''}`;
  } catch {
    return 'unknown';
  }
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const startedAt = new Date();
  const loadAvgStart = os.loadavg().map((v) => round(v, 2));
  const services = await startBenchServices();
  let throughput: ThroughputResult | null = null;
  let latency: LatencyResult | null = null;
  let sweep: SweepScenarioResult | null = null;
  let dispatch: DispatchResult | null = null;
  try {
    const cpuProfDir = args.cpuProf ? path.join(repoRoot(), '.fleet', 'bench', 'profiles') : undefined;
    if (cpuProfDir !== undefined) fs.mkdirSync(cpuProfDir, { recursive: true });
    if (args.only.has('throughput')) {
      throughput = await runThroughput(services, {
        concurrencies: args.quick ? [4, 16] : [1, 4, 16, 32],
        directConcurrencies: args.quick ? [16] : [1, 4, 16, 32],
        events: (c) => (args.quick ? 500 : c === 1 ? 1000 : 3000),
        warmup: args.quick ? 100 : 300,
        kinds: ['ours', 'noop', 'naive'],
        rounds: args.quick ? 1 : 2,
        ...(cpuProfDir !== undefined ? { cpuProfDir } : {}),
      });
    }
    if (args.only.has('latency')) {
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
        ...(cpuProfDir !== undefined ? { cpuProfDir } : {}),
      });
    }
    if (args.only.has('sweep')) {
      sweep = await runSweep(services, args.quick ? [1000, 10_000] : [1000, 10_000, 100_000]);
    }
    if (args.only.has('dispatch')) {
      dispatch = await runDispatch(services, { httpRequests: args.quick ? 2000 : 10_000, maxSeconds: args.quick ? 2 : 5 });
    }
  } finally {
    await services.stop();
  }

  const finishedAt = new Date();
  const partial = { throughput, latency, sweep, dispatch, rss: rssSummary(throughput, latency) };
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
      services: services.description,
      git: gitDescription(),
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
  if (!args.quick && args.only.size === SCENARIOS.length && args.out === defaultOut()) updateReadme(table);
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
