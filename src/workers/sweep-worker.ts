/**
 * The fleet-wide sweep tick (docs/architecture.md, "Heartbeats, orphans, deadlines, dispatch"): a BullMQ job scheduler `sweep`
 * on the `maintenance` queue yields one `sweep` job per FLEET_SWEEP_EVERY_S, and whichever worker process takes it
 * runs `Sweeper.sweep()` once, returning the result as the job's return value. The tick is claimed in Redis
 * (`<prefix>:maintenance:sweep-claim:<tick>`, SET NX) before it runs, so a tick job BullMQ delivers again (its worker
 * stalled: alive but cut off, its lock lapsed) returns `{tick, ran: 'duplicate'}` instead of sweeping a second time.
 *
 * The scheduler is registered from one place, `ensureSweepScheduler`, which every process with the sweep role calls
 * at start and again every `recheckEveryMs`.
 * BullMQ has a history of bugs around concurrent or repeated `upsertJobScheduler` calls: upserts in quick
 * succession leaving several delayed iterations (taskforcesh/bullmq#2988, #2876), instances starting together and
 * the scheduler ending up with no next job (#3085, #3381), remove-then-upsert leaving nothing scheduled (#3063),
 * and upserts racing an iteration a worker has just taken (#3430). So the registration
 *   - runs under a short Redis lock (one registration at a time, fleet-wide; a crashed holder's lock expires),
 *   - does nothing when the existing scheduler already has this interval and job template and its next iteration
 *     is pending (the common case: every process but the first, every restart), so the live schedule is not
 *     touched while workers are taking iterations from it,
 *   - upserts (never removes) when the scheduler is missing, differs, or has lost its next iteration.
 * A process that finds the lock taken waits for it and then checks again, so a holder that died mid-registration
 * cannot leave the scheduler unregistered.
 */
import { createHash, randomUUID } from 'node:crypto';
import * as os from 'node:os';
import { Queue, UnrecoverableError, Worker } from 'bullmq';
import type { Job, JobSchedulerJson } from 'bullmq';
import type { RedisConnection } from '../redis/connection';
import { silentLogger, type Logger } from '../log';
import { MAINTENANCE_QUEUE } from '../queues/names';
import { connectionForKey, createRedis, describeRedis, logReport, ServerWatch, requireSlotPrefix } from '../redis/connection';
import { closeWithin } from './close-within';
import { acquireLock, releaseLock } from '../redis/lock';
import { idleReport } from '../services/readiness';
import { PROBE_JOB_NAME, type ShardJobData, type ShardReport, type SweepResult } from '../services/sweep/sweeper';
import { isTransient } from '../errors';

export const SWEEP_SCHEDULER_ID = 'sweep';
export const SWEEP_JOB_NAME = 'sweep';

/**
 * Options of every `sweep` job: no retries (the next tick is the retry), and finished jobs kept long enough to
 * inspect in Bull Board but bounded (a 30 s tick makes 2880 a day).
 */
export const SWEEP_JOB_OPTIONS = Object.freeze({
  attempts: 1,
  removeOnComplete: Object.freeze({ age: 24 * 3600, count: 1000 }),
  removeOnFail: Object.freeze({ age: 7 * 24 * 3600, count: 1000 }),
});

/** Identifies the job template: a scheduler registered by code with other job options gets re-registered. */
const TEMPLATE_FINGERPRINT = createHash('sha256')
  .update(JSON.stringify({ name: SWEEP_JOB_NAME, opts: SWEEP_JOB_OPTIONS }))
  .digest('hex')
  .slice(0, 16);

/** Job states in which an iteration will still run (or is running). */
const PENDING_STATES: ReadonlySet<string> = new Set(['delayed', 'waiting', 'prioritized', 'active', 'waiting-children']);

export interface EnsureSweepSchedulerOptions {
  /** a Redis URL (a connection is made and closed) or an existing ioredis connection (left open) */
  readonly connection: string | RedisConnection;
  /** BullMQ key prefix (default `fleet`) */
  readonly prefix?: string;
  /** the tick, FLEET_SWEEP_EVERY_S */
  readonly everyS: number;
  readonly logger?: Logger;
  /** the registration lock expires after this long if its holder dies (default 10 000 ms) */
  readonly lockTtlMs?: number;
  /** how long to wait for another process's registration before failing (default 30 000 ms) */
  readonly waitMs?: number;
}

export interface EnsureSweepSchedulerResult {
  /**
   * `created`: there was none; `updated`: the interval or job template changed; `repaired`: it had no pending
   * next iteration; `unchanged`: it was already right (nothing written)
   */
  readonly action: 'created' | 'updated' | 'repaired' | 'unchanged';
  readonly everyMs: number;
  /** when the next iteration is due (ms since the epoch), as far as known */
  readonly next: number | null;
}

/** Registers the `sweep` job scheduler, or leaves it alone when it is already right. Safe to call concurrently. */
export async function ensureSweepScheduler(options: EnsureSweepSchedulerOptions): Promise<EnsureSweepSchedulerResult> {
  const everyMs = Math.round(options.everyS * 1000);
  if (!Number.isFinite(everyMs) || everyMs < 1000) throw new Error(`everyS must be at least 1, got ${options.everyS}`);
  requireSlotPrefix(options.connection, options.prefix ?? 'fleet', 'ensureSweepScheduler');
  const log = (options.logger ?? silentLogger).child({ component: 'sweep-scheduler' });
  const owned = typeof options.connection === 'string' ? createRedis(options.connection, 'producer', 'lifecycle-fleet-scheduler') : null;
  const redis = owned ?? (options.connection as RedisConnection);
  const queue = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix: options.prefix ?? 'fleet', skipWaitingForReady: true });
  queue.on('error', () => undefined); // errors surface on the calls below
  try {
    const lockKey = queue.toKey('sweep-scheduler-lock');
    const token = randomUUID();
    const waitMs = options.waitMs ?? 30_000;
    if (!(await acquireLock(redis, lockKey, token, options.lockTtlMs ?? 10_000, waitMs))) {
      throw new Error(`sweep scheduler: another process held the registration lock for over ${waitMs} ms`);
    }
    try {
      const result = await registerUnderLock(queue, everyMs);
      const level = result.action === 'unchanged' ? 'debug' : 'info';
      log[level]({ ...result, schedulerId: SWEEP_SCHEDULER_ID }, `sweep scheduler ${result.action}`);
      return result;
    } finally {
      await releaseLock(redis, lockKey, token); // else it expires
    }
  } finally {
    await queue.close();
    if (owned !== null) await owned.quit().catch(() => owned.disconnect());
  }
}

async function registerUnderLock(queue: Queue, everyMs: number): Promise<EnsureSweepSchedulerResult> {
  const existing = await queue.getJobScheduler(SWEEP_SCHEDULER_ID);
  let action: EnsureSweepSchedulerResult['action'];
  if (existing === undefined) {
    action = 'created';
  } else if (!matches(existing, everyMs)) {
    action = 'updated';
  } else if (await hasPendingIteration(queue, existing)) {
    return { action: 'unchanged', everyMs, next: existing.next ?? null };
  } else {
    action = 'repaired';
  }
  const job = await queue.upsertJobScheduler(
    SWEEP_SCHEDULER_ID,
    { every: everyMs },
    { name: SWEEP_JOB_NAME, data: { fingerprint: TEMPLATE_FINGERPRINT }, opts: { ...SWEEP_JOB_OPTIONS } },
  );
  const next = (job as Job | undefined)?.opts.prevMillis;
  return { action, everyMs, next: typeof next === 'number' ? next : null };
}

function matches(existing: JobSchedulerJson, everyMs: number): boolean {
  const data: unknown = existing.template?.data;
  const fingerprint = typeof data === 'object' && data !== null ? (data as Record<string, unknown>).fingerprint : undefined;
  return existing.every === everyMs && existing.name === SWEEP_JOB_NAME && fingerprint === TEMPLATE_FINGERPRINT;
}

/**
 * True when the scheduler's next iteration exists as a job that will run. A worker taking an iteration moves the
 * scheduler on between our two reads, so a finished iteration is only believed after a second look.
 */
async function hasPendingIteration(queue: Queue, first: JobSchedulerJson): Promise<boolean> {
  let scheduler: JobSchedulerJson | undefined = first;
  for (let look = 0; look < 2 && scheduler !== undefined; look++) {
    if (typeof scheduler.next !== 'number') return false;
    const state = await queue.getJobState(`repeat:${SWEEP_SCHEDULER_ID}:${scheduler.next}`);
    if (PENDING_STATES.has(state)) return true;
    const again: JobSchedulerJson | undefined = await queue.getJobScheduler(SWEEP_SCHEDULER_ID);
    if (again?.next === scheduler.next) return false;
    scheduler = again;
  }
  return false;
}

/**
 * A tick's job delivered again after a worker claimed it (its worker stalled, e.g. cut off from Redis, and BullMQ
 * moved the job back to wait): the tick is not run twice.
 */
export interface DuplicateTick {
  readonly tick: string;
  /**
   * `duplicate`: delivered again after it started; `unconfirmed`: with durable claims, the claim did not reach a
   * replica in time, so the tick did not run (a failover could lose the claim and run it again elsewhere; the next
   * tick does its work)
   */
  readonly ran: 'duplicate' | 'unconfirmed';
}

/** What a `sweep` job returns: the tick's result, or `DuplicateTick` for a tick that had started already. */
export type SweepJobResult = SweepResult | DuplicateTick;

/** A tick's id: the scheduled time of the scheduler's iteration (`repeat:sweep:<ms>`), else the job's id. */
function tickOf(job: Job): string {
  const id = job.id ?? String(job.timestamp);
  return id.slice(id.lastIndexOf(':') + 1);
}

export interface SweepWorkerOptions {
  /** a Redis URL (the worker owns its connections) or an ioredis connection with `maxRetriesPerRequest: null` */
  readonly connection: string | RedisConnection;
  /** BullMQ key prefix (default `fleet`) */
  readonly prefix?: string;
  /** runs ticks and shards; a `Sweeper` */
  readonly sweeper: { sweep(tick?: string): Promise<SweepResult>; runShard(data: ShardJobData): Promise<ShardReport> };
  /**
   * Maintenance jobs run at once in this process (default 4): a tick and the probe shards it takes. A tick's own
   * job is not prioritized, so it takes the first slot that frees up, ahead of any shards waiting.
   */
  readonly concurrency?: number;
  /** FLEET_SWEEP_EVERY_S: the interval `start()` registers */
  readonly everyS: number;
  readonly logger?: Logger;
  /**
   * The process's view of its Redis: connection errors are reported once per outage through it (default: a watch
   * of this component's own, logging to `logger`).
   */
  readonly redisWatch?: ServerWatch;
  /** shown as the job's `processedBy` (default `<hostname>:<pid>`) */
  readonly name?: string;
  /**
   * Claims of ticks and shards on this many replicas before they run (Redis `WAIT`, FLEET_DURABLE_ENQUEUE): a
   * failover to a replica that lacked a claim would otherwise let the redelivered job run a second time (default
   * null: the claim on the master alone)
   */
  readonly durable?: { readonly replicas: number; readonly timeoutMs: number } | null;
  /** lock duration of a running sweep (default 30 s; renewed while it runs) */
  readonly lockDurationMs?: number;
  /**
   * How often a started worker checks the scheduler again, re-registering it if it was removed or lost its next
   * iteration while every process kept running, e.g. Redis lost its data or failed over to a replica that missed it
   * (default max(10 s, 2 ticks): a lost scheduler costs at most a tick or two of sweeps; 0: never)
   */
  readonly recheckEveryMs?: number;
}

/**
 * Takes `sweep` and `probe` jobs from the `maintenance` queue. Whichever process takes a tick's job runs it (BullMQ
 * hands each job to one worker); the tick's shards go back on the queue as `probe` jobs that any process takes.
 * A tick and a shard are each claimed in Redis before they run, so a redelivered one (its worker stalled or died)
 * does not run twice; a failover to a replica that never got the claim could let it, unless `durable` makes the
 * claim reach the replicas first (docs/architecture.md, "When a host is cut off, or a Redis master fails").
 */
export class SweepWorker {
  readonly worker: Worker<unknown, SweepJobResult | ShardReport>;
  private readonly log: Logger;
  private readonly ownedConnection: RedisConnection | null;
  private closing: Promise<void> | null = null;
  private recheckTimer: NodeJS.Timeout | null = null;
  private readonly redisWatch: ServerWatch;
  private rechecking: Promise<void> | null = null;
  /** slot -> node cache of `connectionForKey` (durable claims) */
  private readonly slots = new Map<string, number>();

  constructor(private readonly options: SweepWorkerOptions) {
    requireSlotPrefix(options.connection, options.prefix ?? 'fleet', 'SweepWorker');
    this.log = (options.logger ?? silentLogger).child({ component: 'sweep-worker' });
    this.ownedConnection = typeof options.connection === 'string' ? createRedis(options.connection, 'worker', 'lifecycle-fleet-sweep') : null;
    this.worker = new Worker<unknown, SweepJobResult | ShardReport>(MAINTENANCE_QUEUE, (job) => this.process(job), {
      connection: this.connection,
      prefix: options.prefix ?? 'fleet',
      concurrency: Math.max(1, options.concurrency ?? 4),
      name: options.name ?? `${os.hostname()}:${process.pid}`,
      lockDuration: options.lockDurationMs ?? 30_000,
      autorun: false,
    });
    const connection = this.connection;
    const watch = options.redisWatch ?? new ServerWatch(describeRedis(connection), logReport(this.log)).attach(connection);
    this.redisWatch = watch;
    this.worker.on('error', (err) => {
      if (!watch.error(err)) this.log.error({ err }, 'sweep worker error');
    });
    // the sweeper has logged the error itself
    this.worker.on('failed', (job, err) =>
      this.log[isTransient(err) ? 'debug' : 'warn']({ jobId: job?.id, reason: err.message }, 'sweep job failed'),
    );
  }

  /**
   * Registers the scheduler (see `ensureSweepScheduler`), starts taking sweep jobs, and from then on checks the
   * scheduler every `recheckEveryMs`.
   */
  async start(): Promise<EnsureSweepSchedulerResult> {
    const registered = await this.ensure();
    if (this.closing !== null) return registered;
    if (!this.worker.isRunning()) {
      this.worker.run().catch((err: unknown) => this.log.error({ err }, 'sweep worker stopped'));
    }
    const every = this.options.recheckEveryMs ?? Math.max(10_000, 2 * this.options.everyS * 1000);
    if (every > 0 && this.recheckTimer === null) {
      this.recheckTimer = setInterval(() => this.recheck(), every);
      this.recheckTimer.unref();
    }
    await this.worker.waitUntilReady();
    return registered;
  }

  private ensure(): Promise<EnsureSweepSchedulerResult> {
    return ensureSweepScheduler({
      connection: this.options.connection,
      prefix: this.options.prefix,
      everyS: this.options.everyS,
      logger: this.options.logger,
    });
  }

  private recheck(): void {
    if (this.rechecking !== null || this.closing !== null) return;
    this.rechecking = this.ensure()
      .then(
        (result) => {
          if (result.action !== 'unchanged') this.log.warn({ ...result }, `sweep scheduler was ${result.action} by a periodic check`);
        },
        (err: unknown) => this.log.warn({ err }, 'sweep scheduler check failed; trying again later'),
      )
      .finally(() => {
        this.rechecking = null;
      });
  }

  private async process(job: Job<unknown, SweepJobResult | ShardReport>): Promise<SweepJobResult | ShardReport> {
    if (job.name === SWEEP_JOB_NAME) return this.tick(job);
    if (job.name === PROBE_JOB_NAME) return this.probe(job as Job<ShardJobData, ShardReport>);
    throw new UnrecoverableError(`unknown_job: ${job.name} is not a maintenance job`);
  }

  /**
   * Runs a tick once. The tick is claimed in Redis first (`SET NX`, kept past any redelivery): a tick job delivered
   * again after it started (its worker stalled: alive but unable to renew its lock) finds the claim and is not run.
   */
  private async tick(job: Job): Promise<SweepJobResult> {
    const tick = tickOf(job);
    const key = `${this.options.prefix ?? 'fleet'}:${MAINTENANCE_QUEUE}:sweep-claim:${tick}`;
    const claim = await this.claim(key, Math.max(600_000, 10 * this.options.everyS * 1000));
    if (claim === 'taken') {
      const claimedBy = await this.connection.get(key).catch(() => null);
      this.log.warn({ jobId: job.id, tick, claimedBy }, 'sweep tick delivered again after it started: not run twice');
      return { tick, ran: 'duplicate' };
    }
    if (claim === 'unconfirmed') {
      this.log.warn({ jobId: job.id, tick }, 'sweep tick claim did not reach a replica in time: not run (the next tick does its work)');
      return { tick, ran: 'unconfirmed' };
    }
    this.log.info({ tick, jobId: job.id }, 'sweep tick started');
    return this.options.sweeper.sweep(tick);
  }

  private async probe(job: Job<ShardJobData, ShardReport>): Promise<ShardReport> {
    const data = job.data;
    const claim = await this.claim(
      `${this.options.prefix ?? 'fleet'}:${MAINTENANCE_QUEUE}:probe-claim:${job.id ?? ''}`,
      Math.max(60_000, data.deadline - Date.now() + 60_000),
    );
    if (claim === 'taken') {
      this.log.warn({ jobId: job.id, tick: data.tick, shard: data.shard }, 'probe shard delivered again after it started: not run twice');
      return idleReport(data, 'duplicate');
    }
    if (claim === 'unconfirmed') {
      this.log.warn({ jobId: job.id, tick: data.tick, shard: data.shard }, 'probe shard claim did not reach a replica in time: not run');
      return idleReport(data, 'unconfirmed');
    }
    const report = await this.options.sweeper.runShard(data);
    // the ids served their purpose: keep finished shards small in Redis
    await job.updateData({ ...data, ids: [] }).catch(() => undefined);
    return report;
  }

  private get connection(): RedisConnection {
    return this.ownedConnection ?? (this.options.connection as RedisConnection);
  }

  /**
   * Claims `key` for this worker (`SET NX PX ttlMs`). With `durable`, the claim must also reach that many replicas
   * (`WAIT`, on the node that serves the key): `unconfirmed` when it did not in time.
   */
  private async claim(key: string, ttlMs: number): Promise<'claimed' | 'taken' | 'unconfirmed'> {
    if ((await this.connection.set(key, this.worker.opts.name ?? '', 'PX', ttlMs, 'NX')) !== 'OK') return 'taken';
    const durable = this.options.durable ?? null;
    if (durable === null) return 'claimed';
    const writer = await connectionForKey(this.connection, key, this.slots);
    const acknowledged = Number(await writer.call('WAIT', durable.replicas, durable.timeoutMs));
    return acknowledged >= durable.replicas ? 'claimed' : 'unconfirmed';
  }

  /**
   * Stops taking jobs and lets a running sweep finish for up to `graceMs` (default 30 s); past that it stops
   * waiting (the job's lock expires; the next tick sweeps again). Safe to call twice.
   */
  close(graceMs = 30_000): Promise<void> {
    this.closing ??= (async () => {
      if (this.recheckTimer !== null) clearInterval(this.recheckTimer);
      if (this.redisWatch.isDown)
        await closeWithin(this.worker, 1000, true); // a sweep cannot finish without Redis
      else if ((await closeWithin(this.worker, graceMs)) === 'timeout') this.log.warn({ graceMs }, 'the running sweep did not finish in time');
      await this.rechecking; // it closes the connections it opened
      if (this.ownedConnection !== null) this.ownedConnection.disconnect();
    })();
    return this.closing;
  }
}
