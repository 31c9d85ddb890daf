/**
 * Scenario 2: latency enqueue -> stream entry at a fixed offered load (open loop: events are enqueued on a
 * schedule whatever the system does, and each latency is measured from the event's scheduled time, so a stall
 * counts against the system). Baselines at the same offered load on the same services: BullMQ no-op jobs
 * (enqueue -> job completed) and baseline (a)'s transaction driven directly with pg (scheduled start -> COMMIT).
 */
import type { EnqueueResult } from '../../src/queues/producer';
import { log, now, percentiles, round, type Percentiles } from '../lib/common';
import type { BenchServices } from '../lib/services';
import { WorkerUnderTest, type WorkerKind } from '../lib/workers';
import { paced, runDirectPaced, seedReadyDeployments, withClient } from '../lib/workload';

export interface LatencyOptions {
  /** offered events per second */
  readonly rate: number;
  readonly concurrency: number;
  readonly seconds: number;
  readonly warmup: number;
}

export interface LatencyRun {
  readonly offeredPerSec: number;
  /** events actually enqueued per second (the schedule as kept) */
  readonly achievedPerSec: number;
  readonly latencyMs: Percentiles;
  readonly peakRssMb: number | null;
}

export interface LatencyResult {
  readonly rate: number;
  readonly concurrency: number;
  readonly seconds: number;
  readonly ours: LatencyRun;
  readonly noop: LatencyRun;
  readonly direct: LatencyRun;
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
  });
  try {
    await w.enqueueAll(ids.slice(0, options.warmup));
    await w.waitDone(options.warmup, 60_000);
    const sent: Array<Promise<{ result: EnqueueResult; scheduledAt: number }>> = [];
    const started = now();
    await paced(n, options.rate, (i, scheduledAt) => {
      const id = ids[options.warmup + i];
      if (id !== undefined) sent.push(w.enqueueTeardown(id).then((result) => ({ result, scheduledAt })));
    });
    const enqueued = await Promise.all(sent);
    const achievedPerSec = n / ((now() - started) / 1000);
    await w.waitDone(options.warmup + n, 120_000);
    const latencies = enqueued.map(({ result, scheduledAt }) => {
      const doneAt = w.doneAt(result);
      if (doneAt === undefined) throw new Error(`no completion recorded for ${result.eventId}`);
      return doneAt - scheduledAt;
    });
    const stopped = await w.stop();
    return { offeredPerSec: options.rate, achievedPerSec: round(achievedPerSec, 1), latencyMs: percentiles(latencies), peakRssMb: stopped.peakRssMb };
  } catch (err) {
    await w.stop().catch(() => undefined);
    throw err;
  }
}

export async function runLatency(services: BenchServices, options: LatencyOptions): Promise<LatencyResult> {
  const dbUrl = await services.createDatabase('latency');
  const ours = await workerLatency(services, dbUrl, 'ours', options);
  log(`latency ours   at ${options.rate}/s: ${JSON.stringify(ours.latencyMs)} ms`);
  const noop = await workerLatency(services, dbUrl, 'noop', options);
  log(`latency noop   at ${options.rate}/s: ${JSON.stringify(noop.latencyMs)} ms`);

  const n = Math.round(options.rate * options.seconds);
  const ids = await seedReadyDeployments(dbUrl, options.warmup + n);
  await runDirectPaced(dbUrl, ids.slice(0, options.warmup), options.rate, options.concurrency);
  const started = now();
  const directLatencies = await runDirectPaced(dbUrl, ids.slice(options.warmup), options.rate, options.concurrency);
  const direct: LatencyRun = {
    offeredPerSec: options.rate,
    achievedPerSec: round(n / ((now() - started) / 1000), 1),
    latencyMs: percentiles(directLatencies),
    peakRssMb: null,
  };
  log(`latency direct at ${options.rate}/s: ${JSON.stringify(direct.latencyMs)} ms`);
  return { rate: options.rate, concurrency: options.concurrency, seconds: options.seconds, ours, noop, direct };
}
