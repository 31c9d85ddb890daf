/**
 * The sweep (docs/architecture.md, "Heartbeats, orphans, deadlines, dispatch" and "Readiness probing"): one tick of
 * fleet maintenance, run by the `sweep` job scheduler once per FLEET_SWEEP_EVERY_S, fleet-wide.
 *
 * 1. Readiness: the tick reads the readiness set (every `ready` deployment with a `node_port` endpoint) least
 *    recently probed first and cuts it into shards. With a shard queue (every `fleet worker`), the shards become
 *    `probe` jobs on the maintenance queue that any worker process runs (`runShard`); without one (tests, tools),
 *    the tick runs them itself. A shard probes `<endpoint_url>/ready` (bounded concurrency per process, short
 *    timeout, redirects never followed) until the tick's probe deadline and stamps in ONE UPDATE: every probed
 *    row's `last_probed_at`, and `last_ready_at` where it answered 2xx. A failed probe changes nothing else: the
 *    URL stays, the stamp ages, and dispatch falls back to the public endpoint once it is older than the window.
 *    Stamps are observations: they never bump `version`. Least recently probed first is round-robin: every
 *    endpoint gets its turn whatever its last answer, and when the fleet's capacity falls short the tick says so
 *    (one warn line, and the counts in its result and metrics).
 * 2. Orphans: first the buffered heartbeats are written (`flushStamps`), then running attempts whose last heartbeat
 *    (or start, if none) is older than FLEET_ORPHAN_AFTER_S get an `attempt.orphaned` lifecycle job, declared as of
 *    the tick (the job's timestamp, on the fleet clock); the worker applies it only if no heartbeat stamped since
 *    the cutoff has arrived meanwhile (else a noop `alive`).
 * 3. Deadlines: running attempts started more than FLEET_PROGRESS_DEADLINE_S ago get `attempt.expired`.
 *
 * Orphans and deadlines only enqueue ordinary lifecycle jobs with the SDK's deterministic eventIds; the lifecycle
 * worker applies them through the same idempotent path as producer events. A tick with nothing to do issues two
 * statements, each an index scan on a partial index whose size is the work, not the table.
 */
import type { DataSource } from 'typeorm';
import { DEFAULTS } from '../../config';
import { Database, SWEEP_SQL } from '../../entities/sql';
import { cutoffsAt, type LivenessLimits } from '../../machine';
import { silentLogger, type Logger } from '../../log';
import type { EndpointAllowList } from '../../events/endpoint-allow';
import { SWEEP_ACTOR } from '../../events/schemas';
import { deriveEventId, jobIdFor, type LifecycleProducer } from '../../queues/producer';
import { isRedisError, type ServerWatch } from '../../redis/connection';
import { isLockConflict, isTransient } from '../../errors';
import {
  addTotals,
  cutShards,
  loadShard,
  ProbeLanes,
  probeShard,
  runShard,
  type ProbeTotals,
  type ShardJobData,
  type ShardReport,
  type ShardRunnerOptions,
} from '../readiness';

export { probeReady, readinessUrl, ProbeLanes, type ProbeOutcome, type ShardJobData, type ShardReport, type ProbeTotals } from '../readiness';

/** The name of a shard's job on the maintenance queue. */
export const PROBE_JOB_NAME = 'probe';

/** What every tick reports, however its shards ran. */
export interface SweepTick {
  /** the tick's time (the injected clock, read once at the start), ISO 8601 */
  readonly at: string;
  /** the tick's id: shard jobs are `probe-<tick>-<shard>` */
  readonly tick: string;
  /** the readiness set: ready deployments with a node_port endpoint */
  readonly endpoints: number;
  /** shards it was cut into */
  readonly shards: number;
  /**
   * Endpoints of the readiness set (ready for longer than a tick) that no probe reached during the last tick: more
   * than 0 means the fleet's probing capacity falls short of the set
   */
  readonly unprobedLastTick: number;
  /** probes made during the last tick: the fleet's capacity per tick whenever `unprobedLastTick` > 0 */
  readonly probedLastTick: number;
  /**
   * Probes per tick that keep every answering endpoint fresh: the set spread over the ticks of one window, less one
   * tick of slack (ceil(endpoints / max(1, floor(window / tick) - 1)))
   */
  readonly neededPerTick: number;
  /** buffered heartbeat and readiness stamps written to PostgreSQL before the attempts were read */
  readonly flushed: number;
  /** `attempt.orphaned` jobs enqueued */
  readonly orphaned: number;
  /** `attempt.expired` jobs enqueued */
  readonly expired: number;
  readonly durationMs: number;
}

/**
 * A tick's result. `queued`: its shards went to the maintenance queue as `probe` jobs, each reporting its own
 * probes; otherwise the tick ran them itself and reports their sum.
 */
export type SweepResult = SweepTick & ({ readonly queued: true } | ({ readonly queued: false } & ProbeTotals));

/** A tick's readiness part. */
type TickReadiness = Pick<SweepTick, 'endpoints' | 'shards' | 'unprobedLastTick' | 'probedLastTick' | 'neededPerTick'> &
  ({ readonly queued: true } | ({ readonly queued: false } & ProbeTotals));

/** Where a tick's shards go: the maintenance queue (a BullMQ `Queue`). */
export interface ShardQueue {
  addBulk(jobs: Array<{ name: string; data: ShardJobData; opts: ShardJobOptions }>): Promise<unknown>;
}

export interface ShardJobOptions {
  readonly jobId: string;
  readonly priority: number;
  readonly attempts: number;
  readonly removeOnComplete: { readonly age: number; readonly count: number };
  readonly removeOnFail: { readonly age: number; readonly count: number };
}

/**
 * Options of every `probe` job. Prioritized, so a tick's own job (not prioritized: BullMQ takes the waiting list
 * first) never waits behind a backlog of shards; equal priorities run in the order added. No retries: a shard that
 * failed is not run again (the next tick probes what it missed first). Finished shards are kept an hour, bounded.
 */
export const PROBE_JOB_OPTIONS = Object.freeze({
  priority: 1,
  attempts: 1,
  removeOnComplete: Object.freeze({ age: 3600, count: 2000 }),
  removeOnFail: Object.freeze({ age: 24 * 3600, count: 1000 }),
});

/** Hooks for metrics. */
export interface SweepMetrics {
  /** after every completed tick */
  readonly onSweep?: (result: SweepResult) => void;
  /** when a tick fails (the job fails; the next tick tries again) */
  readonly onSweepError?: (err: unknown) => void;
  /** after every shard this process ran (in a tick, or as a `probe` job) */
  readonly onShard?: (report: ShardReport) => void;
}

export interface SweeperOptions {
  /** the process's view of PostgreSQL: a tick failing for it is reported there once per outage (default: none) */
  readonly pgWatch?: ServerWatch;
  readonly dataSource: DataSource;
  /** enqueues `attempt.orphaned` / `attempt.expired` on the lifecycle queue */
  readonly producer: LifecycleProducer;
  /** where the tick's shards go; without it the tick runs them itself */
  readonly shardQueue?: ShardQueue;
  /**
   * Writes the buffered heartbeat and readiness stamps (the stamp buffer's flush), run at the start of every tick
   * before the attempts are read; resolves to how many it wrote. A tick whose flush fails reads no attempts.
   */
  readonly flushStamps?: (now: Date) => Promise<number>;
  /** the clock (default `() => new Date()`): read once per tick, and by shards at each probe's start */
  readonly now?: () => Date;
  /** FLEET_SWEEP_EVERY_S (default 30): what "the last tick" means in the capacity counts */
  readonly everyS?: number;
  /** FLEET_READY_WINDOW_S (default 120) */
  readonly readyWindowS?: number;
  /** FLEET_ORPHAN_AFTER_S (default 90) */
  readonly orphanAfterS?: number;
  /** FLEET_PROGRESS_DEADLINE_S (default 1800) */
  readonly progressDeadlineS?: number;
  /** per-probe deadline, connect to response headers (default 2000 ms) */
  readonly probeTimeoutMs?: number;
  /** FLEET_PROBE_CONCURRENCY: probes in flight at once in this process, over all its shards (default 64) */
  readonly probeConcurrency?: number;
  /**
   * No probe starts later than this into the tick (default 80% of the tick); the rest stay unprobed and, being now
   * the least recently probed, go first next tick.
   */
  readonly probeBudgetMs?: number;
  /** endpoints per shard (default `DEFAULT_SHARD_SIZE`, 500) */
  readonly shardSize?: number;
  /** orphaned and expired attempts handled per tick, each (default 5000; the rest next tick) */
  readonly maxAttemptsPerTick?: number;
  readonly logger?: Logger;
  readonly metrics?: SweepMetrics;
  /**
   * FLEET_ENDPOINT_ALLOW: an endpoint outside it, or one whose URL breaks the endpoint URL rules, is never probed
   * (failure `not_allowed`), so one stored before the list was set or narrowed (or before the rules) ages out of
   * dispatch instead of being fetched (default: any host)
   */
  readonly endpointAllow?: EndpointAllowList | null;
}

/** FLEET_PROBE_CONCURRENCY's default (docs/contract.md; chosen by `npm run bench -- --only scale`). */
export const DEFAULT_PROBE_CONCURRENCY = 64;
/** Endpoints per probe shard: each shard stamps them with one UPDATE (docs/architecture.md, "One UPDATE per shard"). */
export const DEFAULT_SHARD_SIZE = 500;

export class Sweeper {
  private readonly db: Database;
  private readonly producer: LifecycleProducer;
  private readonly shardQueue: ShardQueue | null;
  private readonly flushStamps: ((now: Date) => Promise<number>) | undefined;
  private readonly now: () => Date;
  private readonly tickMs: number;
  private readonly readyWindowMs: number;
  private readonly limits: LivenessLimits;
  private readonly probeTimeoutMs: number;
  private readonly probeBudgetMs: number;
  private readonly shardSize: number;
  private readonly maxAttempts: number;
  private readonly log: Logger;
  private readonly metrics: SweepMetrics;
  private readonly endpointAllow: EndpointAllowList | null;
  /** this process's probe lanes, shared by every shard it runs */
  readonly lanes: ProbeLanes;
  /** the last tick failed for a server that was away (see `sweep`) */
  private serverAway = false;
  private readonly pgWatch: ServerWatch | undefined;

  constructor(options: SweeperOptions) {
    this.db = new Database(options.dataSource);
    this.producer = options.producer;
    this.shardQueue = options.shardQueue ?? null;
    this.flushStamps = options.flushStamps;
    this.now = options.now ?? (() => new Date());
    this.tickMs = (options.everyS ?? 30) * 1000;
    this.readyWindowMs = (options.readyWindowS ?? 120) * 1000;
    this.limits = {
      orphanAfterS: options.orphanAfterS ?? DEFAULTS.orphanAfterS,
      progressDeadlineS: options.progressDeadlineS ?? DEFAULTS.progressDeadlineS,
    };
    this.probeTimeoutMs = options.probeTimeoutMs ?? 2000;
    this.lanes = new ProbeLanes(Math.max(1, options.probeConcurrency ?? DEFAULT_PROBE_CONCURRENCY));
    this.probeBudgetMs = options.probeBudgetMs ?? Math.max(1000, this.tickMs * 0.8);
    this.shardSize = Math.max(1, options.shardSize ?? DEFAULT_SHARD_SIZE);
    this.maxAttempts = Math.max(1, options.maxAttemptsPerTick ?? 5000);
    this.log = (options.logger ?? silentLogger).child({ component: 'sweep' });
    this.metrics = options.metrics ?? {};
    this.endpointAllow = options.endpointAllow ?? null;
    this.pgWatch = options.pgWatch;
  }

  /**
   * One tick. Attempts (a flush, a quick query and an enqueue) and readiness (planning, and probing when there is
   * no shard queue) run side by side; if either fails, the other still finishes its work, then the tick throws the
   * first error. `tick` names the tick's shard jobs (default: the clock's time in ms); a tick run again under the
   * same name adds no shard twice.
   */
  async sweep(tick?: string): Promise<SweepResult> {
    const started = performance.now();
    const now = this.now();
    const tickId = tick ?? String(now.getTime());
    const [attempts, readiness] = await Promise.allSettled([this.sweepAttempts(now), this.sweepReadiness(now, tickId)]);
    if (attempts.status === 'rejected' || readiness.status === 'rejected') {
      const failures = [
        ...(attempts.status === 'rejected' ? [{ part: 'attempts' as const, err: attempts.reason as unknown }] : []),
        ...(readiness.status === 'rejected' ? [{ part: 'readiness' as const, err: readiness.reason as unknown }] : []),
      ];
      this.reportFailures(failures, now);
      const err = failures[0]?.err;
      this.metrics.onSweepError?.(err);
      throw err;
    }
    this.pgWatch?.back();
    if (this.serverAway) this.log.info('sweep works again');
    this.serverAway = false;
    const base = { at: now.toISOString(), tick: tickId, ...attempts.value, durationMs: Math.round(performance.now() - started) };
    const result: SweepResult = readiness.value.queued ? { ...base, ...readiness.value } : { ...base, ...readiness.value };
    this.log.info(result, 'sweep');
    this.metrics.onSweep?.(result);
    return result;
  }

  /**
   * Says why a tick failed, each failure by its own kind: a server away (one line when it starts, none while it
   * lasts, no stack; PostgreSQL's also to the watch), a bug (an error with its stack), and a lock conflict only when
   * it is all that failed (PostgreSQL is there: a write lost on each of its tries, retryLockConflicts).
   */
  private reportFailures(failures: ReadonlyArray<{ readonly part: 'attempts' | 'readiness'; readonly err: unknown }>, now: Date): void {
    const at = now.toISOString();
    const briefly = ({ part, err }: (typeof failures)[number]) => ({
      at,
      part,
      code: (err as { code?: unknown }).code,
      reason: (err as Error).message,
    });
    const conflicts = failures.filter((f) => isLockConflict(f.err));
    const away = failures.filter((f) => !isLockConflict(f.err) && isTransient(f.err));
    const bugs = failures.filter((f) => !isLockConflict(f.err) && !isTransient(f.err));
    for (const { part, err } of bugs) this.log.error({ err, at, part }, 'sweep failed');
    const [firstAway] = away;
    if (firstAway !== undefined) {
      const pgAway = away.find((f) => !isRedisError(f.err));
      if (pgAway !== undefined) this.pgWatch?.error(pgAway.err);
      if (!this.serverAway) this.log.warn(briefly(firstAway), 'sweep failed: a server is away; retrying every tick');
      this.serverAway = true;
    }
    const [conflict] = conflicts;
    if (conflict !== undefined && conflicts.length === failures.length) {
      this.log.warn(briefly(conflict), 'sweep failed: a lock conflict (deadlock) lost on every try; the next tick tries again');
    }
  }

  /**
   * Runs one shard of a tick in this process (a `probe` job's work): probes until the shard's deadline, one UPDATE.
   * The caller makes sure a shard runs once (the sweep worker claims it first).
   */
  async runShard(data: ShardJobData): Promise<ShardReport> {
    return this.reported(data, await runShard(this.shardRunner(), data));
  }

  private shardRunner(): ShardRunnerOptions {
    return {
      db: this.db,
      lanes: this.lanes,
      now: this.now,
      probeTimeoutMs: this.probeTimeoutMs,
      readyWindowMs: this.readyWindowMs,
      endpointAllow: this.endpointAllow,
      log: this.log,
    };
  }

  private reported(data: ShardJobData, report: ShardReport): ShardReport {
    this.metrics.onShard?.(report);
    if (report.ran === 'late')
      this.log.debug({ tick: data.tick, shard: data.shard, endpoints: report.endpoints }, 'probe shard taken after its deadline: skipped');
    return report;
  }

  private async sweepAttempts(now: Date): Promise<{ flushed: number; orphaned: number; expired: number }> {
    // heartbeats absorbed in Redis first: an attempt whose latest heartbeat is not in PostgreSQL yet is alive
    const flushed = this.flushStamps === undefined ? 0 : await this.flushStamps(now);
    const { deadBefore, startedBefore } = cutoffsAt(now, this.limits);
    const { rows } = await this.db.run(SWEEP_SQL.dueAttempts, [deadBefore, startedBefore, this.maxAttempts]);
    if (rows.length === 0) return { flushed, orphaned: 0, expired: 0 };

    // Past its deadline is definite (failed); an attempt that is both gets only attempt.expired.
    const expired = rows.filter((r) => r.kind === 'expired');
    const expiredIds = new Set(expired.map((r) => r.id));
    const orphaned = rows.filter((r) => r.kind === 'orphaned' && !expiredIds.has(r.id));
    const jobs = [...expired, ...orphaned].map((r) => {
      const name = r.kind === 'expired' ? ('attempt.expired' as const) : ('attempt.orphaned' as const);
      // The jobId is the eventId: re-finding the same attempt next tick (its job not applied yet) adds nothing. An
      // orphan's id names the liveness it was declared for: if a heartbeat proves the runner alive (a noop
      // `alive`), a later death gets an id of its own and is not taken for the earlier one.
      const derived = deriveEventId(name, { deploymentId: r.deployment_id, attemptId: r.id });
      const eventId = r.kind === 'orphaned' ? `${derived}.${r.liveness_at.getTime()}` : derived;
      return {
        name,
        data: { deploymentId: r.deployment_id, attemptId: r.id, eventId, actor: SWEEP_ACTOR },
        // declared now, by this tick's clock: the worker judges the attempt as of then (heartbeats that waited
        // behind this job in a backlog still count)
        opts: { jobId: jobIdFor(eventId), timestamp: now.getTime() },
      };
    });
    for (let i = 0; i < jobs.length; i += 500) {
      await this.producer.queue.addBulk(jobs.slice(i, i + 500));
    }
    // A job with the same id that failed (say it gave up during a long outage) is kept for days, and adding it
    // again does nothing: retry it instead, or the attempt would stay deploying.
    // An earlier job of the same id that completed as "not yet" (`alive`, `not_due`: clocks or settings disagreed)
    // is done as well: add it again, since the attempt is due now.
    for (const job of jobs) {
      const state = await this.producer.queue.getJobState(job.opts.jobId);
      if (state === 'failed') {
        await (await this.producer.queue.getJob(job.opts.jobId))?.retry('failed');
        this.log.warn({ jobId: job.opts.jobId }, 'retried an earlier failed sweep job for an attempt that is still due');
      } else if (state === 'completed') {
        const earlier = await this.producer.queue.getJob(job.opts.jobId);
        const reason = (earlier?.returnvalue as { reason?: unknown } | undefined)?.reason;
        if (earlier !== undefined && (reason === 'alive' || reason === 'not_due')) {
          await earlier.remove();
          await this.producer.queue.add(job.name, job.data, job.opts);
          this.log.warn(
            { jobId: job.opts.jobId, reason },
            'declared again: the attempt is due by this tick (do the sweep and the workers share FLEET_ORPHAN_AFTER_S, FLEET_PROGRESS_DEADLINE_S and a clock?)',
          );
        }
      }
    }
    if (orphaned.length > 0) {
      this.log.warn({ attempts: orphaned.slice(0, 20).map((r) => r.id), count: orphaned.length }, 'orphaned attempts: heartbeats stopped');
    }
    if (expired.length > 0) {
      this.log.warn({ attempts: expired.slice(0, 20).map((r) => r.id), count: expired.length }, 'attempts past their progress deadline');
    }
    return { flushed, orphaned: orphaned.length, expired: expired.length };
  }

  private async sweepReadiness(now: Date, tick: string): Promise<TickReadiness> {
    const { rows } = await this.db.run(SWEEP_SQL.readySet, []);
    const lastTick = now.getTime() - this.tickMs;
    // ready for longer than a tick: it could have been probed during the last one
    const due = rows.filter((r) => r.state_changed_at.getTime() < lastTick);
    const probedLastTick = rows.filter((r) => r.last_probed_at !== null && r.last_probed_at.getTime() >= lastTick).length;
    const unprobedLastTick = due.filter((r) => r.last_probed_at === null || r.last_probed_at.getTime() < lastTick).length;
    const ticksPerWindow = Math.floor(this.readyWindowMs / this.tickMs);
    const neededPerTick = Math.ceil(rows.length / Math.max(1, ticksPerWindow - 1));
    if (unprobedLastTick > 0) {
      this.log.warn(
        { endpoints: rows.length, unprobedLastTick, probedLastTick, neededPerTick, probeConcurrency: this.lanes.size },
        `readiness probing fell short: ${unprobedLastTick} of ${rows.length} endpoints were not probed during the last tick ` +
          `(${probedLastTick} probes; about ${neededPerTick} per tick keep every endpoint fresh): add fleet worker processes or raise FLEET_PROBE_CONCURRENCY`,
      );
    }
    const facts = { endpoints: rows.length, unprobedLastTick, probedLastTick, neededPerTick };
    const deadline = now.getTime() + this.probeBudgetMs;
    const shards: ShardJobData[] = cutShards(
      rows.map((r) => r.id),
      this.shardSize,
    ).map((ids, shard) => ({ tick, shard, at: now.toISOString(), deadline, ids }));

    if (this.shardQueue !== null) {
      for (let i = 0; i < shards.length; i += 100) {
        await this.shardQueue.addBulk(
          shards.slice(i, i + 100).map((data) => ({ name: PROBE_JOB_NAME, data, opts: { ...PROBE_JOB_OPTIONS, jobId: shardJobId(data) } })),
        );
      }
      return { ...facts, shards: shards.length, queued: true as const };
    }
    // every shard's rows first, then all probe together: the lanes go to the lowest shards first
    const runner = this.shardRunner();
    const loaded = await Promise.all(shards.map((data) => loadShard(runner, data)));
    const reports = await Promise.all(
      shards.map((data, i) => probeShard(runner, data, loaded[i] ?? []).then((report) => this.reported(data, report))),
    );
    const totals = addTotals(reports);
    return { ...facts, shards: shards.length, queued: false as const, ...totals, endpoints: rows.length };
  }
}

/** A shard's job id: one per tick and shard, so a tick planned twice adds each shard once. */
export function shardJobId(data: Pick<ShardJobData, 'tick' | 'shard'>): string {
  return `probe-${data.tick}-${data.shard}`;
}
