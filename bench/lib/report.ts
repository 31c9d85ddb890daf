/**
 * The results file, the tables and the chart of a benchmark run.
 */
import type { DispatchResult } from '../scenarios/dispatch';
import { hostsMarkdown, type HostsResult } from '../scenarios/hosts';
import { consumersMarkdown, consumersTargets, type ConsumersResult } from '../scenarios/consumers';
import type { LatencyResult } from '../scenarios/latency';
import { describeSpec, type ScaleResult, type ScaleRun } from '../scenarios/scale';
import type { SweepScenarioResult } from '../scenarios/sweep';
import type { ThroughputResult } from '../scenarios/throughput';
import { watchMarkdown, type WatchResult } from '../scenarios/watch';
import { round } from './common';
import { renderChart, type Panel } from './svg';

export interface BenchMeta {
  readonly startedAt: string;
  readonly finishedAt: string;
  readonly durationS: number;
  readonly command: string;
  readonly node: string;
  readonly cpus: number;
  readonly cpuModel: string;
  readonly memGb: number;
  readonly loadAvgStart: readonly number[];
  readonly loadAvgEnd: readonly number[];
  readonly services: string;
  readonly git: string;
  /** `--before`: the earlier commit measured as the kind `before` */
  readonly before?: string;
  readonly quick: boolean;
}

export interface Target {
  readonly id: string;
  readonly target: string;
  readonly measured: string;
  /** measured / limit, oriented so that >= 1 means met (null when not measured) */
  readonly ratio: number | null;
  readonly met: boolean | null;
}

export interface BenchResults {
  readonly meta: BenchMeta;
  readonly throughput: ThroughputResult | null;
  readonly latency: LatencyResult | null;
  readonly sweep: SweepScenarioResult | null;
  readonly dispatch: DispatchResult | null;
  /** scenario 6, fleet scale (absent in results written before it existed) */
  readonly scale?: ScaleResult | null;
  /** scenario 7, horizontal throughput with worker hosts (absent in results written before it existed) */
  readonly hosts?: HostsResult | null;
  /** scenario 8, consumers of one group over a partitioned stream (absent in results written before it existed) */
  readonly consumers?: ConsumersResult | null;
  /** scenario 9, watchers of GET /api/watch on one fleet http (absent in results written before it existed) */
  readonly watch?: WatchResult | null;
  readonly rss: { readonly oursMaxMb: number | null; readonly noopMaxMb: number | null; readonly naiveMaxMb: number | null } | null;
  readonly targets: readonly Target[];
}

export function rssSummary(t: ThroughputResult | null, l: LatencyResult | null): BenchResults['rss'] {
  if (t === null && l === null) return null;
  const max = (values: Array<number | null | undefined>): number | null => {
    const v = values.filter((x): x is number => typeof x === 'number');
    return v.length === 0 ? null : Math.max(...v);
  };
  const of = (kind: string) => (t?.allRuns ?? []).filter((r) => r.kind === kind).map((r) => r.peakRssMb);
  return {
    oursMaxMb: max([...of('ours'), l?.ours.peakRssMb]),
    noopMaxMb: max([...of('noop'), l?.noop.peakRssMb]),
    naiveMaxMb: max(of('naive')),
  };
}

/** CPU ms per event of the named process groups, added up (a group not measured counts 0). */
function sum(cpu: Readonly<Record<string, number>>, keys: readonly string[]): number {
  return keys.reduce((total, k) => total + (cpu[k] ?? 0), 0);
}

export function evaluateTargets(r: Omit<BenchResults, 'targets' | 'meta'>): Target[] {
  const targets: Target[] = [];
  if (r.consumers !== undefined && r.consumers !== null) targets.push(...consumersTargets(r.consumers));
  const t = r.throughput;
  if (t !== null) {
    targets.push({
      id: 'throughput-vs-direct',
      target:
        'end-to-end throughput >= 1.2 x baseline (a) direct pg, one statement per event at its best concurrency (issue 32; issue 18 asked 1.0 x)',
      // (a) at its best variant and concurrency (the one-statement variant usually; the higher bar either way)
      measured: `${round(t.best.ours.eventsPerSec)} vs ${round(t.best.direct.eventsPerSec)} events/s ((a) ${t.best.direct.variant}, c=${t.best.direct.concurrency}) = ${t.ratios.vsDirect} x`,
      ratio: round(t.ratios.vsDirect / 1.2, 2),
      met: t.ratios.vsDirect >= 1.2,
    });
    const directCpu = t.best.direct.cpuMsPerEvent;
    if (directCpu !== undefined) {
      // ours: the worker, PostgreSQL and Redis (the bench's producer and consumer are the load, not the system); (a):
      // PostgreSQL and the process that drives it (the bench), whose client work is (a)'s worker
      const ours = sum(t.best.ours.cpuMsPerEvent, ['worker', 'postgres', 'redis']);
      const direct = sum(directCpu, ['postgres', 'bench']);
      // with external services the bench knows no server pids: PostgreSQL's and Redis's CPU is not measured
      const measuredBoth = 'postgres' in directCpu && 'postgres' in t.best.ours.cpuMsPerEvent && 'redis' in t.best.ours.cpuMsPerEvent;
      targets.push({
        id: 'cpu-vs-direct',
        target: 'CPU per event, worker + PostgreSQL + Redis, <= (a) direct pg (PostgreSQL + its client), each at its best level (issue 32)',
        measured: measuredBoth
          ? `${ours.toFixed(2)} vs ${direct.toFixed(2)} ms/event = ${direct === 0 ? '–' : round(ours / direct, 2)} x`
          : "not measured (the servers are not this run's own: their CPU is unknown)",
        ratio: !measuredBoth || ours === 0 ? null : round(direct / ours, 2),
        met: measuredBoth ? ours <= direct : null,
      });
    }
    const partitioned = t.best.partitioned ?? null;
    if (partitioned !== null) {
      targets.push({
        id: 'relay-partitions',
        target: 'end-to-end throughput with 16 stream partitions >= 1.0 x one stream, same run and concurrency (issue 29)',
        measured: `${round(partitioned.eventsPerSec)} vs ${round(t.best.ours.eventsPerSec)} events/s at c=${partitioned.concurrency} = ${round(partitioned.eventsPerSec / t.best.ours.eventsPerSec, 2)} x`,
        ratio: round(partitioned.eventsPerSec / t.best.ours.eventsPerSec, 2),
        met: partitioned.eventsPerSec >= t.best.ours.eventsPerSec,
      });
    }
    const off = t.best.unbatched ?? null;
    if (off !== null && off !== undefined) {
      const ours = sum(t.best.ours.cpuMsPerEvent, ['worker', 'postgres']);
      const before = sum(off.cpuMsPerEvent, ['worker', 'postgres']);
      targets.push({
        id: 'cpu-per-event',
        target: 'worker + PostgreSQL CPU per event <= 0.6 x one transaction per event (group commit off, same run and concurrency)',
        measured:
          `${ours.toFixed(2)} vs ${before.toFixed(2)} ms/event at c=${t.best.ours.concurrency} = ${round(ours / before, 2)} x ` +
          `(${round(t.best.ours.eventsPerSec)} vs ${round(off.eventsPerSec)} events/s; the issue's figure for before: 1.23 ms on a quieter day)`,
        ratio: round((0.6 * before) / ours, 2),
        met: ours <= 0.6 * before,
      });
    }
    targets.push({
      id: 'throughput-vs-naive',
      target: 'end-to-end throughput >= 2 x baseline (c) naive TypeORM save()',
      measured:
        t.best.naive === null || t.ratios.vsNaive === null
          ? 'not measured'
          : `${round(t.best.ours.eventsPerSec)} vs ${round(t.best.naive.eventsPerSec)} events/s = ${t.ratios.vsNaive} x`,
      ratio: t.ratios.vsNaive === null ? null : round(t.ratios.vsNaive / 2, 2),
      met: t.ratios.vsNaive === null ? null : t.ratios.vsNaive >= 2,
    });
  }
  const l = r.latency;
  if (l !== null) {
    // the worker concurrency is the operator's to set: the best measured one counts, and every one is in the table
    const runs = [{ ...l.ours, concurrency: l.concurrency }, ...l.oursAt];
    const best = runs.reduce((a, b) => (b.latencyMs.p99 < a.latencyMs.p99 ? b : a));
    const capacity = Math.max(
      0,
      ...(r.throughput?.runs ?? []).filter((x) => x.kind === 'ours' && x.concurrency === best.concurrency).map((x) => x.eventsPerSec),
    );
    targets.push({
      id: 'latency-p99',
      target: "p99 enqueue -> stream <= 25 ms and <= 3 x the floor (d)'s p99 at 50% of max throughput (issue 32)",
      measured:
        `p99 ${best.latencyMs.p99} ms at ${l.rate} events/s (p50 ${best.latencyMs.p50} ms), worker concurrency ${best.concurrency}` +
        (capacity > 0 ? ` (which sustains ${round(capacity)} events/s)` : '') +
        (runs.length > 1
          ? `; ${runs
              .filter((x) => x !== best)
              .map((x) => `p99 ${x.latencyMs.p99} ms at concurrency ${x.concurrency}`)
              .join(', ')}`
          : '') +
        (l.floor !== undefined
          ? `. The floor, (d) BullMQ + XADD with no database, same load: p99 ${l.floor.latencyMs.p99} ms (p50 ${l.floor.latencyMs.p50} ms)`
          : ''),
      ratio: round(Math.min(25, 3 * (l.floor?.latencyMs.p99 ?? Infinity)) / best.latencyMs.p99, 2),
      met: best.latencyMs.p99 <= 25 && (l.floor === undefined || best.latencyMs.p99 <= 3 * l.floor.latencyMs.p99),
    });
    targets.push({
      id: 'latency-p50',
      target: 'p50 enqueue -> stream <= 5 ms at 50% of max throughput (issue 32)',
      // the run the p99 target counts (the best concurrency measured), so that both can hold in one run
      measured: `p50 ${best.latencyMs.p50} ms at ${l.rate} events/s, worker concurrency ${best.concurrency}`,
      ratio: round(5 / best.latencyMs.p50, 2),
      met: best.latencyMs.p50 <= 5,
    });
  }
  const low = r.latency?.low;
  if (low !== undefined) {
    const [a, b] = [low.ours.latencyMs.p50, low.unbatched.latencyMs.p50];
    targets.push({
      id: 'latency-low-load',
      target: `p50 at ${low.rate} events/s no worse than with group commit off (same run; 10% or 0.5 ms of noise allowed)`,
      measured: `p50 ${a} ms vs ${b} ms (p99 ${low.ours.latencyMs.p99} vs ${low.unbatched.latencyMs.p99} ms)`,
      ratio: round(Math.max(b * 1.1, b + 0.5) / a, 2),
      met: a <= Math.max(b * 1.1, b + 0.5),
    });
    targets.push({
      id: 'latency-low-load-p50',
      target: `p50 at ${low.rate} events/s <= 6.4 ms (issue 32: the figure before it)`,
      measured: `p50 ${a} ms`,
      ratio: round(6.4 / a, 2),
      met: a <= 6.4,
    });
  }
  const biggest = r.sweep?.sizes.find((s) => s.deployments === 100_000) ?? null;
  if (biggest !== null) {
    targets.push({
      id: 'sweep-nothing-due',
      target: 'sweep tick with 100k deployments and nothing due <= 50 ms',
      measured: `median ${biggest.nothingDue.medianMs} ms, max ${biggest.nothingDue.maxMs} ms (cold tick included), ${biggest.nothingDue.statements} statements`,
      ratio: round(50 / biggest.nothingDue.maxMs, 2),
      met: biggest.nothingDue.maxMs <= 50,
    });
    // the sharded readiness tick (issue 23) promises one UPDATE per shard, and beside it one read of the shard's
    // rows: 2 statements per shard, plus the tick's own reads (issue 32: this replaced "one UPDATE" for the tick)
    const stamped = biggest.work.stamped;
    const shardSize = r.sweep?.shardSize ?? 500;
    const shards = Math.ceil(stamped / shardSize);
    const allowed = 2 * shards + 2;
    targets.push({
      id: 'sweep-statements-per-stamp',
      target: `stamping 25k ready endpoints: one UPDATE per shard of ${shardSize}, at most 2 statements per shard and 2 per tick (${round(allowed / 25_000, 4)} statements per stamped endpoint)`,
      measured: `${stamped} stamped by ${biggest.work.updates} UPDATEs in ${biggest.work.statements} statements (${stamped === 0 ? '–' : round(biggest.work.statements / stamped, 4)} per stamped endpoint; ${shards} shards), tick ${round(biggest.work.durationMs / 1000, 2)} s`,
      ratio: biggest.work.statements === 0 ? null : round(allowed / biggest.work.statements, 2),
      met: stamped === 25_000 && biggest.work.updates === shards && biggest.work.statements <= allowed,
    });
  }
  if (r.scale !== undefined && r.scale !== null) targets.push(...scaleTargets(r.scale));
  if (r.rss !== null && r.rss.oursMaxMb !== null) {
    targets.push({
      id: 'worker-rss',
      target: 'worker peak RSS <= 200 MB',
      measured: `${r.rss.oursMaxMb} MiB (VmHWM, max over every worker run; no-op BullMQ worker ${r.rss.noopMaxMb ?? '?'} MiB)`,
      ratio: round(200 / r.rss.oursMaxMb, 2),
      met: r.rss.oursMaxMb <= 200,
    });
  }
  return targets;
}

const n0 = (v: number | null | undefined): string => (v === null || v === undefined || Number.isNaN(v) ? '–' : String(Math.round(v)));
const n1 = (v: number | null | undefined): string => (v === null || v === undefined || Number.isNaN(v) ? '–' : String(round(v, 1)));

/** `--before`: ours next to the earlier commit's worker, measured in this run (empty without `--before`). */
export function beforeAndAfter(r: BenchResults): string[] {
  const m = r.meta;
  if (m.before === undefined) return [];
  const out = [`### Before and after: ours (${m.git}) and \`before\` (${m.before}), in this run`, ''];
  out.push('| measure | ours | before | ours / before |', '|---|---:|---:|---:|');
  const line = (label: string, a: number | undefined, b: number | undefined) =>
    out.push(`| ${label} | ${a ?? '–'} | ${b ?? '–'} | ${a !== undefined && b !== undefined && b > 0 ? round(a / b, 2) : '–'} |`);
  const t = r.throughput;
  for (const c of [...new Set(t?.runs.map((x) => x.concurrency) ?? [])].sort((a, b) => a - b)) {
    const run = (kind: string) => t?.runs.find((x) => x.kind === kind && x.concurrency === c);
    if (run('before') === undefined) continue;
    line(`throughput c=${c} (events/s)`, round(run('ours')?.eventsPerSec ?? NaN), round(run('before')?.eventsPerSec ?? NaN));
    line(`worker CPU c=${c} (ms/event)`, run('ours')?.cpuMsPerEvent['worker'], run('before')?.cpuMsPerEvent['worker']);
  }
  const l = r.latency;
  for (const [label, ours, before] of [
    [`latency at ${l?.rate ?? '–'}/s`, l?.ours, l?.before],
    [`latency at ${l?.low?.rate ?? '–'}/s`, l?.low?.ours, l?.low?.before],
  ] as const) {
    if (ours === undefined || before === undefined) continue;
    line(`${label}, p50 (ms)`, ours.latencyMs.p50, before.latencyMs.p50);
    line(`${label}, p99 (ms)`, ours.latencyMs.p99, before.latencyMs.p99);
  }
  out.push('');
  return out;
}

export function markdown(r: BenchResults): string {
  const out: string[] = [];
  const m = r.meta;
  out.push(
    `Run ${m.startedAt} (${m.durationS} s${m.quick ? ', --quick' : ''}) on ${m.cpus} x ${m.cpuModel}, ${m.memGb} GB, Node ${m.node}; git ${m.git}.`,
  );
  out.push(`Services: ${m.services}. Load average at start ${m.loadAvgStart.join(' ')}, at end ${m.loadAvgEnd.join(' ')}.`);
  if (Math.max(m.loadAvgStart[0] ?? 0, m.loadAvgEnd[0] ?? 0) > m.cpus * 0.75) {
    out.push('');
    out.push(
      `**The machine was busy with other work during this run** (load average above ${m.cpus * 0.75} on ${m.cpus} CPUs; see the ` +
        '`other` CPU columns): absolute figures are pessimistic, and latency most of all; the ratios to the baselines, measured alongside, are what to read.',
    );
  }
  out.push('');
  out.push(...beforeAndAfter(r));
  const t = r.throughput;
  if (t !== null) {
    out.push('### 1. End-to-end throughput (events/s)');
    out.push('');
    out.push(`Workload: ${t.workload}. Each level ran ${t.rounds} time(s), rounds one after the other; the best run of each counts.`);
    out.push('');
    out.push(
      '| worker concurrency | ours: enqueue -> stream | ours, group commit off | ours, tracing on | ours, 16 stream partitions | (b) BullMQ no-op: -> completed | (c) naive TypeORM save(): -> committed | (a) direct pg, tx/s: 3 writes / 1 statement | ours peak RSS (MiB) |',
    );
    out.push('|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
    const cs = [...new Set([...t.runs.map((x) => x.concurrency), ...t.direct.map((d) => d.concurrency)])].sort((a, b) => a - b);
    const direct = (c: number, variant: string) => t.direct.find((d) => d.concurrency === c && d.variant === variant)?.eventsPerSec;
    for (const c of cs) {
      const run = (kind: string) => t.runs.find((x) => x.kind === kind && x.concurrency === c);
      const fail = (kind: string) => ((run(kind)?.failed ?? 0) > 0 ? ` (${run(kind)?.failed} failed)` : '');
      out.push(
        `| ${c} | ${n0(run('ours')?.eventsPerSec)}${fail('ours')} | ${n0(run('unbatched')?.eventsPerSec)}${fail('unbatched')} | ${n0(run('traced')?.eventsPerSec)}${fail('traced')} | ${n0(run('partitioned')?.eventsPerSec)}${fail('partitioned')} | ${n0(run('noop')?.eventsPerSec)}${fail('noop')} | ${n0(run('naive')?.eventsPerSec)}${fail('naive')} | ` +
          `${n0(direct(c, 'statements'))} / ${n0(direct(c, 'one-statement'))} | ${n1(run('ours')?.peakRssMb)} |`,
      );
    }
    out.push('');
    out.push(
      `Best: ours ${n0(t.best.ours.eventsPerSec)}/s (c=${t.best.ours.concurrency}); (a) ${n0(t.best.direct.eventsPerSec)}/s (${t.best.direct.variant}, c=${t.best.direct.concurrency}) -> **${t.ratios.vsDirect} x**; ` +
        `(b) ${n0(t.best.noop?.eventsPerSec)}/s -> ${t.ratios.vsNoop ?? '–'} x; (c) ${n0(t.best.naive?.eventsPerSec)}/s (c=${t.best.naive?.concurrency ?? '–'}) -> **${t.ratios.vsNaive ?? '–'} x**.`,
    );
    out.push('');
    out.push(
      `Diagnostic: (a) with a NOTIFY inside each transaction (what the service did before these benchmarks) ` +
        `${n0(t.directWithNotify.eventsPerSec)} tx/s at c=${t.directWithNotify.concurrency}: PostgreSQL serializes the commits of notifying transactions.`,
    );
    out.push('');
    out.push('CPU ms per event by process at each best level (where the 2 cores go; `other` = everything else on the machine):');
    out.push('');
    const groups = ['worker', 'postgres', 'redis', 'bench', 'other'];
    out.push(`| run | ${groups.join(' | ')} | total |`);
    out.push(`|---|${groups.map(() => '---:').join('|')}|---:|`);
    const rows: Array<[string, Record<string, number>]> = [[`ours c=${t.best.ours.concurrency}`, t.best.ours.cpuMsPerEvent]];
    if (t.best.unbatched != null) rows.push([`ours, group commit off, c=${t.best.unbatched.concurrency}`, t.best.unbatched.cpuMsPerEvent]);
    if (t.best.traced != null) rows.push([`ours, tracing on, c=${t.best.traced.concurrency}`, t.best.traced.cpuMsPerEvent]);
    if (t.best.naive !== null) rows.push([`(c) naive c=${t.best.naive.concurrency}`, t.best.naive.cpuMsPerEvent]);
    if (t.best.noop !== null) rows.push([`(b) no-op c=${t.best.noop.concurrency}`, t.best.noop.cpuMsPerEvent]);
    rows.push([`(a) direct ${t.best.direct.variant} c=${t.best.direct.concurrency}`, t.best.direct.cpuMsPerEvent]);
    for (const [label, cpu] of rows) {
      const total = groups.filter((g) => g !== 'other').reduce((a, g) => a + (cpu[g] ?? 0), 0);
      out.push(`| ${label} | ${groups.map((g) => (cpu[g] === undefined ? '–' : cpu[g].toFixed(2))).join(' | ')} | ${total.toFixed(2)} |`);
    }
    out.push('');
    const traced = t.best.traced;
    if (traced != null) {
      const worker = (cpu: Record<string, number>) => cpu['worker'] ?? 0;
      const [on, off] = [worker(traced.cpuMsPerEvent), worker(t.best.ours.cpuMsPerEvent)];
      out.push(
        `Tracing's cost (issue 19), at c=${traced.concurrency}: every span made and exported to an in-process exporter that counts and drops them ` +
          `(FLEET_TRACE_BENCH=1, no collector): worker CPU **${on.toFixed(2)} vs ${off.toFixed(2)} ms/event (+${(on - off).toFixed(2)} ms, ` +
          `${off > 0 ? round((on / off - 1) * 100, 0) : '–'}%)**, throughput ${n0(traced.eventsPerSec)} vs ${n0(t.best.ours.eventsPerSec)} events/s ` +
          `(${round(traced.eventsPerSec / t.best.ours.eventsPerSec, 2)} x). Tracing off (\`ours\`) loads no SDK and makes no span.`,
      );
      out.push('');
    }
  }
  const l = r.latency;
  if (l !== null) {
    out.push(`### 2. Latency at ${l.rate} events/s offered (50% of ours' max), concurrency ${l.concurrency}, ${l.seconds} s (ms)`);
    out.push('');
    out.push('| path | p50 | p95 | p99 | max | achieved rate | CPU used by other processes meanwhile |');
    out.push('|---|---:|---:|---:|---:|---:|---:|');
    const row = (label: string, x: LatencyResult['ours']) =>
      `| ${label} | ${x.latencyMs.p50} | ${x.latencyMs.p95} | ${x.latencyMs.p99} | ${x.latencyMs.max} | ${x.achievedPerSec}/s | ` +
      `${x.otherCpuShare === null ? '–' : `${Math.round(x.otherCpuShare * 100)}%`} |`;
    out.push(row(`ours: enqueue -> stream entry read by a consumer (concurrency ${l.concurrency})`, l.ours));
    for (const x of l.oursAt) out.push(row(`ours at concurrency ${x.concurrency}`, x));
    if (l.unbatched !== undefined) out.push(row(`ours, group commit off (FLEET_BATCH_MAX=1), concurrency ${l.concurrency}`, l.unbatched));
    out.push(row('(b) BullMQ no-op: enqueue -> job completed', l.noop));
    if (l.floor !== undefined) out.push(row('(d) the floor, BullMQ + XADD, no database: enqueue -> stream entry read by a consumer', l.floor));
    out.push(row('(a) direct pg: scheduled start -> COMMIT', l.direct));
    out.push('');
    if (l.low !== undefined) {
      out.push(`At low load, ${l.low.rate} events/s for ${l.low.seconds} s (every event alone: group commit must add no wait):`);
      out.push('');
      out.push('| path | p50 | p95 | p99 | max | achieved rate | CPU used by other processes meanwhile |');
      out.push('|---|---:|---:|---:|---:|---:|---:|');
      out.push(row(`ours (concurrency ${l.concurrency})`, l.low.ours));
      out.push(row('ours, group commit off', l.low.unbatched));
      out.push('');
    }
    const st = l.ours.stagesMs;
    if (st !== undefined) {
      out.push(
        "Where the time goes (wall-clock milestones, ms precision: BullMQ's `processedOn` when a worker takes the job, the entry's `at` when the service decides, its stream id at the XADD). The floor (d) and (b) pass through BullMQ's stage the same way, in the same run:",
      );
      out.push('');
      out.push('| stage | ours p50 / p95 / p99 | (d) floor p50 / p95 / p99 | (b) no-op p50 / p95 / p99 |');
      out.push('|---|---:|---:|---:|');
      type P = { p50: number; p95: number; p99: number } | undefined;
      const cell = (p: P) => (p === undefined ? '–' : `${p.p50} / ${p.p95} / ${p.p99}`);
      // jobs are kept after completion up to the producer's count: past it, the earliest lost their processedOn
      const of = (p: { n: number } | undefined) => (p === undefined || p.n === l.ours.latencyMs.n ? '' : ` (${p.n} of ${l.ours.latencyMs.n} jobs)`);
      const fl = l.floor;
      out.push(
        `| scheduled -> picked up by a worker (BullMQ: enqueue, wait, pick-up; whole ms, so under 1 ms reads low) | ${cell(l.ours.pickupMs)}${of(l.ours.pickupMs)} | ${cell(fl?.pickupMs)}${of(fl?.pickupMs)} | ${cell(l.noop.pickupMs)}${of(l.noop.pickupMs)} |`,
      );
      out.push(
        `| picked up -> decided (ours: the coalescer's wait, the snapshot read) | ${cell(st.pickedToDecided)} | ${cell(fl?.stagesMs?.pickedToDecided)} | – |`,
      );
      out.push(`| scheduled -> decided (both above) | ${cell(st.queue)} | ${cell(fl?.stagesMs?.queue)} | – |`);
      out.push(
        `| decided -> appended (write + commit, relay wake-up, read, XADD) | ${cell(st.commitAndRelay)} | ${cell(fl?.stagesMs?.commitAndRelay)} | – |`,
      );
      out.push(`| appended -> read by the consumer | ${cell(st.delivery)} | ${cell(fl?.stagesMs?.delivery)} | – |`);
      out.push('');
    }
  }
  const s = r.sweep;
  if (s !== null) {
    out.push(`### 3. Sweep cost (probe concurrency ${s.probeConcurrency})`);
    out.push('');
    out.push(
      '| deployments | nothing due: tick ms (median / max), statements | baseline: read the table once, ms | quarter ready: probes, tick s, statements, UPDATEs | baseline: same probes without SQL, s | baseline: one UPDATE per stamp, s | 250 ready: tick ms, statements |',
    );
    out.push('|---:|---|---:|---|---:|---:|---|');
    for (const z of s.sizes) {
      out.push(
        `| ${z.deployments} | ${z.nothingDue.medianMs} / ${z.nothingDue.maxMs}, ${z.nothingDue.statements} | ${z.tableScanMs} | ` +
          `${z.work.probed} probes (${z.work.stamped} stamped, ${z.work.orphaned} orphaned, ${z.work.expired} expired), ${round(z.work.durationMs / 1000, 2)} s, ${z.work.statements} statements, ${z.work.updates} UPDATE | ` +
          `${round(z.probeFloorMs / 1000, 2)} | ${round(z.naiveStampMs / 1000, 2)} | ${z.fixedWork.durationMs}, ${z.fixedWork.statements} |`,
      );
    }
    out.push('');
  }
  const d = r.dispatch;
  if (d !== null) {
    out.push(`### 4. Dispatch (${d.deployments} deployments, ${d.lanes} requests in flight)`);
    out.push('');
    out.push('| mode | resolveEndpoint /s | p50 / p99 ms | baseline | baseline /s | ratio |');
    out.push('|---|---:|---|---|---:|---:|');
    const lat = (x: { latencyMs?: { p50: number; p99: number } }) => (x.latencyMs === undefined ? '–' : `${x.latencyMs.p50} / ${x.latencyMs.p99}`);
    out.push(
      `| in-process (pure function) | ${d.inProcess.resolveEndpoint.perSec} | – | the row read it needs (getDeployment) | ${d.inProcess.baselineRowRead.perSec} | ${round(d.inProcess.resolveEndpoint.perSec / d.inProcess.baselineRowRead.perSec)} x |`,
    );
    out.push(
      `| fastify inject: GET /api/deployments/:id/endpoint | ${d.inject.endpoint.perSec} | ${lat(d.inject.endpoint)} | GET /healthz (no database) | ${d.inject.baselineHealthz.perSec} | ${round(d.inject.endpoint.perSec / d.inject.baselineHealthz.perSec, 2)} x |`,
    );
    out.push(
      `| HTTP keep-alive to \`fleet http\` | ${d.http.endpoint.perSec} | ${lat(d.http.endpoint)} | GET /healthz (no database) | ${d.http.baselineHealthz.perSec} | ${round(d.http.endpoint.perSec / d.http.baselineHealthz.perSec, 2)} x |`,
    );
    out.push('');
  }
  if (r.scale !== undefined && r.scale !== null) out.push(...scaleMarkdown(r.scale));
  if (r.hosts !== undefined && r.hosts !== null) out.push(...hostsMarkdown(r.hosts));
  if (r.consumers !== undefined && r.consumers !== null) out.push(...consumersMarkdown(r.consumers));
  if (r.watch !== undefined && r.watch !== null) out.push(...watchMarkdown(r.watch));
  if (r.rss !== null) {
    out.push('### 5. Worker peak RSS (VmHWM)');
    out.push('');
    out.push(
      `ours (\`fleet worker\`: lifecycle worker + relay + sweep) ${r.rss.oursMaxMb ?? '–'} MiB; (b) no-op BullMQ worker ${r.rss.noopMaxMb ?? '–'} MiB; (c) naive TypeORM worker ${r.rss.naiveMaxMb ?? '–'} MiB.`,
    );
    out.push('');
  }
  out.push('### Targets');
  out.push('');
  out.push('| target | measured | margin (>= 1 met) | met |');
  out.push('|---|---|---:|---|');
  for (const x of r.targets) out.push(`| ${x.target} | ${x.measured} | ${x.ratio ?? '–'} | ${x.met === null ? '–' : x.met ? 'yes' : '**no**'} |`);
  out.push('');
  return out.join('\n');
}

export function chart(r: BenchResults): string {
  const panels: Panel[] = [];
  const t = r.throughput;
  if (t !== null) {
    const cs = [...new Set(t.runs.map((x) => x.concurrency))].sort((a, b) => a - b);
    const series = ['ours (-> stream)', '(b) BullMQ no-op', '(c) naive save()', '(a) direct pg'];
    panels.push({
      title: '1. End-to-end throughput by worker concurrency',
      unit: 'events/s',
      series,
      groups: cs.map((c) => ({
        label: `c=${c}`,
        bars: [
          { series: series[0] ?? '', value: t.runs.find((x) => x.kind === 'ours' && x.concurrency === c)?.eventsPerSec ?? null },
          { series: series[1] ?? '', value: t.runs.find((x) => x.kind === 'noop' && x.concurrency === c)?.eventsPerSec ?? null },
          { series: series[2] ?? '', value: t.runs.find((x) => x.kind === 'naive' && x.concurrency === c)?.eventsPerSec ?? null },
          {
            series: series[3] ?? '',
            value: Math.max(0, ...t.direct.filter((x) => x.concurrency === c).map((x) => x.eventsPerSec)) || null,
          },
        ],
      })),
    });
  }
  const l = r.latency;
  if (l !== null) {
    const series = ['ours: enqueue -> stream', '(b) no-op: -> completed', '(a) direct: -> COMMIT'];
    panels.push({
      title: `2. Latency at ${l.rate} events/s (50% of max)`,
      unit: 'ms',
      log: true,
      series,
      lines: [{ value: 25, label: 'target p99 25 ms' }],
      groups: (['p50', 'p95', 'p99', 'max'] as const).map((p) => ({
        label: p,
        bars: [
          { series: series[0] ?? '', value: l.ours.latencyMs[p] },
          { series: series[1] ?? '', value: l.noop.latencyMs[p] },
          { series: series[2] ?? '', value: l.direct.latencyMs[p] },
        ],
      })),
    });
  }
  const s = r.sweep;
  if (s !== null) {
    const series = ['nothing due (median)', 'read table once', '250 ready', 'quarter ready', 'probes alone', 'UPDATE per stamp'];
    panels.push({
      title: '3. Sweep tick by table size',
      unit: 'ms',
      log: true,
      series,
      lines: [{ value: 50, label: 'target 50 ms (nothing due, 100k)' }],
      groups: s.sizes.map((z) => ({
        label: `${z.deployments / 1000}k deployments`,
        bars: [
          { series: series[0] ?? '', value: z.nothingDue.medianMs },
          { series: series[1] ?? '', value: z.tableScanMs },
          { series: series[2] ?? '', value: z.fixedWork.durationMs },
          { series: series[3] ?? '', value: z.work.durationMs },
          { series: series[4] ?? '', value: z.probeFloorMs },
          { series: series[5] ?? '', value: z.naiveStampMs },
        ],
      })),
    });
  }
  const d = r.dispatch;
  if (d !== null) {
    const series = ['resolveEndpoint', 'baseline'];
    panels.push({
      title: '4. Dispatch answers per second',
      unit: 'per second',
      log: true,
      series,
      groups: [
        {
          label: 'in-process vs row read',
          bars: [
            { series: 'resolveEndpoint', value: d.inProcess.resolveEndpoint.perSec },
            { series: 'baseline', value: d.inProcess.baselineRowRead.perSec },
          ],
        },
        {
          label: 'inject vs /healthz',
          bars: [
            { series: 'resolveEndpoint', value: d.inject.endpoint.perSec },
            { series: 'baseline', value: d.inject.baselineHealthz.perSec },
          ],
        },
        {
          label: 'HTTP vs /healthz',
          bars: [
            { series: 'resolveEndpoint', value: d.http.endpoint.perSec },
            { series: 'baseline', value: d.http.baselineHealthz.perSec },
          ],
        },
      ],
    });
  }
  const met = r.targets.filter((x) => x.met === true).length;
  return renderChart(
    'lifecycle-fleet benchmarks',
    `${r.meta.startedAt} · ${r.meta.cpus} CPUs · Node ${r.meta.node} · targets met ${met}/${r.targets.length}`,
    panels,
  );
}

/** Stamped per tick from 1 to 2 worker processes, per size measured with both (matrix runs). */
export function scaleStampRatios(s: ScaleResult): Array<{ endpoints: number; one: ScaleRun; two: ScaleRun; ratio: number }> {
  const matrix = s.runs.filter((x) => x.spec.kind === 'matrix');
  const sizes = [...new Set(matrix.map((x) => x.spec.endpoints))].sort((a, b) => a - b);
  return sizes.flatMap((endpoints) => {
    const one = matrix.find((x) => x.spec.endpoints === endpoints && x.spec.workers === 1);
    const two = matrix.find((x) => x.spec.endpoints === endpoints && x.spec.workers === 2);
    if (one === undefined || two === undefined) return [];
    return [{ endpoints, one, two, ratio: round(two.stampedPerTick / Math.max(1, one.stampedPerTick), 2) }];
  });
}

function scaleTargets(s: ScaleResult): Target[] {
  const targets: Target[] = [];
  const ratios = scaleStampRatios(s);
  // the largest size measured with 1 and 2 processes: where one process's capacity falls shortest of demand
  const biggest = ratios[ratios.length - 1];
  if (biggest !== undefined) {
    targets.push({
      id: 'scale-stamped-1-to-2',
      target: 'stamped per tick grows >= 1.7 x from 1 to 2 worker processes (same per-process probe concurrency)',
      measured:
        `${biggest.endpoints} endpoints: ${biggest.one.stampedPerTick} -> ${biggest.two.stampedPerTick} per tick = ${biggest.ratio} x` +
        (ratios.length > 1
          ? `; ${ratios
              .slice(0, -1)
              .map((x) => `${x.endpoints}: ${x.ratio} x`)
              .join(', ')}`
          : '') +
        ` (tick ${biggest.one.spec.tickS} s)`,
      ratio: round(biggest.ratio / 1.7, 2),
      met: biggest.ratio >= 1.7,
    });
  }
  const def = s.runs.find((x) => x.spec.kind === 'default-window');
  if (def !== undefined) {
    targets.push({
      id: 'scale-default-window-fresh',
      target: `${def.spec.endpoints} ready endpoints at 30 ms, tick ${def.spec.tickS} s / window ${def.spec.windowS} s, ${def.spec.workers} worker processes: 100% fresh after one window`,
      measured: `${def.freshAfterWindow.fresh} of ${def.spec.endpoints} fresh = ${round(def.freshAfterWindow.fraction * 100, 2)}% (ever stamped ${def.everStamped}; ${def.jobShape} jobs)`,
      ratio: round(def.freshAfterWindow.fraction, 4),
      met: def.freshAfterWindow.fresh === def.spec.endpoints,
    });
  }
  const to = s.runs.find((x) => x.spec.kind === 'timeouts');
  if (to !== undefined) {
    targets.push({
      id: 'scale-timeouts-answering-fresh',
      target: `${to.spec.endpoints} endpoints, ${round(to.spec.silentFraction * 100)}% timing out, ${to.spec.workers} worker processes: every answering endpoint fresh after one window`,
      measured: `${to.freshAfterWindow.freshAnswering} of ${to.answering} answering endpoints fresh = ${round(to.freshAfterWindow.fractionAnswering * 100, 2)}% (tick ${to.spec.tickS} s / window ${to.spec.windowS} s)`,
      ratio: round(to.freshAfterWindow.fractionAnswering, 4),
      met: to.freshAfterWindow.freshAnswering === to.answering,
    });
  }
  const h = s.heartbeats;
  if (h !== null) {
    targets.push({
      id: 'scale-heartbeat-commits',
      target: '<= 0.01 PostgreSQL commits per heartbeat',
      measured: `${h.fleet.commitsPerHeartbeat} (${h.fleet.commitsWindow} commits over ${h.fleet.windowS} s with ${h.heartbeats} heartbeats, ${h.fleet.commitsIdle} idle over as long)`,
      ratio: h.fleet.commitsPerHeartbeat === 0 ? null : round(0.01 / h.fleet.commitsPerHeartbeat, 3),
      met: h.fleet.commitsPerHeartbeat <= 0.01,
    });
    targets.push({
      id: 'scale-heartbeat-rate',
      target: 'heartbeat drain rate >= 0.7 x the BullMQ no-op job rate (same concurrency)',
      measured: `${h.fleet.jobsPerSec} vs ${h.noop.jobsPerSec} jobs/s = ${h.ratio} x (concurrency ${h.concurrency})`,
      ratio: round(h.ratio / 0.7, 2),
      met: h.ratio >= 0.7,
    });
  }
  return targets;
}

const list = (values: ReadonlyArray<number | null>): string =>
  values.every((v) => v === null) ? '–' : values.map((v) => (v === null ? '–' : String(v))).join(' / ');
const pct = (f: number): string => `${round(f * 100, 1)}%`;

function scaleRunTable(runs: readonly ScaleRun[], withRatio: boolean): string[] {
  const out: string[] = [];
  out.push(
    '| endpoints | worker processes | readiness set / tick (jobs) | probed / tick (jobs) | probes seen / tick (fixture; distinct if fewer) | stamped / tick (jobs) | stamped / tick (PostgreSQL, before the next tick) |' +
      (withRatio ? ' x vs 1 process |' : '') +
      ' left unprobed / tick (jobs) | probes/s | fresh after window÷tick ticks | of answering | ever stamped | duplicate probes | jobs |',
  );
  out.push(`|---:|---:|---|---|---|---|---|${withRatio ? '---:|' : ''}---|---:|---:|---:|---:|---:|---|`);
  for (const r of runs) {
    const one = runs.find((x) => x.spec.endpoints === r.spec.endpoints && x.spec.workers === 1);
    const ratio = one === undefined ? '–' : `${round(r.stampedPerTick / Math.max(1, one.stampedPerTick), 2)} x`;
    const shape =
      r.jobShape === 'probe'
        ? `${r.probeJobs} probe (shards), ${r.sweepJobs} sweep`
        : r.jobShape === 'sweep-only'
          ? `${r.sweepJobs} sweep (no probe jobs)`
          : 'none found';
    out.push(
      `| ${r.spec.endpoints} | ${r.spec.workers} | ${list(r.ticks.map((t) => t.readinessSet))} | ${list(r.ticks.map((t) => t.probedJobs))} | ` +
        `${r.ticks.map((t) => (t.distinctProbed < t.probesSeen ? `${t.probesSeen} (${t.distinctProbed})` : String(t.probesSeen))).join(' / ')} | ` +
        `${list(r.ticks.map((t) => t.stampedJobs))} | ${list(r.ticks.map((t) => t.stampedPg))} (mean ${r.stampedPerTick}) |` +
        (withRatio ? ` ${ratio} |` : '') +
        ` ${list(r.ticks.map((t) => t.unprobedJobs))} | ${r.probesPerSec} | ${pct(r.freshAfterWindow.fraction)} (${r.freshAfterWindow.fresh}) | ` +
        `${pct(r.freshAfterWindow.fractionAnswering)} (${r.freshAfterWindow.freshAnswering} of ${r.answering}) | ${r.everStamped} | ${r.duplicateProbes} | ${shape}${r.failedMaintenanceJobs > 0 ? `, ${r.failedMaintenanceJobs} failed` : ''} |`,
    );
  }
  return out;
}

function scaleMarkdown(s: ScaleResult): string[] {
  const out: string[] = [];
  const conc = s.probeConcurrency === null ? "the fleet's default" : String(s.probeConcurrency);
  out.push('### 6. Fleet scale: readiness and heartbeats');
  out.push('');
  out.push(
    `Endpoints on loopback answer \`/ready\` after ${s.delayMs} ms (${s.endpointProcesses} fixture process(es)); probe timeout ${s.probeTimeoutMs} ms; FLEET_PROBE_CONCURRENCY ${conc} per process. ` +
      "Per tick (values per tick, first to last, sampled 250 ms before the next tick): the readiness set, probed and left unprobed from the `maintenance` queue's completed jobs " +
      "(`probe` shards summed, or today's `sweep` job); probes seen by the endpoints (and how many distinct endpoints); stamped, from the jobs and from PostgreSQL (rows with last_ready_at since the tick began, read 250 ms before the next tick: a tick that overruns stamps after the read). " +
      'Fresh: last_ready_at >= now() - window at the last sample; "of answering" leaves out endpoints that never answer.',
  );
  out.push('');
  const matrix = s.runs.filter((x) => x.spec.kind === 'matrix');
  const groups = new Map<string, ScaleRun[]>();
  for (const r of matrix) {
    const key = `${r.spec.tickS}/${r.spec.windowS}/${r.spec.silentFraction}`;
    groups.set(key, [...(groups.get(key) ?? []), r]);
  }
  for (const runs of groups.values()) {
    const sp = runs[0]?.spec;
    if (sp === undefined) continue;
    out.push(
      `#### Readiness matrix: tick ${sp.tickS} s, window ${sp.windowS} s (window÷tick = ${Math.round(sp.windowS / sp.tickS)} ticks)${sp.silentFraction > 0 ? `, ${pct(sp.silentFraction)} of endpoints never answer` : ''}`,
    );
    out.push('');
    out.push(...scaleRunTable(runs, true));
    out.push('');
  }
  const ratios = scaleStampRatios(s);
  if (ratios.length > 0) {
    out.push('#### Must show 1: stamped per tick, 1 -> 2 worker processes (same per-process probe concurrency; target >= 1.7 x)');
    out.push('');
    out.push('| endpoints | tick / window s | 1 process: stamped / tick | 2 processes: stamped / tick | ratio |');
    out.push('|---:|---|---:|---:|---:|');
    for (const x of ratios)
      out.push(`| ${x.endpoints} | ${x.one.spec.tickS} / ${x.one.spec.windowS} | ${x.one.stampedPerTick} | ${x.two.stampedPerTick} | ${x.ratio} x |`);
    out.push('');
  }
  const def = s.runs.find((x) => x.spec.kind === 'default-window');
  if (def !== undefined) {
    out.push(`#### Must show 2: ${describeSpec(def.spec)} (target 100% fresh after one window)`);
    out.push('');
    out.push(...scaleRunTable([def], false));
    out.push('');
  }
  const to = s.runs.find((x) => x.spec.kind === 'timeouts');
  if (to !== undefined) {
    out.push(`#### Must show 3: ${describeSpec(to.spec)} (target: every answering endpoint fresh after one window)`);
    out.push('');
    out.push(...scaleRunTable([to], false));
    out.push('');
  }
  if (s.runs.length > 0) {
    out.push('Where the CPU went during each run (cores busy, of 2), and the endpoint fixture:');
    out.push('');
    out.push(
      '| run | workers | postgres | redis | endpoint fixture | other | fixture: CPU of its core, max event-loop delay ms, late answers, max in flight | worker peak RSS MiB |',
    );
    out.push('|---|---:|---:|---:|---:|---:|---|---|');
    for (const r of s.runs) {
      const c = r.cpuCores;
      out.push(
        `| ${r.spec.kind === 'matrix' ? '' : `${r.spec.kind}: `}${describeSpec(r.spec)} | ${c['workers'] ?? '–'} | ${c['postgres'] ?? '–'} | ${c['redis'] ?? '–'} | ${c['fixture'] ?? '–'} | ${c['other'] ?? '–'} | ` +
          `${pct(r.fixture.cpuShare)}, ${r.fixture.loopDelayMaxMs}, ${r.fixture.lateAnswers}, ${r.fixture.maxInFlight}${r.fixture.saturated ? ' **saturated**' : ''} | ${r.workerPeakRssMb.map((x) => x ?? '–').join(' / ')} |`,
      );
    }
    out.push('');
  }
  const h = s.heartbeats;
  if (h !== null) {
    out.push(
      `#### Heartbeats: ${h.heartbeats} \`attempt.heartbeat\` jobs drained by one worker process, concurrency ${h.concurrency} (tick ${h.tickS} s)`,
    );
    out.push('');
    out.push(
      '| path | jobs/s | drain s | failed | PostgreSQL commits: window / idle baseline (same length) | commits per heartbeat | attempts stamped in PostgreSQL |',
    );
    out.push('|---|---:|---:|---:|---|---:|---:|');
    out.push(
      `| \`fleet worker\`: attempt.heartbeat | ${h.fleet.jobsPerSec} | ${h.fleet.drainS} | ${h.fleet.failed} | ${h.fleet.commitsWindow} / ${h.fleet.commitsIdle} over ${h.fleet.windowS} s | ` +
        `**${h.fleet.commitsPerHeartbeat}** | ${h.fleet.stampedInPg} of ${h.heartbeats} |`,
    );
    out.push(`| BullMQ no-op worker, same jobs | ${h.noop.jobsPerSec} | ${h.noop.drainS} | ${h.noop.failed} | – | – | – |`);
    out.push('');
    out.push(`Ratio heartbeat / no-op: **${h.ratio} x** (target >= 0.7); commits per heartbeat target <= 0.01.`);
    out.push('');
  }
  for (const n of s.notes) out.push(`- ${n}`);
  if (s.notes.length > 0) out.push('');
  return out;
}
