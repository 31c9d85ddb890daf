/**
 * The lifecycle worker: takes BullMQ jobs from the `lifecycle` queue and hands their events to the transition service
 * through the group-commit coalescer (`TransitionCoalescer`; given a stamp buffer, heartbeat and readiness stamps
 * travel on this worker's connection), and maps the outcomes to BullMQ semantics, here and nowhere else:
 *
 * - applied / noop                      -> completed, the result as the job's return value
 * - rejected, invalid payload, unknown  -> UnrecoverableError (failed, no retries), the code in the reason
 * - not created yet, version conflicts,
 *   PostgreSQL or Redis unreachable     -> moved to delayed with backoff (DelayedError: uses up no `attempts`),
 *                                          until the retry budget (10 min of retries) is spent, then failed
 * - an event for a deployment or attempt
 *   that does not exist, past its budget
 *   (a stamp 30 s, any other event
 *   3 min: its create, racing behind
 *   it, would have arrived)             -> a heartbeat or readiness stamp: completed as a noop `not_found` (a stamp
 *                                          for nothing is dropped); any other event: failed `not_found`, no retry,
 *                                          at warn (a producer's mistake, not an outage: not ten minutes of retries
 *                                          and a `gave_up`)
 * - anything else (a bug)               -> thrown as is: BullMQ's `attempts` and backoff apply
 *
 * It also carries the fetch watchdog (`watchdog` below): a worker whose fetch loop stopped while jobs wait calls its
 * owner's `onStuck` (the fleet then stops the process with exit code 5, for its supervisor to start again).
 */
import * as os from 'node:os';
import { DelayedError, UnrecoverableError, Worker } from 'bullmq';
import type { Job, Telemetry } from 'bullmq';
import { context } from '@opentelemetry/api';
import type { RedisConnection } from '../redis/connection';
import { FleetError, isTransient, NotYetError, ValidationError } from '../errors';
import { STAMP_EVENTS } from '../events/schemas';
import { silentLogger, type Logger } from '../log';
import type { BacklogHeld, QueueBacklog } from '../queues/backlog';
import { LIFECYCLE_QUEUE } from '../queues/names';
import { createRedis, describeRedis, isRedisError, logReport, ServerWatch, requireSlotPrefix } from '../redis/connection';
import { closeWithin } from './close-within';
import { rejectAfter } from '../util';
import type { JobOutcome, JobReport } from '../metrics';
import { TransitionCoalescer, type ApplyResult, type TransitionService } from '../services/transitions';
import type { StampBuffer } from '../services/stamps';

/** The BullMQ worker settings a LifecycleWorker uses unless told otherwise (the bench's baseline workers use them too). */
export const LIFECYCLE_WORKER_DEFAULTS = { concurrency: 16, lockDuration: 8000, stalledInterval: 4000, maxStalledCount: 5 } as const;

export interface LifecycleWorkerOptions {
  /** a Redis URL (the worker owns its connection) or an ioredis connection with `maxRetriesPerRequest: null` */
  readonly connection: string | RedisConnection;
  /** BullMQ key prefix (default `fleet`) */
  readonly prefix?: string;
  /**
   * The stamp buffer the service absorbs heartbeat and readiness stamps into (the service's `stampBuffer`): its
   * stamps then travel on this worker's connection, ahead of each job's completion (`StampBuffer.absorbThrough`)
   */
  readonly stampBuffer?: StampBuffer;
  readonly service: TransitionService;
  /** jobs processed at once by this process (default 16) */
  readonly concurrency?: number;
  /**
   * Group commit (docs/architecture.md, "Group commit"): the events of jobs running at once are applied in batches
   * of up to this many, one snapshot read, one write and one commit each (default 32; 1: every event on its own)
   */
  readonly maxBatch?: number;
  /** batches written at once (default 2) */
  readonly maxBatches?: number;
  readonly logger?: Logger;
  /**
   * The process's view of its Redis: connection errors are reported once per outage through it (default: a watch
   * of this component's own, logging to `logger`).
   */
  readonly redisWatch?: ServerWatch;
  /** the process's view of PostgreSQL: connection errors reported once per outage, and its return (default: none) */
  readonly pgWatch?: ServerWatch;
  /** how long a job keeps being retried for "not yet", conflicts and outages, as the sum of its backoff delays
   * (default 10 min: 26 retries, 250 ms doubling to 30 s) */
  readonly retryBudgetMs?: number;
  /** shown as the job's `processedBy` in Bull Board and `Job.processedBy` (default `<hostname>:<pid>`) */
  readonly name?: string;
  /**
   * Lock duration (default 8 s; renewed every half of it) and stalled-check interval (default 4 s): a job held by
   * a worker that died is back in the queue at most lockDuration + stalledInterval (12 s) after the last renewal,
   * instead of BullMQ's default of up to a minute.
   */
  readonly lockDurationMs?: number;
  readonly stalledIntervalMs?: number;
  /** times a job may be orphaned by a dying worker before it fails (default 5; BullMQ's default is 1) */
  readonly maxStalledCount?: number;
  /**
   * The fetch watchdog (docs/architecture.md, "When a host is cut off, or a Redis master fails"): how many jobs wait
   * in the queue, asked over a connection other than the worker's. When jobs have been waiting (or the others
   * have been working, see `activity`) for `stuckAfterMs` while this worker, with free slots, started none, its fetch loop is stuck (a Redis Cluster client
   * left without a working connection after a failover, as BullMQ and ioredis users have reported: no error, no
   * jobs) and `onStuck` is called once. Jobs that no worker may take (the queue paused, or at its global concurrency
   * or rate limit) and this worker paused (`worker.pause()`) are not a stuck fetch: while either lasts, it does not
   * judge, and its window starts again when they end. Default: no watchdog. The fleet's `waiting` and `activity`:
   * `lifecycleQueueWatch` (src/app.ts).
   */
  readonly watchdog?: {
    /** the queue's backlog, read at one moment (`readBacklog`): how many jobs wait, and whether a worker may take them */
    readonly waiting: () => Promise<QueueBacklog>;
    /**
     * A counter that grows with the queue's work (the lifecycle queue's event stream's `entries-added`): grown by
     * `minActivity` (default 50) over the window while this worker, with free slots, started nothing also counts as
     * stuck, so that an idle fleet's other workers absorbing everything does not hide a stuck one
     */
    readonly activity?: () => Promise<number>;
    readonly minActivity?: number;
    readonly onStuck: (why: string) => void;
    /** default 30 s */
    readonly stuckAfterMs?: number;
    /** default 5 s */
    readonly checkEveryMs?: number;
  };
  /**
   * How long a heartbeat or readiness event for a deployment or attempt that does not exist ("not yet") is retried,
   * as the sum of its backoff delays (default 30 s: 6 retries, 250 ms doubling; never more than `retryBudgetMs`).
   * Then it completes as a noop `not_found`.
   */
  readonly stampRetryBudgetMs?: number;
  /**
   * The same for every other event (default 3 min: 11 retries; never more than `retryBudgetMs`); then it fails
   * `not_found`. Longer than a stamp's because losing it loses a transition: its create may be held up by the
   * fleet's own fault handling (a cut-off host's jobs run again elsewhere within 15 s, a Redis failover takes ~10 s)
   * and the jittered backoff can spend as little as half the budget. The chaos run on three hosts lost events at 30 s.
   */
  readonly notFoundRetryBudgetMs?: number;
  /** reports every job's outcome and duration (metrics) */
  readonly onJob?: (report: JobReport) => void;
  /** test hook: runs after the service has committed, before the job completes */
  readonly afterApply?: (job: Job, result: ApplyResult) => void | Promise<void>;
  /** start taking jobs at once (default true) */
  readonly autorun?: boolean;
  /**
   * BullMQ's telemetry (the fleet's `Tracing.bullmq`; default none): each job runs under BullMQ's worker span,
   * which continues the producer's trace, and its event's `transition` span goes under that (docs/architecture.md,
   * "Tracing"). Without it no job is traced.
   */
  readonly telemetry?: Telemetry;
}

/** Why the watchdog does not judge: the queue holds its jobs back, or this worker's owner paused it. */
type Held = BacklogHeld | 'worker_paused';

/** Backoff for the worker's own retries: 250 ms doubling to 30 s, with jitter. */
export function retryDelayMs(retriesSoFar: number): number {
  return Math.round(baseDelayMs(retriesSoFar) * (0.5 + Math.random() * 0.5));
}

function baseDelayMs(retriesSoFar: number): number {
  return Math.min(30_000, 250 * 2 ** Math.max(0, retriesSoFar));
}

/** How many retries fit in a budget at the un-jittered backoff (10 min: 26 retries). */
export function retriesWithin(budgetMs: number): number {
  let spent = 0;
  let n = 0;
  while (spent + baseDelayMs(n) <= budgetMs) spent += baseDelayMs(n++);
  return n;
}

/**
 * The eventId of a job whose payload has none: its jobId. A BullMQ auto-numbered id ("1", "2", ...) restarts
 * when a queue is obliterated or Redis loses data, so it is qualified by the job's timestamp, or a new event could
 * be taken for an old one and dropped as a duplicate.
 */
export function fallbackEventId(job: Pick<Job, 'id' | 'timestamp'>): string | undefined {
  if (job.id === undefined) return undefined;
  return /^\d+$/.test(job.id) ? `bullmq.${job.id}.${job.timestamp}` : job.id;
}

export class LifecycleWorker {
  readonly worker: Worker;
  private readonly log: Logger;
  private readonly ownedConnection: RedisConnection | null;
  private closing: Promise<void> | null = null;
  private readonly redisWatch: ServerWatch;
  /** jobs this worker is running, and when it last started one (ms, monotonic) */
  private running = 0;
  private lastStart = performance.now();
  /** since when every check saw jobs waiting while this worker started none (ms, monotonic), or null */
  private idleWhileWaitingSince: number | null = null;
  /** why the last check did not judge, or null (logged when it changes) */
  private held: Held | null = null;
  /** the queue's activity counter at each check within the window (ms, monotonic) */
  private readonly activitySamples: Array<{ readonly at: number; readonly count: number }> = [];
  private watchdogTimer: NodeJS.Timeout | null = null;
  /** where jobs' events go: batched into group commits */
  readonly coalescer: TransitionCoalescer;

  constructor(private readonly options: LifecycleWorkerOptions) {
    this.coalescer = new TransitionCoalescer(options.service, {
      ...(options.maxBatch === undefined ? {} : { maxBatch: options.maxBatch }),
      ...(options.maxBatches === undefined ? {} : { maxBatches: options.maxBatches }),
    });
    requireSlotPrefix(options.connection, options.prefix ?? 'fleet', 'LifecycleWorker');
    this.log = (options.logger ?? silentLogger).child({ component: 'lifecycle-worker' });
    this.ownedConnection = typeof options.connection === 'string' ? createRedis(options.connection, 'worker', 'lifecycle-fleet-worker') : null;
    this.worker = new Worker(LIFECYCLE_QUEUE, (job, token) => this.process(job, token), {
      connection: this.ownedConnection ?? (options.connection as RedisConnection),
      prefix: options.prefix ?? 'fleet',
      concurrency: options.concurrency ?? LIFECYCLE_WORKER_DEFAULTS.concurrency,
      name: options.name ?? `${os.hostname()}:${process.pid}`,
      lockDuration: options.lockDurationMs ?? LIFECYCLE_WORKER_DEFAULTS.lockDuration,
      stalledInterval: options.stalledIntervalMs ?? LIFECYCLE_WORKER_DEFAULTS.stalledInterval,
      maxStalledCount: options.maxStalledCount ?? LIFECYCLE_WORKER_DEFAULTS.maxStalledCount,
      autorun: options.autorun ?? true,
      ...(options.telemetry === undefined ? {} : { telemetry: options.telemetry }),
    });
    const connection = this.ownedConnection ?? (options.connection as RedisConnection);
    options.stampBuffer?.absorbThrough(connection);
    const watch = options.redisWatch ?? new ServerWatch(describeRedis(connection), logReport(this.log)).attach(connection);
    this.redisWatch = watch;
    this.worker.on('error', (err) => {
      if (!watch.error(err)) this.log.error({ err }, 'worker error');
    });
    this.worker.on('stalled', (jobId) => this.log.warn({ jobId }, 'job stalled: its worker stopped renewing the lock'));
    if (options.watchdog !== undefined) this.startWatchdog(options.watchdog);
  }

  private startWatchdog(watchdog: NonNullable<LifecycleWorkerOptions['watchdog']>): void {
    const stuckAfterMs = watchdog.stuckAfterMs ?? 30_000;
    let checking = false;
    this.watchdogTimer = setInterval(() => {
      if (checking || this.closing !== null) return;
      checking = true;
      void this.checkFetching(watchdog, stuckAfterMs).finally(() => {
        checking = false;
      });
    }, watchdog.checkEveryMs ?? 5000);
    this.watchdogTimer.unref();
  }

  private async checkFetching(watchdog: NonNullable<LifecycleWorkerOptions['watchdog']>, stuckAfterMs: number): Promise<void> {
    const now = performance.now();
    const concurrency = this.worker.opts.concurrency ?? 1;
    // Redis away, or not asked: nothing to judge (the outage has its own reporting and retries)
    const [backlog, activity] = await Promise.all([
      rejectAfter(watchdog.waiting(), 5000, 'the queue backlog').catch(() => null),
      watchdog.activity === undefined ? Promise.resolve(null) : rejectAfter(watchdog.activity(), 5000, 'the queue activity').catch(() => null),
    ]);
    // not knowing whether the queue holds its jobs back, judge nothing this time
    if (backlog === null) return;
    const held: Held | null = this.worker.isPaused() ? 'worker_paused' : backlog.held;
    this.noteHeld(held, backlog.waiting);
    if (held !== null) {
      // jobs wait, the others may work, and this worker takes none, rightly: both windows start again after it
      this.idleWhileWaitingSince = null;
      this.activitySamples.length = 0;
      return;
    }
    const waiting = backlog.waiting;
    if (activity !== null) {
      this.activitySamples.push({ at: now, count: activity });
      while ((this.activitySamples[1]?.at ?? now) <= now - stuckAfterMs) this.activitySamples.shift();
    }
    const idle = this.running < concurrency && now - this.lastStart >= stuckAfterMs;
    if (!idle || waiting === 0) this.idleWhileWaitingSince = null;
    else this.idleWhileWaitingSince ??= now;
    if (!idle) return;
    // jobs waiting at checks half the window apart (not a moment's queue), or the others busy all the while: a
    // healthy worker with free slots gets its turn within seconds (BullMQ wakes the longest-waiting worker first,
    // and a waiting one polls every few seconds), so one that gets none for the whole window is not fetching
    const oldest = this.activitySamples[0];
    const othersWorked =
      activity !== null && oldest !== undefined && now - oldest.at >= stuckAfterMs * 0.8 && activity - oldest.count >= (watchdog.minActivity ?? 50);
    const waitedLong = this.idleWhileWaitingSince !== null && now - this.idleWhileWaitingSince >= stuckAfterMs / 2;
    if (!othersWorked && !waitedLong) return;
    if (this.watchdogTimer !== null) clearInterval(this.watchdogTimer);
    const seen = waitedLong
      ? `jobs have waited for ${Math.round((now - (this.idleWhileWaitingSince ?? now)) / 1000)} s`
      : `the queue saw ${activity === null || oldest === undefined ? 0 : activity - oldest.count} job events`;
    const why = `${seen} while this worker, with ${concurrency - this.running} free slots, started none for ${Math.round((now - this.lastStart) / 1000)} s: its Redis connection is stuck`;
    this.log.error({ waiting, running: this.running }, `lifecycle worker stopped taking jobs: ${why}`);
    watchdog.onStuck(why);
  }

  private noteHeld(held: Held | null, waiting: number): void {
    if (held === this.held) return;
    // a paused queue is an operator's act, worth a line in every worker's log; limits come and go with the load
    const level = held === 'paused' || this.held === 'paused' ? 'info' : 'debug';
    if (held === null) this.log[level]({ waiting, was: this.held }, "fetch watchdog: jobs may be taken again; watching this worker's fetch from now");
    else this.log[level]({ waiting, held }, `fetch watchdog: ${HELD[held]}; jobs that wait meanwhile are not a stuck fetch`);
    this.held = held;
  }

  private async process(job: Job, token: string | undefined): Promise<ApplyResult> {
    this.running++;
    this.lastStart = performance.now();
    try {
      return await this.processOne(job, token);
    } finally {
      this.running--;
    }
  }

  private async processOne(job: Job, token: string | undefined): Promise<ApplyResult> {
    const started = performance.now();
    const ids = idsOf(job);
    let result: ApplyResult;
    try {
      result = await this.coalescer.apply(job.name, job.data, {
        fallbackEventId: fallbackEventId(job),
        producedAt: new Date(job.timestamp),
        // BullMQ's worker span, when it traces: the job's events may be written in a batch started by another job
        traceContext: context.active(),
      });
    } catch (err) {
      // the service talks to PostgreSQL, and to Redis only through a stamp buffer: report the outage to its server's watch
      if (isTransient(err)) (isRedisError(err) ? this.redisWatch : this.options.pgWatch)?.error(err);
      return this.handleFailure(job, token, err, ids, started);
    }
    this.options.pgWatch?.back();
    const durationMs = Math.round(performance.now() - started);
    if (result.outcome === 'rejected') {
      this.log.warn({ ...ids, eventId: result.eventId, outcome: 'rejected', code: result.code, durationMs }, result.message);
      this.options.onJob?.({ name: job.name, outcome: 'rejected', durationMs });
      throw new UnrecoverableError(`${result.code}: ${result.message}`);
    }
    await this.options.afterApply?.(job, result);
    this.options.onJob?.({
      name: job.name,
      outcome: result.outcome,
      durationMs,
      ...(result.outcome === 'applied' ? { transition: { from: result.from, to: result.to, reason: result.reason } } : {}),
    });
    const reason = result.reason;
    const level = result.outcome === 'noop' && (result.reason === 'stamped' || result.reason === 'buffered') ? 'debug' : 'info';
    if (this.log.isLevelEnabled(level)) {
      this.log[level]({ ...ids, eventId: result.eventId, outcome: result.outcome, reason, durationMs }, `${job.name} ${result.outcome}`);
    }
    return result;
  }

  private async handleFailure(
    job: Job,
    token: string | undefined,
    err: unknown,
    ids: Record<string, string | undefined>,
    started: number,
  ): Promise<ApplyResult> {
    const durationMs = Math.round(performance.now() - started);
    const code = err instanceof FleetError ? err.code : ((err as { code?: string }).code ?? 'error');
    const message = err instanceof Error ? err.message : String(err);
    const report = (outcome: JobOutcome) => this.options.onJob?.({ name: job.name, outcome, durationMs });
    if (err instanceof ValidationError) {
      this.log.warn({ ...ids, outcome: 'invalid', code, durationMs }, message);
      report('invalid');
      throw new UnrecoverableError(message);
    }
    const retries = Math.max(0, job.attemptsStarted - 1);
    if (err instanceof NotYetError && retries >= this.notYetRetries(STAMP_EVENTS.has(job.name))) {
      if (STAMP_EVENTS.has(job.name)) {
        // A stamp changes no state: one for something that still does not exist is dropped, not failed.
        this.log.info({ ...ids, outcome: 'noop', reason: 'not_found', code, retries, durationMs }, message);
        report('noop');
        const { eventId } = job.data as { eventId?: unknown };
        return {
          outcome: 'noop',
          eventId: typeof eventId === 'string' ? eventId : (job.id ?? ''),
          deploymentId: err.deploymentId,
          reason: 'not_found',
        };
      }
      // Any other event names a deployment or attempt whose create, had it been sent before it, would have been
      // applied by now: the producer's mistake. Failed at once (retrying it from Bull Board is safe), not an outage.
      const reason = `not_found: ${message.replace(/ \(yet\)$/, '')} after ${retries} retries`;
      this.log.warn({ ...ids, outcome: 'not_found', code, retries, durationMs }, reason);
      report('not_found');
      throw new UnrecoverableError(reason);
    }
    if (isTransient(err)) {
      // The budget counts this job's own retries, not time since enqueue: a job that waited out a long backlog
      // still gets its full ten minutes of retries.
      if (retries >= retriesWithin(this.options.retryBudgetMs ?? 10 * 60_000)) {
        this.log.error({ ...ids, outcome: 'gave_up', code, retries, durationMs }, message);
        report('gave_up');
        throw new UnrecoverableError(`${code}: still failing after ${retries} retries: ${message}`);
      }
      const delay = retryDelayMs(retries);
      this.log.info({ ...ids, outcome: 'retry', code, delayMs: delay, durationMs }, message);
      report('retry');
      try {
        await job.moveToDelayed(Date.now() + delay, token);
      } catch (moveErr) {
        // The lock was lost (Redis away longer than the lock): the stalled check hands the job out again.
        this.log.warn({ ...ids, err: moveErr }, 'could not delay the job; it will be picked up again when its lock expires');
      }
      throw new DelayedError();
    }
    this.log.error({ ...ids, outcome: 'error', err, durationMs }, message);
    report('error');
    throw err;
  }

  /** Retries of a "not yet" before its event ends `not_found` (a stamp's or another event's budget, never past the retry budget). */
  private notYetRetries(stamp: boolean): number {
    const budget = stamp ? (this.options.stampRetryBudgetMs ?? 30_000) : (this.options.notFoundRetryBudgetMs ?? 3 * 60_000);
    return Math.min(retriesWithin(budget), retriesWithin(this.options.retryBudgetMs ?? 10 * 60_000));
  }

  /**
   * Stops taking jobs and lets in-flight jobs finish for up to `graceMs` (default 30 s). Past that it stops
   * waiting and closes the connection: those jobs' locks expire and another worker runs them again (the
   * processed_events table keeps that safe). Safe to call twice.
   */
  close(graceMs = 30_000): Promise<void> {
    this.closing ??= (async () => {
      if (this.watchdogTimer !== null) clearInterval(this.watchdogTimer);
      if (this.redisWatch.isDown) {
        // nothing in flight can be acknowledged without Redis: do not wait for it (the jobs' locks expire and
        // another worker runs them again; processed_events keeps that safe)
        this.log.info(`${this.redisWatch.what} is away: stopping without waiting for in-flight jobs; they will run again`);
        await closeWithin(this.worker, 1000, true);
      } else if ((await closeWithin(this.worker, graceMs)) === 'timeout') {
        this.log.warn({ graceMs }, 'in-flight jobs did not finish in time; they will be retried');
      }
      this.options.stampBuffer?.absorbThrough(null);
      const { events, batches } = this.coalescer.totals();
      if (batches > 0) {
        this.log.info(
          { events, batches, meanBatch: Math.round((events / batches) * 10) / 10 },
          'group commit: events applied in batches since start',
        );
      }
      if (this.ownedConnection !== null) this.ownedConnection.disconnect();
    })();
    return this.closing;
  }
}

const HELD: Record<Held, string> = {
  paused: 'the queue is paused',
  at_concurrency: 'the queue is at its global concurrency',
  rate_limited: 'the queue is at its global rate limit',
  worker_paused: 'this worker is paused',
};

function idsOf(job: Job): Record<string, string | undefined> {
  const data: unknown = job.data;
  const pick = (key: string): string | undefined => {
    if (typeof data !== 'object' || data === null) return undefined;
    const value = (data as Record<string, unknown>)[key];
    return typeof value === 'string' ? value.slice(0, 200) : undefined;
  };
  return { jobId: job.id, name: job.name, deploymentId: pick('deploymentId'), attemptId: pick('attemptId') };
}
