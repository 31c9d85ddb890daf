/**
 * Starting the measured worker processes and feeding them the workload.
 *
 * - `ours`: the real `node bin/fleet.js worker` (lifecycle worker, outbox relay and sweep in one process, as
 *   deployed), LOG_LEVEL=info writing its log to a file. Done = the event's entry is on the transition stream.
 * - `noop`: baseline (b), bench/fixtures/noop-worker. Done = the job completed.
 * - `naive`: baseline (c), bench/fixtures/naive-worker. Done = the job completed (its transaction committed; it
 *   publishes nothing, so it does strictly less than `ours` per event).
 * - `stream`: baseline (d), bench/fixtures/stream-worker: each job's entry XADDed by the worker itself, no database.
 *   Done = the entry was read from the stream, as for `ours`.
 * - `traced`: `ours` with tracing on (FLEET_TRACE_BENCH=1: every span made, batched and handed to an in-process
 *   exporter that counts and drops them), so that `ours` next to it shows what tracing costs per event.
 * - `partitioned`: `ours` with FLEET_STREAM_PARTITIONS=16 (issue 29): the relay appends to 16 partition streams;
 *   done = the entry was read from its partition.
 * - `before`: `ours` as an earlier commit built it (`--before DIR`, a built checkout): a change's before and after
 *   measured in one run, on the same services and under the same outside load.
 */
import * as path from 'node:path';
import IORedis from 'ioredis';
import { LifecycleProducer, type EnqueueResult } from '../../src/queues/producer';
import { transitionStreamKey } from '../../src/streams/outbox-relay';
import { partitionKeys } from '../../src/streams/partitions';
import { MeasuredProcess } from './child';
import { inLanes, now, within } from './common';
import { cpuNow, cpuPerEvent } from './cpu';
import { StreamWatcher, type EntryStages } from './stream';
import { TEARDOWN } from './workload';

/**
 * `ours`: `fleet worker` as deployed (group commit on); `unbatched`: the same with FLEET_BATCH_MAX=1, one transaction
 * per event as before issue 18 (the before-and-after in one run); `noop`, `naive`: the fixtures' baselines;
 * `traced`: `ours` with tracing on (issue 19), on request only (`--kinds ours,traced`).
 */
export const WORKER_KINDS = ['ours', 'unbatched', 'noop', 'naive', 'traced', 'partitioned', 'before'] as const;
/** what the throughput scenario runs without `--kinds` */
export const DEFAULT_WORKER_KINDS: readonly WorkerKind[] = ['ours', 'unbatched', 'noop', 'naive'];
/** `stream`: baseline (d), bench/fixtures/stream-worker, the latency floor (measured by the latency scenario only). */
export type WorkerKind = (typeof WORKER_KINDS)[number] | 'stream';

/** The kinds that are `fleet worker` itself (and publish to the stream). */
export const isFleetWorker = (kind: WorkerKind): boolean =>
  kind === 'ours' || kind === 'unbatched' || kind === 'traced' || kind === 'partitioned' || kind === 'before';

/** The stream partitions of the `partitioned` kind. */
export const BENCH_PARTITIONS = 16;

/** The kinds whose events end as entries on the transition stream (done = the entry was read). */
const appendsToStream = (kind: WorkerKind): boolean => isFleetWorker(kind) || kind === 'stream';

export interface WorkerSetup {
  readonly kind: WorkerKind;
  readonly concurrency: number;
  readonly redisUrl: string;
  readonly databaseUrl: string;
  readonly prefix: string;
  /** completions reported per `{"count"}` line by fixtures (`every:<k>`), or each (`each`) */
  readonly report?: 'each' | number;
  readonly cpuProfDir?: string;
  /** server pids for CPU accounting */
  readonly servicePids?: { readonly postgres?: number; readonly redis?: number };
  /** `before`: the built checkout of the earlier commit */
  readonly beforeRoot?: string;
}

/** A started worker process with a producer on its queue and a way to wait for completions. */
export class WorkerUnderTest {
  private readonly waiters: Array<{ count: number; resolve: (at: number) => void }> = [];
  private reported = 0;
  private reportedAt = 0;
  private failures: string[] = [];
  /** jobId -> performance.now() when the fixture reported it completed (report: 'each') */
  readonly completions = new Map<string, number>();

  private constructor(
    readonly setup: WorkerSetup,
    readonly proc: MeasuredProcess,
    readonly producer: LifecycleProducer,
    readonly watcher: StreamWatcher | null,
  ) {
    proc.onMessage((message, at) => {
      if (typeof message['count'] === 'number') {
        this.reported = message['count'];
        this.reportedAt = at;
      } else if (typeof message['id'] === 'string') {
        this.completions.set(message['id'], at);
        this.reported++;
        this.reportedAt = at;
      } else if ('failed' in message) {
        this.failures.push(`${String(message['failed'])}: ${String(message['reason'])}`);
      }
      this.settle();
    });
  }

  static async start(setup: WorkerSetup): Promise<WorkerUnderTest> {
    const env = {
      REDIS_URL: setup.redisUrl,
      DATABASE_URL: setup.databaseUrl,
      FLEET_PREFIX: setup.prefix,
      FLEET_CONCURRENCY: String(setup.concurrency),
      LOG_LEVEL: 'info',
      BENCH_REPORT: setup.report === 'each' ? 'each' : `every:${setup.report ?? 100}`,
      ...(setup.kind === 'unbatched' ? { FLEET_BATCH_MAX: '1' } : {}),
      ...(setup.kind === 'traced' ? { FLEET_TRACE_BENCH: '1' } : {}),
      ...(setup.kind === 'partitioned' ? { FLEET_STREAM_PARTITIONS: String(BENCH_PARTITIONS) } : {}),
    };
    const label = `${setup.prefix}`;
    if (setup.kind === 'before' && setup.beforeRoot === undefined) throw new Error('the `before` worker needs --before DIR');
    const proc = isFleetWorker(setup.kind)
      ? await MeasuredProcess.start({
          label,
          args: ['bin/fleet.js', 'worker'],
          ...(setup.kind === 'before' && setup.beforeRoot !== undefined ? { root: setup.beforeRoot } : {}),
          env,
          ready: { kind: 'log', pattern: /worker started/ },
          ...(setup.cpuProfDir !== undefined ? { cpuProfDir: setup.cpuProfDir } : {}),
        })
      : await MeasuredProcess.start({
          label,
          args: [path.join('dist', 'bench', 'fixtures', `${setup.kind}-worker.js`)],
          env,
          ready: { kind: 'json' },
          ...(setup.cpuProfDir !== undefined ? { cpuProfDir: setup.cpuProfDir } : {}),
        });
    const producer = new LifecycleProducer({ connection: setup.redisUrl, prefix: setup.prefix });
    let watcher: StreamWatcher | null = null;
    if (appendsToStream(setup.kind)) {
      watcher = new StreamWatcher(
        setup.redisUrl,
        partitionKeys(transitionStreamKey(setup.prefix), setup.kind === 'partitioned' ? BENCH_PARTITIONS : 1),
      );
      watcher.start();
    }
    return new WorkerUnderTest(setup, proc, producer, watcher);
  }

  private settle(): void {
    for (const w of [...this.waiters]) {
      if (this.reported >= w.count) {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        w.resolve(this.reportedAt);
      }
    }
  }

  /** Resolves with performance.now() of the moment `count` events in total were done. */
  async waitDone(count: number, timeoutMs: number): Promise<number> {
    const what = `${count} events done by ${this.setup.prefix}`;
    if (this.watcher !== null) {
      await within(this.watcher.waitFor(count), timeoutMs, what);
      return this.watcher.lastArrivalAt;
    }
    if (this.reported >= count) return this.reportedAt;
    return within(
      new Promise<number>((resolve) => this.waiters.push({ count, resolve })),
      timeoutMs,
      `${what}${this.failures.length > 0 ? ` (failures: ${this.failures.slice(0, 3).join('; ')})` : ''}`,
    );
  }

  /** When the event was done: stream arrival (ours) or completion report (fixtures, report 'each'). */
  doneAt(result: EnqueueResult): number | undefined {
    return this.watcher !== null ? this.watcher.arrivals.get(result.eventId) : this.completions.get(result.jobId);
  }

  /** ours only: when the service decided the event's transition and when the relay appended it */
  stages(result: EnqueueResult): EntryStages | undefined {
    return this.watcher?.stages.get(result.eventId);
  }

  /**
   * When a worker took each job (BullMQ's `processedOn`, the worker's clock at its move to active, ms precision), in
   * performance.now() time; jobs no longer kept are left out
   */
  async pickedUpAt(jobIds: readonly string[]): Promise<Map<string, number>> {
    const queue = this.producer.queue;
    const client = new IORedis(this.setup.redisUrl, { lazyConnect: true });
    client.on('error', () => undefined); // a failure rejects the pipeline below
    try {
      const pipeline = client.pipeline();
      for (const id of jobIds) pipeline.hget(queue.toKey(id), 'processedOn');
      const replies = (await pipeline.exec()) ?? [];
      const out = new Map<string, number>();
      replies.forEach(([err, value], i) => {
        const id = jobIds[i];
        const at = typeof value === 'string' ? Number(value) : NaN;
        if (err === null && Number.isFinite(at) && id !== undefined) out.set(id, at - performance.timeOrigin);
      });
      return out;
    } finally {
      client.disconnect();
    }
  }

  async enqueueTeardown(deploymentId: string): Promise<EnqueueResult> {
    const result = await this.producer.enqueue(TEARDOWN, { deploymentId });
    this.watcher?.expect(result.eventId);
    return result;
  }

  /** Enqueues teardowns of `ids` through the SDK, `window` calls in flight. */
  async enqueueAll(ids: readonly string[], window = 64): Promise<void> {
    await inLanes(ids.length, window, async (i) => {
      const id = ids[i];
      if (id !== undefined) await this.enqueueTeardown(id);
    });
  }

  /** Stops the process; returns its peak RSS (MiB) and the queue's failed count. */
  async stop(): Promise<{ peakRssMb: number | null; failed: number }> {
    const peakRssMb = await this.proc.stop();
    const counts = await this.producer.queue.getJobCounts('failed');
    await this.producer.close();
    await this.watcher?.close();
    return { peakRssMb, failed: counts['failed'] ?? 0 };
  }
}

export interface WorkerRun {
  readonly kind: WorkerKind;
  readonly concurrency: number;
  readonly events: number;
  readonly seconds: number;
  readonly eventsPerSec: number;
  readonly peakRssMb: number | null;
  readonly failed: number;
  /** CPU ms per event by process: worker, postgres (all backends), redis, bench (producer + stream reader) */
  readonly cpuMsPerEvent: Record<string, number>;
}

/**
 * One throughput level: seeds `warmup + events` deployments, starts the worker, runs the warm-up batch to
 * completion (JIT, pools, connections), then enqueues `events` teardowns and times first enqueue -> last done.
 */
export async function runWorkerLevel(setup: WorkerSetup, ids: readonly string[], warmup: number): Promise<WorkerRun> {
  const w = await WorkerUnderTest.start(setup);
  const events = ids.length - warmup;
  let seconds: number;
  let cpu: Record<string, number>;
  try {
    await w.enqueueAll(ids.slice(0, warmup));
    await w.waitDone(warmup, 60_000);
    const groups = cpuGroups(setup, w.proc.pid);
    const cpuBefore = cpuNow(groups);
    const started = now();
    await w.enqueueAll(ids.slice(warmup));
    const doneAt = await w.waitDone(ids.length, 180_000);
    seconds = (doneAt - started) / 1000;
    cpu = cpuPerEvent(cpuBefore, cpuNow(groups), events);
  } catch (err) {
    await w.stop().catch(() => undefined);
    throw err;
  }
  const stopped = await w.stop();
  return {
    kind: setup.kind,
    concurrency: setup.concurrency,
    events,
    seconds,
    eventsPerSec: events / seconds,
    peakRssMb: stopped.peakRssMb,
    failed: stopped.failed,
    cpuMsPerEvent: cpu,
  };
}

export function cpuGroups(setup: Pick<WorkerSetup, 'servicePids'>, workerPid: number | null): Parameters<typeof cpuNow>[0] {
  const pids = setup.servicePids ?? {};
  return {
    ...(workerPid !== null ? { worker: { pid: workerPid, tree: false } } : {}),
    postgres: pids.postgres !== undefined ? { pid: pids.postgres, tree: true } : undefined,
    redis: pids.redis !== undefined ? { pid: pids.redis, tree: false } : undefined,
    bench: { pid: process.pid, tree: false },
  };
}
