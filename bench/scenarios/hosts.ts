/**
 * Scenario 7 (issue 17 part 5): horizontal throughput with worker "hosts". One network namespace per host
 * (dev/netns.ts, lab `bh`, 10.213.90.0/24): PostgreSQL and Redis run on host `svc`, and each of w1..wN runs one real
 * `fleet worker` process (lifecycle worker, outbox relay, sweep, as deployed), reaching them over the lab's bridge.
 * The bench (producer SDK and the stream reader) runs in the root namespace, on the lab's gateway address.
 *
 * Per run (N hosts, a fresh database and a prefix of its own): seed `warmup x N + events` ready deployments, start
 * the N workers, run the warm-up batch to the stream, then enqueue `events` teardowns (the throughput scenario's
 * workload, 64 SDK calls in flight) and time first enqueue -> last of them on the transition stream. CPU from /proc
 * over that window: each worker process, PostgreSQL (postmaster and every backend, reaped ones included), Redis, the
 * bench process and everything else on the machine (`other`).
 *
 * All of this shares one machine's cores: a "host" is a network namespace, not a CPU. What N hosts buy here is what
 * spreading the worker's share over more processes buys when the cores are shared with the servers; where the total
 * nears the core count, the machine is the limit, not the fleet.
 */
import * as os from 'node:os';
import * as path from 'node:path';
import { netnsUnavailable, NetnsLab } from '../../dev/netns';
import { LifecycleProducer } from '../../src/queues/producer';
import { transitionStreamKey } from '../../src/streams/outbox-relay';
import { MeasuredProcess } from '../lib/child';
import { inLanes, log, now, repoRoot, round, sleep, within } from '../lib/common';
import { cpuNow } from '../lib/cpu';
import { startBenchServices, type BenchServices } from '../lib/services';
import { StreamWatcher } from '../lib/stream';
import { seedReadyDeployments, TEARDOWN } from '../lib/workload';

const LAB = 'bh';
const SUBNET = 90;

export interface HostsOptions {
  /** worker hosts of each run, e.g. [1, 2, 4] */
  readonly sizes: readonly number[];
  /** measured events per run (the same for every size) */
  readonly events: number;
  /** warm-up events per worker host (run to the stream before the measured batch) */
  readonly warmupPerHost: number;
  /** FLEET_CONCURRENCY of every worker process */
  readonly concurrency: number;
  /** every size runs this many times, rounds one after the other; the best run of each size counts */
  readonly rounds: number;
  readonly cpuProfDir?: string;
}

export interface HostsRun {
  readonly hosts: number;
  readonly round: number;
  readonly concurrency: number;
  readonly events: number;
  /** first enqueue -> last measured entry on the stream */
  readonly seconds: number;
  /** first enqueue -> last enqueue acknowledged (the producer's side of the window) */
  readonly enqueueSeconds: number;
  readonly eventsPerSec: number;
  readonly failed: number;
  /** peak RSS of each worker process (MiB) */
  readonly workerPeakRssMb: ReadonlyArray<number | null>;
  /** CPU ms per event by process: w1..wN, postgres, redis, bench, other */
  readonly cpuMsPerEvent: Readonly<Record<string, number>>;
  /** cores busy over the window by process (CPU ms / wall ms): w1..wN, postgres, redis, bench, other */
  readonly cpuCores: Readonly<Record<string, number>>;
  /**
   * cores busy outside the measured processes during 3 s just before the measured batch (workers warmed up and
   * idle): other work on the machine, which `other` in the window also contains
   */
  readonly backgroundCores: number | null;
}

export interface HostsResult {
  /** why the scenario did not run (network namespaces unavailable), or null */
  readonly skipped: string | null;
  readonly cpus: number;
  readonly workload: string;
  readonly services: string;
  readonly options: HostsOptions;
  readonly allRuns: readonly HostsRun[];
  /** the best run of each size, in size order */
  readonly runs: readonly HostsRun[];
  readonly notes: readonly string[];
}

const WORKLOAD =
  "deployment.teardown of ready deployments, one event per deployment (the throughput scenario's workload: one applied " +
  'transition each), enqueued through the SDK from the root namespace (64 in flight)';

export async function runHosts(options: HostsOptions): Promise<HostsResult> {
  const base = { cpus: os.cpus().length, workload: WORKLOAD, options };
  const why = netnsUnavailable();
  if (why !== null) {
    process.stdout.write(`hosts: SKIPPED: ${why}\n`);
    return { ...base, skipped: why, services: '–', allRuns: [], runs: [], notes: [] };
  }
  const maxHosts = Math.max(...options.sizes);
  const workerHosts = Array.from({ length: maxHosts }, (_, i) => `w${i + 1}`);
  const lab = NetnsLab.create(LAB, ['svc', ...workerHosts], SUBNET);
  const allRuns: HostsRun[] = [];
  let description = '';
  try {
    let services: BenchServices | null = null;
    try {
      const svc = lab.host('svc');
      services = await startBenchServices({
        host: { netns: svc.netns, address: svc.address, clients: `10.213.${SUBNET}.0/24` },
        dir: path.join(repoRoot(), '.fleet', 'bench-hosts'),
      });
      description = services.description;
      for (let r = 1; r <= options.rounds; r++) {
        for (const n of options.sizes) {
          const run = await runLevel(lab, services, n, r, options);
          const cores = Object.entries(run.cpuCores)
            .map(([k, v]) => `${k} ${v}`)
            .join(', ');
          log(
            `hosts round ${r} ${n} host(s) c=${options.concurrency}: ${round(run.eventsPerSec)} events/s (${run.events} in ${round(run.seconds, 2)} s, ` +
              `enqueued in ${round(run.enqueueSeconds, 2)} s, failed ${run.failed}; cores: ${cores}; other work before the batch ${run.backgroundCores ?? '?'} cores)`,
          );
          allRuns.push(run);
        }
      }
    } finally {
      await services?.stop();
    }
  } finally {
    await lab.destroy();
  }
  const runs: HostsRun[] = [];
  for (const n of options.sizes) {
    const best = allRuns.filter((x) => x.hosts === n && x.failed === 0).sort((a, b) => b.eventsPerSec - a.eventsPerSec)[0];
    if (best !== undefined && !runs.some((x) => x.hosts === n)) runs.push(best);
  }
  return { ...base, skipped: null, services: description, allRuns, runs, notes: notesOf(runs, base.cpus) };
}

async function runLevel(lab: NetnsLab, services: BenchServices, n: number, r: number, options: HostsOptions): Promise<HostsRun> {
  const label = `hosts${n}_r${r}`;
  const dbUrl = await services.createDatabase(label);
  const prefix = services.prefix(`hosts${n}-r${r}`);
  const warmup = options.warmupPerHost * n;
  const ids = await seedReadyDeployments(dbUrl, warmup + options.events);
  const env = {
    REDIS_URL: services.redisUrl,
    DATABASE_URL: dbUrl,
    FLEET_PREFIX: prefix,
    FLEET_CONCURRENCY: String(options.concurrency),
    LOG_LEVEL: 'info',
  };
  const started = await Promise.allSettled(
    Array.from({ length: n }, (_, i) =>
      MeasuredProcess.start({
        label: `${prefix}-w${i + 1}`,
        args: ['bin/fleet.js', 'worker'],
        env,
        ready: { kind: 'log', pattern: /worker started/ },
        timeoutMs: 60_000,
        spawn: (command, args, spawnOptions) => lab.spawn(`w${i + 1}`, command, args, spawnOptions),
        ...(options.cpuProfDir !== undefined ? { cpuProfDir: options.cpuProfDir } : {}),
      }),
    ),
  );
  const workers = started.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : []));
  const producer = new LifecycleProducer({ connection: services.redisUrl, prefix });
  const watcher = new StreamWatcher(services.redisUrl, [transitionStreamKey(prefix)]);
  let stopped = false;
  const stopAll = async (): Promise<{ peaks: Array<number | null>; failed: number }> => {
    stopped = true;
    const peaks = await Promise.all(workers.map((w) => w.stop()));
    const counts = await producer.queue.getJobCounts('failed').catch((): Record<string, number> => ({}));
    await producer.close();
    await watcher.close();
    return { peaks, failed: counts['failed'] ?? 0 };
  };
  try {
    const failedStart = started.find((s): s is PromiseRejectedResult => s.status === 'rejected');
    if (failedStart !== undefined) throw failedStart.reason;
    watcher.start();
    const enqueue = async (batch: readonly string[]): Promise<void> => {
      await inLanes(batch.length, 64, async (i) => {
        const deploymentId = batch[i];
        if (deploymentId === undefined) return;
        const result = await producer.enqueue(TEARDOWN, { deploymentId });
        watcher.expect(result.eventId);
      });
    };
    await enqueue(ids.slice(0, warmup));
    await within(watcher.waitFor(warmup), 120_000, `${warmup} warm-up events on the stream (${n} hosts)`);

    const groups: Record<string, { pid: number; tree: boolean } | undefined> = {};
    workers.forEach((w, i) => (groups[`w${i + 1}`] = { pid: w.pid, tree: false }));
    if (services.pids.postgres !== undefined) groups['postgres'] = { pid: services.pids.postgres, tree: true };
    if (services.pids.redis !== undefined) groups['redis'] = { pid: services.pids.redis, tree: false };
    groups['bench'] = { pid: process.pid, tree: false };
    const idleFrom = cpuNow(groups);
    const idleT0 = now();
    await sleep(3000);
    const idle = cpuSplit(idleFrom, cpuNow(groups), 1, now() - idleT0);
    const backgroundCores = idle.cpuCores['other'] ?? null;
    const cpuBefore = cpuNow(groups);
    const t0 = now();
    await enqueue(ids.slice(warmup));
    const enqueuedAt = now();
    await within(watcher.waitFor(ids.length), 300_000, `${options.events} events on the stream (${n} hosts)`);
    const doneAt = watcher.lastArrivalAt;
    const cpuAfter = cpuNow(groups);
    const seconds = (doneAt - t0) / 1000;
    const { cpuMsPerEvent, cpuCores } = cpuSplit(cpuBefore, cpuAfter, options.events, doneAt - t0);
    const { peaks, failed } = await stopAll();
    return {
      hosts: n,
      round: r,
      concurrency: options.concurrency,
      events: options.events,
      seconds,
      enqueueSeconds: (enqueuedAt - t0) / 1000,
      eventsPerSec: options.events / seconds,
      failed,
      workerPeakRssMb: peaks,
      cpuMsPerEvent,
      cpuCores,
      backgroundCores,
    };
  } finally {
    if (!stopped) await stopAll().catch(() => undefined);
  }
}

/** CPU ms per event and cores busy by group between two `cpuNow` readings, plus `other` (the rest of the machine). */
function cpuSplit(
  before: Record<string, number>,
  after: Record<string, number>,
  events: number,
  wallMs: number,
): { cpuMsPerEvent: Record<string, number>; cpuCores: Record<string, number> } {
  const used: Record<string, number> = {};
  let ours = 0;
  for (const [name, value] of Object.entries(after)) {
    const start = before[name];
    if (start === undefined || name === '_machine') continue;
    used[name] = value - start;
    ours += value - start;
  }
  const m0 = before['_machine'];
  const m1 = after['_machine'];
  if (m0 !== undefined && m1 !== undefined) used['other'] = Math.max(0, m1 - m0 - ours);
  const cpuMsPerEvent: Record<string, number> = {};
  const cpuCores: Record<string, number> = {};
  for (const [name, ms] of Object.entries(used)) {
    cpuMsPerEvent[name] = round(ms / events, 3);
    cpuCores[name] = round(ms / wallMs, 2);
  }
  return { cpuMsPerEvent, cpuCores };
}

const workerKeys = (run: HostsRun): string[] => Array.from({ length: run.hosts }, (_, i) => `w${i + 1}`);
const sumOf = (values: Readonly<Record<string, number>>, keys: readonly string[]): number => keys.reduce((a, k) => a + (values[k] ?? 0), 0);
const total = (values: Readonly<Record<string, number>>): number => Object.values(values).reduce((a, b) => a + b, 0);

function notesOf(runs: readonly HostsRun[], cpus: number): string[] {
  const notes: string[] = [];
  const one = runs.find((x) => x.hosts === 1);
  for (const run of runs) {
    const busy = total(run.cpuCores);
    const speedup = one === undefined ? null : round(run.eventsPerSec / one.eventsPerSec, 2);
    notes.push(
      `${run.hosts} host(s): ${round(run.eventsPerSec)} events/s${speedup !== null && run.hosts !== 1 ? ` (${speedup} x 1 host)` : ''}; ` +
        `${round(busy, 2)} of ${cpus} cores busy (workers ${round(sumOf(run.cpuCores, workerKeys(run)), 2)}, postgres ${run.cpuCores['postgres'] ?? '–'}, redis ${run.cpuCores['redis'] ?? '–'})` +
        `${busy >= cpus * 0.9 ? ": the machine's cores are the limit" : ''}`,
    );
  }
  return notes;
}

/** The scenario's section of the results markdown. */
export function hostsMarkdown(h: HostsResult): string[] {
  const out: string[] = [];
  out.push('### 7. Horizontal throughput: worker hosts (issue 17)');
  out.push('');
  if (h.skipped !== null) {
    out.push(`Skipped: ${h.skipped}.`);
    out.push('');
    return out;
  }
  out.push(
    `Each worker host is a network namespace of its own running one \`fleet worker\` (FLEET_CONCURRENCY ${h.options.concurrency}); PostgreSQL and Redis run on host \`svc\` ` +
      `(${h.services}); the producer and the stream reader run in the root namespace. Workload: ${h.workload}; ${h.options.events} measured events per run after ` +
      `${h.options.warmupPerHost} warm-up events per host, a fresh database per run. **Every host shares this machine's ${h.cpus} cores.**` +
      (h.options.rounds > 1 ? ` Each size ran ${h.options.rounds} times; the best run counts.` : ''),
  );
  out.push('');
  out.push(
    '| worker hosts | events/s (enqueue -> stream) | x vs 1 host | s | enqueue s | failed | CPU ms/event: workers (each) | postgres | redis | bench | other | total |',
  );
  out.push('|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|');
  const one = h.runs.find((x) => x.hosts === 1);
  for (const run of h.runs) {
    const keys = workerKeys(run);
    const c = run.cpuMsPerEvent;
    const each = keys.map((k) => c[k] ?? '–').join(' + ');
    out.push(
      `| ${run.hosts} | ${round(run.eventsPerSec)} | ${one === undefined ? '–' : `${round(run.eventsPerSec / one.eventsPerSec, 2)} x`} | ${round(run.seconds, 1)} | ${round(run.enqueueSeconds, 1)} | ${run.failed} | ` +
        `${round(sumOf(c, keys), 2)}${run.hosts > 1 ? ` (${each})` : ''} | ${c['postgres'] ?? '–'} | ${c['redis'] ?? '–'} | ${c['bench'] ?? '–'} | ${c['other'] ?? '–'} | ${round(total(c), 2)} |`,
    );
  }
  out.push('');
  out.push(`Cores busy over each measured window (CPU seconds / wall seconds; the machine has ${h.cpus}):`);
  out.push('');
  out.push(
    '| worker hosts | workers (each) | postgres | redis | bench | other | total | other work just before (idle fleet, 3 s) | worker peak RSS MiB |',
  );
  out.push('|---:|---|---:|---:|---:|---:|---:|---:|---|');
  for (const run of h.runs) {
    const keys = workerKeys(run);
    const c = run.cpuCores;
    out.push(
      `| ${run.hosts} | ${round(sumOf(c, keys), 2)}${run.hosts > 1 ? ` (${keys.map((k) => c[k] ?? '–').join(' + ')})` : ''} | ${c['postgres'] ?? '–'} | ${c['redis'] ?? '–'} | ` +
        `${c['bench'] ?? '–'} | ${c['other'] ?? '–'} | ${round(total(c), 2)} | ${run.backgroundCores ?? '–'} | ${run.workerPeakRssMb.map((x) => x ?? '–').join(' / ')} |`,
    );
  }
  out.push('');
  if (h.allRuns.length > h.runs.length) {
    const sizes = [...new Set(h.allRuns.map((x) => x.hosts))];
    out.push(
      'Every run, in the order run (events/s, and cores busy outside the measured processes during its window): ' +
        sizes
          .map(
            (n) =>
              `${n} host(s): ${h.allRuns
                .filter((x) => x.hosts === n)
                .map((x) => `${round(x.eventsPerSec)} (${x.cpuCores['other'] ?? '?'})`)
                .join(', ')}`,
          )
          .join('; ') +
        '.',
    );
    out.push('');
  }
  for (const n of h.notes) out.push(`- ${n}`);
  if (h.notes.length > 0) out.push('');
  return out;
}
