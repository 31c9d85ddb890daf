/**
 * Scenario 2: latency enqueue -> stream entry at a fixed offered load (open loop: events are enqueued on a
 * schedule whatever the system does, and each latency is measured from the event's scheduled time, so a stall
 * counts against the system). Baselines at the same offered load on the same services: BullMQ no-op jobs
 * (enqueue -> job completed) and baseline (a)'s transaction driven directly with pg (scheduled start -> COMMIT).
 */
import * as os from 'node:os';
import type { EnqueueResult } from '../../src/queues/producer';
import { cpuNow, cpuPerEvent } from '../lib/cpu';
import { log, now, percentiles, round, type Percentiles } from '../lib/common';
import type { BenchServices } from '../lib/services';
import { cpuGroups, WorkerUnderTest, type WorkerKind } from '../lib/workers';
import { paced, runDirectPaced, seedReadyDeployments, withClient } from '../lib/workload';

export interface LatencyOptions {
  /** offered events per second */
  readonly rate: number;
  readonly concurrency: number;
  /** ours is measured again at each of these worker concurrencies (same rate): fewer jobs in flight, shorter tail */
  readonly alsoConcurrencies?: readonly number[];
  readonly seconds: number;
  readonly warmup: number;
  /** the measured worker processes write V8 CPU profiles here */
  readonly cpuProfDir?: string;
  /** low load: ours and ours with group commit off at this rate (default 10 events/s) for `lowSeconds` (default 30) */
  readonly lowRate?: number;
  readonly lowSeconds?: number;
  /** also measure `before` (an earlier commit's build, `--before DIR`) at both rates, next to ours */
  readonly beforeRoot?: string;
}

export interface LatencyRun {
  readonly offeredPerSec: number;
  /** CPU ms per measured event by process group */
  readonly cpuMsPerEvent?: Record<string, number>;
  /** events actually enqueued per second (the schedule as kept) */
  readonly achievedPerSec: number;
  readonly latencyMs: Percentiles;
  readonly peakRssMb: number | null;
  /** share of the machine's CPU (all cores) used by other processes during the run: the noise */
  readonly otherCpuShare: number | null;
  /**
   * ours only: where the time goes, from wall-clock milestones with ms precision (the entry's `at`, set when the
   * service decides, and its stream id, set by XADD): scheduled -> decided (enqueue, queue wait, pick-up,
   * snapshot read), decided -> appended (the write and its commit, the relay's wake-up, read and XADD),
   * appended -> read by the consumer.
   */
  readonly stagesMs?: {
    readonly queue: Percentiles;
    readonly commitAndRelay: Percentiles;
    readonly delivery: Percentiles;
    /** picked up by a worker (BullMQ's `processedOn`) -> decided (ours: the coalescer's wait, the snapshot read) */
    readonly pickedToDecided?: Percentiles;
  };
  /**
   * scheduled -> picked up by a worker (BullMQ's `processedOn`, ms precision): the enqueue, the wait in the queue and
   * the pick-up, BullMQ's own stage, for every worker kind (absent in results written before issue 32)
   */
  readonly pickupMs?: Percentiles;
}

function otherShare(cpuMsPerEvent: Record<string, number>, events: number, seconds: number): number | null {
  const other = cpuMsPerEvent['other'];
  if (other === undefined) return null;
  return round((other * events) / (seconds * 1000 * os.cpus().length), 3);
}

export interface LatencyResult {
  readonly rate: number;
  readonly concurrency: number;
  readonly seconds: number;
  readonly ours: LatencyRun;
  /** ours at `alsoConcurrencies` */
  readonly oursAt: ReadonlyArray<LatencyRun & { readonly concurrency: number }>;
  readonly noop: LatencyRun;
  /**
   * baseline (d), the floor: enqueue -> stream entry read, through a BullMQ worker that XADDs each entry itself, no
   * database (absent in results written before it was added)
   */
  readonly floor?: LatencyRun;
  readonly direct: LatencyRun;
  /** ours with group commit off (FLEET_BATCH_MAX=1), same rate and concurrency: before and after issue 18 */
  readonly unbatched?: LatencyRun;
  /** `before`, an earlier commit (`--before`), same rate and concurrency */
  readonly before?: LatencyRun;
  /** at low load (absent in results written before issue 18) */
  readonly low?: {
    readonly rate: number;
    readonly seconds: number;
    readonly ours: LatencyRun;
    readonly unbatched: LatencyRun;
    readonly before?: LatencyRun;
  };
}

async function workerLatency(services: BenchServices, dbUrl: string, kind: WorkerKind, options: LatencyOptions): Promise<LatencyRun> {
  const n = Math.round(options.rate * options.seconds);
  await withClient(dbUrl, (c) => c.query(`UPDATE outbox SET published_at = COALESCE(published_at, now()), stream_id = NULL`));
  const ids = await seedReadyDeployments(dbUrl, options.warmup + n);
  const w = await WorkerUnderTest.start({
    kind,
    concurrency: options.concurrency,
    redisUrl: services.redisUrl,
    databaseUrl: dbUrl,
    prefix: services.prefix(`latency-${kind}`),
    report: 'each',
    servicePids: services.pids,
    ...(options.cpuProfDir !== undefined ? { cpuProfDir: options.cpuProfDir } : {}),
    ...(options.beforeRoot !== undefined ? { beforeRoot: options.beforeRoot } : {}),
  });
  try {
    await w.enqueueAll(ids.slice(0, options.warmup));
    await w.waitDone(options.warmup, 60_000);
    const sent: Array<Promise<{ result: EnqueueResult; scheduledAt: number }>> = [];
    const groups = cpuGroups({ servicePids: services.pids }, w.proc.pid);
    const cpuBefore = cpuNow(groups);
    const started = now();
    await paced(n, options.rate, (i, scheduledAt) => {
      const id = ids[options.warmup + i];
      if (id !== undefined) sent.push(w.enqueueTeardown(id).then((result) => ({ result, scheduledAt })));
    });
    const enqueued = await Promise.all(sent);
    const achievedPerSec = n / ((now() - started) / 1000);
    await w.waitDone(options.warmup + n, 120_000);
    const seconds = (now() - started) / 1000;
    const cpu = cpuPerEvent(cpuBefore, cpuNow(groups), n);
    const latencies = enqueued.map(({ result, scheduledAt }) => {
      const doneAt = w.doneAt(result);
      if (doneAt === undefined) throw new Error(`no completion recorded for ${result.eventId}`);
      return doneAt - scheduledAt;
    });
    const picked = await w.pickedUpAt(enqueued.map((e) => e.result.jobId));
    const pickups = enqueued.flatMap(({ result, scheduledAt }) => {
      const at = picked.get(result.jobId);
      return at === undefined ? [] : [at - scheduledAt];
    });
    const stages = stageBreakdown(w, enqueued, picked);
    const stopped = await w.stop();
    return {
      ...(stages !== null ? { stagesMs: stages } : {}),
      ...(pickups.length > 0 ? { pickupMs: percentiles(pickups) } : {}),
      offeredPerSec: options.rate,
      cpuMsPerEvent: cpu,
      achievedPerSec: round(achievedPerSec, 1),
      latencyMs: percentiles(latencies),
      peakRssMb: stopped.peakRssMb,
      otherCpuShare: otherShare(cpu, n, seconds),
    };
  } catch (err) {
    await w.stop().catch(() => undefined);
    throw err;
  }
}

function stageBreakdown(
  w: WorkerUnderTest,
  enqueued: ReadonlyArray<{ result: EnqueueResult; scheduledAt: number }>,
  picked: ReadonlyMap<string, number>,
): LatencyRun['stagesMs'] | null {
  const queue: number[] = [];
  const pickedToDecided: number[] = [];
  const commitAndRelay: number[] = [];
  const delivery: number[] = [];
  for (const { result, scheduledAt } of enqueued) {
    const s = w.stages(result);
    const readAt = w.doneAt(result);
    if (s === undefined || readAt === undefined || Number.isNaN(s.decidedAt)) continue;
    queue.push(s.decidedAt - scheduledAt);
    const pickedAt = picked.get(result.jobId);
    if (pickedAt !== undefined) pickedToDecided.push(s.decidedAt - pickedAt);
    commitAndRelay.push(s.appendedAt - s.decidedAt);
    delivery.push(readAt - s.appendedAt);
  }
  if (queue.length === 0) return null;
  return {
    queue: percentiles(queue),
    commitAndRelay: percentiles(commitAndRelay),
    delivery: percentiles(delivery),
    ...(pickedToDecided.length > 0 ? { pickedToDecided: percentiles(pickedToDecided) } : {}),
  };
}

export async function runLatency(services: BenchServices, options: LatencyOptions): Promise<LatencyResult> {
  const dbUrl = await services.createDatabase('latency');
  const ours = await workerLatency(services, dbUrl, 'ours', options);
  log(`latency ours   at ${options.rate}/s: ${JSON.stringify(ours.latencyMs)} ms (other processes: ${ours.otherCpuShare ?? '?'} of the CPU)`);
  const oursAt: Array<LatencyRun & { concurrency: number }> = [];
  for (const concurrency of options.alsoConcurrencies ?? []) {
    const run = await workerLatency(services, dbUrl, 'ours', { ...options, concurrency });
    log(`latency ours c=${concurrency} at ${options.rate}/s: ${JSON.stringify(run.latencyMs)} ms`);
    oursAt.push({ ...run, concurrency });
  }
  const unbatched = await workerLatency(services, dbUrl, 'unbatched', options);
  const before = options.beforeRoot !== undefined ? await workerLatency(services, dbUrl, 'before', options) : undefined;
  if (before !== undefined) log(`latency before at ${options.rate}/s: ${JSON.stringify(before.latencyMs)} ms`);
  log(`latency ours, group commit off, at ${options.rate}/s: ${JSON.stringify(unbatched.latencyMs)} ms`);
  const lowRate = options.lowRate ?? 10;
  const lowSeconds = options.lowSeconds ?? 30;
  const lowOptions = { ...options, rate: lowRate, seconds: lowSeconds, warmup: Math.min(options.warmup, 50) };
  const lowOurs = await workerLatency(services, dbUrl, 'ours', lowOptions);
  const lowUnbatched = await workerLatency(services, dbUrl, 'unbatched', lowOptions);
  const lowBefore = options.beforeRoot !== undefined ? await workerLatency(services, dbUrl, 'before', lowOptions) : undefined;
  if (lowBefore !== undefined) log(`latency before at ${lowRate}/s: ${JSON.stringify(lowBefore.latencyMs)} ms`);
  log(`latency at ${lowRate}/s: ours ${JSON.stringify(lowOurs.latencyMs)} ms; group commit off ${JSON.stringify(lowUnbatched.latencyMs)} ms`);
  const noop = await workerLatency(services, dbUrl, 'noop', options);
  log(`latency noop   at ${options.rate}/s: ${JSON.stringify(noop.latencyMs)} ms (other processes: ${noop.otherCpuShare ?? '?'} of the CPU)`);
  const floor = await workerLatency(services, dbUrl, 'stream', options);
  log(`latency floor  at ${options.rate}/s: ${JSON.stringify(floor.latencyMs)} ms (other processes: ${floor.otherCpuShare ?? '?'} of the CPU)`);

  const n = Math.round(options.rate * options.seconds);
  const ids = await seedReadyDeployments(dbUrl, options.concurrency + n);
  const directRun = await runDirectPaced(dbUrl, ids, options.rate, options.concurrency, cpuGroups({ servicePids: services.pids }, null));
  const { latencies: directLatencies, seconds, cpuMsPerEvent: cpu } = directRun;
  const direct: LatencyRun = {
    offeredPerSec: options.rate,
    achievedPerSec: round(n / seconds, 1),
    latencyMs: percentiles(directLatencies),
    peakRssMb: null,
    otherCpuShare: otherShare(cpu, n, seconds),
  };
  log(`latency direct at ${options.rate}/s: ${JSON.stringify(direct.latencyMs)} ms (other processes: ${direct.otherCpuShare ?? '?'} of the CPU)`);
  return {
    rate: options.rate,
    concurrency: options.concurrency,
    seconds: options.seconds,
    ours,
    oursAt,
    noop,
    floor,
    direct,
    unbatched,
    ...(before !== undefined ? { before } : {}),
    low: { rate: lowRate, seconds: lowSeconds, ours: lowOurs, unbatched: lowUnbatched, ...(lowBefore !== undefined ? { before: lowBefore } : {}) },
  };
}
