/**
 * The sweep (docs/architecture.md, "Heartbeats, orphans, deadlines, dispatch"): one tick of fleet maintenance, run by the
 * `sweep` job scheduler once per FLEET_SWEEP_EVERY_S, fleet-wide.
 *
 * 1. Readiness: every `ready` deployment with a `node_port` endpoint is probed at `<endpoint_url>/ready` (bounded
 *    concurrency, short timeout, redirects never followed). Every 2xx is stamped `last_ready_at = now` in ONE
 *    UPDATE per tick. A failed probe changes nothing: the URL stays, the stamp ages, and dispatch falls back to
 *    the public endpoint once it is older than the window. Stamps are observations: they never bump `version`.
 * 2. Orphans: running attempts whose last heartbeat (or start, if none) is older than FLEET_ORPHAN_AFTER_S get an
 *    `attempt.orphaned` lifecycle job, declared as of the tick (the job's timestamp); the worker applies it only if
 *    no heartbeat produced since the cutoff has arrived meanwhile (else a noop `alive`).
 * 3. Deadlines: running attempts started more than FLEET_PROGRESS_DEADLINE_S ago get `attempt.expired`.
 *
 * Orphans and deadlines only enqueue ordinary lifecycle jobs with the SDK's deterministic eventIds; the lifecycle
 * worker applies them through the same idempotent path as producer events. A tick with nothing to do issues two
 * statements, each an index scan on a partial index whose size is the work, not the table.
 */
import * as http from 'node:http';
import * as https from 'node:https';
import type { DataSource } from 'typeorm';
import { Database, SWEEP_SQL, type ReadyRow } from '../entities/sql';
import { silentLogger, type Logger } from '../log';
import { endpointNotAllowed, type EndpointAllowList } from '../events/endpoint-allow';
import { SWEEP_ACTOR } from '../events/schemas';
import { deriveEventId, jobIdFor, type LifecycleProducer } from '../queues/producer';
import { NIL_UUID } from '../util';
import { isRedisError, type ServerWatch } from '../queues/redis';
import { isTransient } from '../errors';



export interface SweepResult {
  /** the tick's time (the injected clock, read once at the start), ISO 8601 */
  readonly at: string;
  /** readiness probes made */
  readonly probed: number;
  /** deployments whose `last_ready_at` this tick set to `at` */
  readonly stamped: number;
  /** probes that did not answer 2xx (stamp and URL left alone) */
  readonly failed: number;
  /** endpoints not probed because the tick's probe budget ran out (left alone; probed first next tick if fresh) */
  readonly skipped: number;
  /** ready node_port deployments whose stamp is now older than the window (or null): dispatch serves public */
  readonly stale: number;
  /** `attempt.orphaned` jobs enqueued */
  readonly orphaned: number;
  /** `attempt.expired` jobs enqueued */
  readonly expired: number;
  /** failed probes by reason (`http_503`, `timeout`, `refused`, `redirect`, ...) */
  readonly probeFailures: Readonly<Record<string, number>>;
  readonly durationMs: number;
}

/** Hooks for metrics (the monitoring issue counts stamped/stale/orphaned/expired and durations from these). */
export interface SweepMetrics {
  /** after every completed tick */
  readonly onSweep?: (result: SweepResult) => void;
  /** when a tick fails (the job fails; the next tick tries again) */
  readonly onSweepError?: (err: unknown) => void;
}

export interface SweeperOptions {
  /** the process's view of PostgreSQL: a tick failing for it is reported there once per outage (default: none) */
  readonly pgWatch?: ServerWatch;
  readonly dataSource: DataSource;
  /** enqueues `attempt.orphaned` / `attempt.expired` on the lifecycle queue */
  readonly producer: LifecycleProducer;
  /** the clock (default `() => new Date()`); read once per tick */
  readonly now?: () => Date;
  /** FLEET_READY_WINDOW_S (default 120): only used to count `stale` */
  readonly readyWindowS?: number;
  /** FLEET_ORPHAN_AFTER_S (default 90) */
  readonly orphanAfterS?: number;
  /** FLEET_PROGRESS_DEADLINE_S (default 1800) */
  readonly progressDeadlineS?: number;
  /** per-probe deadline, connect to response headers (default 2000 ms) */
  readonly probeTimeoutMs?: number;
  /** probes in flight at once (default 32) */
  readonly probeConcurrency?: number;
  /**
   * No new probe starts after this long into the tick (default 25 000 ms, under the default 30 s tick); the rest
   * count as `skipped`. Probes go freshest stamp first, so when endpoints hang en masse the healthy ones keep
   * their stamps and the dead ones wait.
   */
  readonly probeBudgetMs?: number;
  /** a monotonic clock in ms for the probe budget (default `performance.now`; tests inject one) */
  readonly elapsedMs?: () => number;
  /** rows per readiness page (default 5000) */
  readonly pageSize?: number;
  /** orphaned and expired attempts handled per tick, each (default 5000; the rest next tick) */
  readonly maxAttemptsPerTick?: number;
  readonly logger?: Logger;
  readonly metrics?: SweepMetrics;
  /**
   * FLEET_ENDPOINT_ALLOW: an endpoint outside it is never probed (failure `not_allowed`), so one stored before the
   * list was set or narrowed ages out of dispatch instead of being fetched (default: any)
   */
  readonly endpointAllow?: EndpointAllowList | null;
}

export class Sweeper {
  private readonly db: Database;
  private readonly producer: LifecycleProducer;
  private readonly now: () => Date;
  private readonly readyWindowMs: number;
  private readonly orphanAfterMs: number;
  private readonly progressDeadlineMs: number;
  private readonly probeTimeoutMs: number;
  private readonly probeConcurrency: number;
  private readonly probeBudgetMs: number;
  private readonly pageSize: number;
  private readonly maxAttempts: number;
  private readonly log: Logger;
  private readonly metrics: SweepMetrics;
  private readonly endpointAllow: EndpointAllowList | null;
  private readonly elapsedMs: () => number;
  /** the last tick failed for a server that was away (see `sweep`) */
  private serverAway = false;
  private readonly pgWatch: ServerWatch | undefined;

  constructor(options: SweeperOptions) {
    this.db = new Database(options.dataSource);
    this.producer = options.producer;
    this.now = options.now ?? (() => new Date());
    this.readyWindowMs = (options.readyWindowS ?? 120) * 1000;
    this.orphanAfterMs = (options.orphanAfterS ?? 90) * 1000;
    this.progressDeadlineMs = (options.progressDeadlineS ?? 1800) * 1000;
    this.probeTimeoutMs = options.probeTimeoutMs ?? 2000;
    this.probeConcurrency = Math.max(1, options.probeConcurrency ?? 32);
    this.probeBudgetMs = options.probeBudgetMs ?? 25_000;
    this.pageSize = Math.max(1, options.pageSize ?? 5000);
    this.maxAttempts = Math.max(1, options.maxAttemptsPerTick ?? 5000);
    this.log = (options.logger ?? silentLogger).child({ component: 'sweep' });
    this.metrics = options.metrics ?? {};
    this.endpointAllow = options.endpointAllow ?? null;
    this.elapsedMs = options.elapsedMs ?? (() => performance.now());
    this.pgWatch = options.pgWatch;
  }

  /**
   * One tick. Attempts (a quick query and an enqueue) and readiness (probes) run side by side; if either fails,
   * the other still finishes its work, then the tick throws the first error.
   */
  async sweep(): Promise<SweepResult> {
    const started = performance.now();
    const now = this.now();
    const [attempts, readiness] = await Promise.allSettled([this.sweepAttempts(now), this.sweepReadiness(now)]);
    if (attempts.status === 'rejected' || readiness.status === 'rejected') {
      const err: unknown = attempts.status === 'rejected' ? attempts.reason : (readiness as PromiseRejectedResult).reason;
      if (isTransient(err)) {
        if (!isRedisError(err)) this.pgWatch?.error(err);
        // a server away: one line when it starts, none while it lasts (no stack), one when a sweep works again
        if (!this.serverAway) this.log.warn({ at: now.toISOString(), code: (err as { code?: unknown }).code, reason: (err as Error).message }, 'sweep failed: a server is away; retrying every tick');
        this.serverAway = true;
      } else {
        if (attempts.status === 'rejected' && readiness.status === 'rejected') {
          this.log.error({ err: readiness.reason }, 'sweep: readiness failed too');
        }
        this.log.error({ err, at: now.toISOString() }, 'sweep failed');
      }
      this.metrics.onSweepError?.(err);
      throw err;
    }
    this.pgWatch?.back();
    if (this.serverAway) this.log.info('sweep works again');
    this.serverAway = false;
    const result: SweepResult = {
      at: now.toISOString(),
      ...readiness.value,
      ...attempts.value,
      durationMs: Math.round(performance.now() - started),
    };
    this.log.info(result, 'sweep');
    this.metrics.onSweep?.(result);
    return result;
  }

  private async sweepAttempts(now: Date): Promise<{ orphaned: number; expired: number }> {
    const orphanCutoff = new Date(now.getTime() - this.orphanAfterMs);
    const deadlineCutoff = new Date(now.getTime() - this.progressDeadlineMs);
    const { rows } = await this.db.run(SWEEP_SQL.dueAttempts, [orphanCutoff, deadlineCutoff, this.maxAttempts]);
    if (rows.length === 0) return { orphaned: 0, expired: 0 };

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
          this.log.warn({ jobId: job.opts.jobId, reason }, 'declared again: the attempt is due by this tick (do the sweep and the workers share FLEET_ORPHAN_AFTER_S, FLEET_PROGRESS_DEADLINE_S and a clock?)');
        }
      }
    }
    if (orphaned.length > 0) {
      this.log.warn({ attempts: orphaned.slice(0, 20).map((r) => r.id), count: orphaned.length }, 'orphaned attempts: heartbeats stopped');
    }
    if (expired.length > 0) {
      this.log.warn({ attempts: expired.slice(0, 20).map((r) => r.id), count: expired.length }, 'attempts past their progress deadline');
    }
    return { orphaned: orphaned.length, expired: expired.length };
  }

  private async sweepReadiness(
    now: Date,
  ): Promise<Pick<SweepResult, 'probed' | 'stamped' | 'failed' | 'skipped' | 'stale' | 'probeFailures'>> {
    const targets = await this.loadReadySet();
    // Freshest stamp first: if probes run out of budget, the endpoints being served now keep their stamps.
    targets.sort((a, b) => (b.last_ready_at?.getTime() ?? -Infinity) - (a.last_ready_at?.getTime() ?? -Infinity));

    const ok: ReadyRow[] = [];
    const probeFailures: Record<string, number> = {};
    const deadline = this.elapsedMs() + this.probeBudgetMs;
    let next = 0;
    const lane = async () => {
      while (next < targets.length && this.elapsedMs() < deadline) {
        const target = targets[next++];
        if (target === undefined) break;
        const outcome =
          endpointNotAllowed(target.endpoint_url, this.endpointAllow) === null
            ? await probeReady(target.endpoint_url, this.probeTimeoutMs)
            : ({ ok: false, reason: 'not_allowed' } as const);
        if (outcome.ok) ok.push(target);
        else probeFailures[outcome.reason] = (probeFailures[outcome.reason] ?? 0) + 1;
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.probeConcurrency, targets.length) }, lane));
    const probed = next;

    let stamped = 0;
    if (ok.length > 0) {
      const updated = await this.db.run(SWEEP_SQL.stamp, [now, ok.map((t) => t.id), ok.map((t) => t.endpoint_url)]);
      stamped = updated.affected;
    }

    const okIds = new Set(ok.map((t) => t.id));
    const cutoff = now.getTime() - this.readyWindowMs;
    const stale = targets.filter((t) => !okIds.has(t.id) && (t.last_ready_at === null || t.last_ready_at.getTime() < cutoff)).length;
    const failed = probed - ok.length;
    if (failed > 0) this.log.debug({ probeFailures }, 'readiness probes failed');
    return { probed, stamped, failed, skipped: targets.length - probed, stale, probeFailures };
  }

  /** The readiness set, page by page on the partial index; a set smaller than a page costs one query. */
  private async loadReadySet(): Promise<ReadyRow[]> {
    const all: ReadyRow[] = [];
    let after = NIL_UUID;
    for (;;) {
      const { rows: page } = await this.db.run(SWEEP_SQL.readyPage, [after, this.pageSize]);
      all.push(...page);
      const last = page[page.length - 1];
      if (page.length < this.pageSize || last === undefined) return all;
      after = last.id;
    }
  }
}

export type ProbeOutcome = { readonly ok: true } | { readonly ok: false; readonly reason: string };

/**
 * The probe URL: the endpoint's path joined with `ready` (`http://h:1/app/` -> `http://h:1/app/ready`), built with
 * the URL API so that nothing in the stored URL (a query, a fragment, credentials: refused at intake, but a row may
 * predate that) can change what is fetched. Throws on an unparsable URL.
 */
export function readinessUrl(endpointUrl: string): string {
  const url = new URL(endpointUrl);
  url.username = '';
  url.password = '';
  url.search = '';
  url.hash = '';
  url.pathname = `${url.pathname.replace(/\/+$/, '')}/ready`;
  return url.toString();
}

/**
 * GETs `<endpoint>/ready` once: ok on 2xx. A redirect is a failure and is never followed (so a probe can never be
 * sent to another host); so are other statuses, connection errors and anything slower than `timeoutMs` from start
 * to response headers. No connection reuse (no sockets outlive the probe) and the body is never read.
 */
export function probeReady(endpointUrl: string, timeoutMs: number): Promise<ProbeOutcome> {
  let url: URL;
  try {
    url = new URL(readinessUrl(endpointUrl));
  } catch {
    return Promise.resolve({ ok: false, reason: 'invalid_url' });
  }
  const client = url.protocol === 'http:' ? http : url.protocol === 'https:' ? https : null;
  if (client === null) return Promise.resolve({ ok: false, reason: 'invalid_url' });

  return new Promise<ProbeOutcome>((resolve) => {
    let settled = false;
    const finish = (outcome: ProbeOutcome) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      req.destroy();
      resolve(outcome);
    };
    const req = client.request(
      url,
      { method: 'GET', agent: false, headers: { 'user-agent': 'lifecycle-fleet-sweep', accept: '*/*', connection: 'close' } },
      (res) => {
        const status = res.statusCode ?? 0;
        res.destroy();
        if (status >= 200 && status < 300) finish({ ok: true });
        else finish({ ok: false, reason: status >= 300 && status < 400 ? 'redirect' : `http_${status}` });
      },
    );
    const timer = setTimeout(() => finish({ ok: false, reason: 'timeout' }), timeoutMs);
    req.on('error', (err: NodeJS.ErrnoException) => finish({ ok: false, reason: errorReason(err) }));
    req.end();
  });
}

function errorReason(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'ECONNREFUSED':
      return 'refused';
    case 'ECONNRESET':
    case 'EPIPE':
      return 'reset';
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return 'dns';
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
      return 'unreachable';
    default:
      return err.code?.startsWith('ERR_TLS') || err.code?.includes('CERT') ? 'tls' : 'error';
  }
}
