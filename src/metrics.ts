/**
 * Prometheus metrics (prom-client), one registry per process: the components report through small hooks, and
 * gauges that need I/O (queue depths, relay lag) are read when /metrics is scraped.
 */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Logger } from './log';
import { settleWithin } from './util';

/**
 * The values of the labels that dashboards and alerts select on (docs/grafana, docs/prometheus): a test holds
 * their expressions to these.
 */
export type JobOutcome = 'applied' | 'noop' | 'rejected' | 'invalid' | 'not_found' | 'retry' | 'gave_up' | 'error';
/** `fleet_sweep_results_total{result}`: the probe totals of a shard, and the attempts a tick found */
export type SweepResult = keyof ShardMetricsReport | 'orphaned' | 'expired';
/** `fleet_readiness_endpoints{measure}` */
export type ReadinessMeasure = 'set' | 'unprobed_last_tick' | 'probed_last_tick' | 'needed_per_tick';

export interface JobReport {
  readonly name: string;
  readonly outcome: JobOutcome;
  readonly durationMs: number;
  /** for applied transitions */
  readonly transition?: { readonly from: string | null; readonly to: string; readonly reason: string };
}

/** A tick, as the process that ran it saw it. */
export interface SweepReport {
  readonly endpoints: number;
  readonly unprobedLastTick: number;
  readonly probedLastTick: number;
  readonly neededPerTick: number;
  readonly orphaned: number;
  readonly expired: number;
  readonly durationMs: number;
}

/** A readiness shard this process ran. */
export interface ShardMetricsReport {
  readonly probed: number;
  readonly stamped: number;
  readonly failed: number;
  readonly unprobed: number;
  readonly stale: number;
}

/** A partition of the transition stream at scrape time, with its consumer groups (src/streams/stream-stats.ts). */
export interface PartitionStats {
  readonly partition: number;
  readonly length: number;
  readonly groups: ReadonlyArray<{
    readonly group: string;
    /** entries not yet delivered to the group plus those delivered and not acknowledged; null when Redis cannot tell */
    readonly lag: number | null;
    /** the consumer holding the group's lease on the partition, null when none does */
    readonly owner: string | null;
  }>;
}

/** The reads a scrape makes, each for the gauges it feeds (FleetMetricsSources). */
export type ScrapeRead = 'queue_counts' | 'relay_lag' | 'stream_partitions';

/**
 * How long a scrape waits for one of its reads: a dead primary or a silent Redis costs a scrape this much, never
 * Prometheus's scrape timeout (10 s by default), and /readyz calls a server failing after as long.
 */
export const SCRAPE_READ_TIMEOUT_MS = 2000;

export interface FleetMetricsSources {
  /** job counts per state for each queue, read at scrape time */
  readonly queueCounts?: () => Promise<Record<string, Record<string, number>>>;
  /** age of the oldest unpublished outbox row, read at scrape time */
  readonly relayLagSeconds?: () => Promise<number>;
  /**
   * the transition stream's partitions with their consumer groups, read at scrape time (once for the three gauges
   * it feeds); series: P (at most 1024) for the length, P per group for the lag and the owner
   */
  readonly streamPartitions?: () => Promise<readonly PartitionStats[]>;
  /**
   * whether this process reaches PostgreSQL (the last statement any of its components ran worked), asked once this
   * scrape's own PostgreSQL read (`relayLagSeconds`) has worked, failed or timed out: `fleet_postgres_up`
   */
  readonly postgresUp?: () => boolean;
  /**
   * How the scrape-time reads went. A read that fails, or has no answer within SCRAPE_READ_TIMEOUT_MS (an error
   * with code ETIMEDOUT, which `isTransient` counts as a server away), leaves its gauges' series out of that
   * scrape and the rest is served; `failed` says why (once per waiting scrape). A read that answers after its
   * scrape gave up on it still reports `worked`. Default: not reported.
   */
  readonly reads?: {
    worked(read: ScrapeRead): void;
    failed(read: ScrapeRead, err: unknown): void;
  };
}

/** A server's outage watch as the scrape reports to it (ServerWatch, src/redis/connection.ts). */
export interface ReadWatch {
  /** true when `err` says the server is away (reported there, once per outage) */
  error(err: unknown): boolean;
  back(): void;
}

/**
 * The scrape's reads reported to the watch of the server each reads: a statement that works says PostgreSQL is
 * there (`fleet_postgres_up` 1, and "is back" after an outage), one that cannot reach it says it is lost, once per
 * outage. Any other failure (a bug, a refused statement) is logged once until that read works again.
 */
export function watchedReads(watches: Record<ScrapeRead, ReadWatch>, logger: Logger): NonNullable<FleetMetricsSources['reads']> {
  const failing = new Set<ScrapeRead>();
  return {
    worked: (read) => {
      failing.delete(read);
      watches[read].back();
    },
    failed: (read, err) => {
      if (watches[read].error(err) || failing.has(read)) return;
      failing.add(read);
      logger.warn({ err, read }, 'a metrics read failed; its series are left out of /metrics until it works');
    },
  };
}

export class FleetMetrics {
  readonly registry = new Registry();
  private readonly transitions: Counter<'from' | 'to' | 'reason'>;
  private readonly jobs: Counter<'name' | 'outcome'>;
  private readonly jobDuration: Histogram<'name'>;
  private readonly jobCounters = new Map<string, ReturnType<Counter<'name' | 'outcome'>['labels']>>();
  private readonly jobDurations = new Map<string, ReturnType<Histogram<'name'>['labels']>>();
  private readonly published: Counter;
  private readonly sweepResults: Counter<'result'>;
  private readonly sweepDuration: Histogram;
  private readonly dispatch: Counter<'source' | 'reason'>;
  private readonly readiness: Gauge<'measure'>;
  private readonly unprobedTotal: Counter;
  private readonly watchers: Gauge;
  private readonly watchOverflows: Counter;

  constructor(sources: FleetMetricsSources = {}, options: { defaultMetrics?: boolean } = {}) {
    const registers = [this.registry];
    if (options.defaultMetrics ?? true) collectDefaultMetrics({ register: this.registry, prefix: 'fleet_' });
    this.transitions = new Counter({
      name: 'fleet_transitions_total',
      help: 'Applied state transitions by this process',
      labelNames: ['from', 'to', 'reason'],
      registers,
    });
    this.jobs = new Counter({
      name: 'fleet_jobs_total',
      help: 'Lifecycle jobs processed, by job name and outcome',
      labelNames: ['name', 'outcome'],
      registers,
    });
    this.jobDuration = new Histogram({
      name: 'fleet_job_duration_seconds',
      help: 'Lifecycle job processing time',
      labelNames: ['name'],
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers,
    });
    this.published = new Counter({
      name: 'fleet_outbox_published_total',
      help: 'Transitions published on the stream by this process',
      registers,
    });
    this.sweepResults = new Counter({
      name: 'fleet_sweep_results_total',
      help: 'Sweep results: readiness probes (probed, stamped, failed, unprobed: left for the next tick, stale) by the shards this process ran; orphaned and expired attempts by the ticks it ran',
      labelNames: ['result'],
      registers,
    });
    this.sweepDuration = new Histogram({
      name: 'fleet_sweep_duration_seconds',
      help: 'Sweep tick duration',
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers,
    });
    this.readiness = new Gauge({
      name: 'fleet_readiness_endpoints',
      help:
        'Readiness probing as the latest tick this process ran saw it (aggregate with max): measure="set" the ready node_port endpoints, ' +
        '"unprobed_last_tick" those no probe reached during the last tick (> 0: capacity falls short), "probed_last_tick" the probes made then, ' +
        '"needed_per_tick" the probes per tick that keep every answering endpoint fresh',
      labelNames: ['measure'],
      registers,
    });
    this.unprobedTotal = new Counter({
      name: 'fleet_readiness_unprobed_total',
      help: 'Endpoints no probe reached during a tick, summed over the ticks this process ran (fleet-wide: sum over processes)',
      registers,
    });
    this.dispatch = new Counter({
      name: 'fleet_dispatch_total',
      help: 'Dispatch answers by source and reason',
      labelNames: ['source', 'reason'],
      registers,
    });
    this.watchers = new Gauge({ name: 'fleet_watchers', help: 'Watches open on this process (GET /api/watch)', registers });
    this.watchOverflows = new Counter({
      name: 'fleet_watch_overflows_total',
      help: 'Watches this process closed with `event: overflow`: the client read too slowly (more than the bound unsent)',
      registers,
    });
    this.scrapedGauges(sources, registers);
  }

  /**
   * The gauges read when /metrics is scraped, from the sources given (none: no such gauge). A read that fails or
   * is late leaves its series out of the scrape rather than failing it (prom-client collects every metric at once,
   * and one rejected collect fails the whole scrape) or repeating an old value as current: an absent series is
   * what Prometheus's staleness handling and `absent()` understand as "not known now".
   */
  private scrapedGauges(sources: FleetMetricsSources, registers: Registry[]): void {
    const queueCounts = sources.queueCounts === undefined ? undefined : this.scrapeRead('queue_counts', sources.queueCounts, sources.reads);
    if (queueCounts !== undefined) {
      new Gauge({
        name: 'fleet_queue_jobs',
        help: 'Jobs per queue and state (no series: Redis did not answer this scrape)',
        labelNames: ['queue', 'state'],
        registers,
        async collect() {
          const read = await queueCounts();
          this.reset();
          for (const [queue, counts] of Object.entries(read ?? {})) {
            for (const [state, n] of Object.entries(counts)) this.set({ queue, state }, n);
          }
        },
      });
    }
    const lag = sources.relayLagSeconds === undefined ? undefined : this.scrapeRead('relay_lag', sources.relayLagSeconds, sources.reads);
    if (lag !== undefined) {
      new Gauge({
        name: 'fleet_outbox_lag_seconds',
        help: 'Age of the oldest transition not yet published on the stream (0 when none; no series: PostgreSQL did not answer this scrape)',
        registers,
        async collect() {
          const seconds = await lag();
          // an unlabelled gauge's reset() sets 0, which would say "nothing waits": remove the series instead
          if (seconds === undefined) this.remove();
          else this.set(seconds);
        },
      });
    }
    const postgresUp = sources.postgresUp;
    if (postgresUp !== undefined) {
      new Gauge({
        name: 'fleet_postgres_up',
        help: "1 while this process reaches PostgreSQL (its last statement worked, this scrape's own read included), 0 while it cannot",
        registers,
        async collect() {
          await lag?.();
          this.set(postgresUp() ? 1 : 0);
        },
      });
    }
    if (sources.streamPartitions !== undefined)
      this.partitionGauges(this.scrapeRead('stream_partitions', sources.streamPartitions, sources.reads), registers);
  }

  /**
   * A read for the scrape's gauges: one at a time (the gauges it feeds, and a scrape that finds the previous
   * scrape's read still waiting on a dead server, share it rather than stack another on the pool), each caller
   * waiting at most SCRAPE_READ_TIMEOUT_MS. Resolves to undefined when the read failed or is late.
   */
  private scrapeRead<T>(name: ScrapeRead, read: () => Promise<T>, reads: FleetMetricsSources['reads']): () => Promise<T | undefined> {
    let inFlight: Promise<T> | null = null;
    return async () => {
      if (inFlight === null) {
        const started: Promise<T> = read()
          .then(
            (value) => {
              reads?.worked(name);
              return value;
            },
            (err: unknown) => {
              reads?.failed(name, err);
              throw err;
            },
          )
          .finally(() => {
            if (inFlight === started) inFlight = null;
          });
        inFlight = started;
      }
      const current = inFlight;
      try {
        if ((await settleWithin(current, SCRAPE_READ_TIMEOUT_MS)) === 'timeout') {
          reads?.failed(name, Object.assign(new Error(`no answer within ${SCRAPE_READ_TIMEOUT_MS} ms (${name})`), { code: 'ETIMEDOUT' }));
          return undefined;
        }
        return await current;
      } catch {
        return undefined; // reported as it failed
      }
    };
  }

  /** The partition gauges, from one read per scrape (they are collected at once). */
  private partitionGauges(shared: () => Promise<readonly PartitionStats[] | undefined>, registers: Registry[]): void {
    new Gauge({
      name: 'fleet_stream_partition_length',
      help: "Entries retained by each partition of the transition stream (partition 0 of 1: the stream's base key)",
      labelNames: ['partition'],
      registers,
      async collect() {
        const stats = (await shared()) ?? [];
        this.reset();
        for (const p of stats) this.set({ partition: String(p.partition) }, p.length);
      },
    });
    new Gauge({
      name: 'fleet_stream_group_lag',
      help: 'Per consumer group and partition: entries not yet delivered to the group plus those delivered and not acknowledged (absent when Redis cannot tell, after XDEL)',
      labelNames: ['group', 'partition'],
      registers,
      async collect() {
        const stats = (await shared()) ?? [];
        this.reset();
        for (const p of stats) for (const g of p.groups) if (g.lag !== null) this.set({ group: g.group, partition: String(p.partition) }, g.lag);
      },
    });
    new Gauge({
      name: 'fleet_stream_partition_owner',
      help: "1 for the consumer holding a group's lease on a partition (no series: no consumer owns it)",
      labelNames: ['group', 'partition', 'consumer'],
      registers,
      async collect() {
        const stats = (await shared()) ?? [];
        this.reset();
        for (const p of stats) {
          for (const g of p.groups) if (g.owner !== null) this.set({ group: g.group, partition: String(p.partition), consumer: g.owner }, 1);
        }
      },
    });
  }

  job(report: JobReport): void {
    // the labelled children are looked up once per name (and outcome): this runs for every job
    const key = `${report.name}\u0000${report.outcome}`;
    let count = this.jobCounters.get(key);
    if (count === undefined) {
      count = this.jobs.labels({ name: report.name, outcome: report.outcome });
      this.jobCounters.set(key, count);
    }
    count.inc();
    let duration = this.jobDurations.get(report.name);
    if (duration === undefined) {
      duration = this.jobDuration.labels({ name: report.name });
      this.jobDurations.set(report.name, duration);
    }
    duration.observe(report.durationMs / 1000);
    const t = report.transition;
    if (t !== undefined) this.transitions.inc({ from: t.from ?? '', to: t.to, reason: t.reason });
  }

  publishedCount(count: number): void {
    this.published.inc(count);
  }

  sweep(report: SweepReport): void {
    const measures: Record<ReadinessMeasure, number> = {
      set: report.endpoints,
      unprobed_last_tick: report.unprobedLastTick,
      probed_last_tick: report.probedLastTick,
      needed_per_tick: report.neededPerTick,
    };
    for (const [measure, value] of Object.entries(measures)) this.readiness.set({ measure }, value);
    this.unprobedTotal.inc(report.unprobedLastTick);
    const attempts: Record<Extract<SweepResult, 'orphaned' | 'expired'>, number> = { orphaned: report.orphaned, expired: report.expired };
    for (const [result, n] of Object.entries(attempts)) this.sweepResults.inc({ result }, n);
    this.sweepDuration.observe(report.durationMs / 1000);
  }

  shard(report: ShardMetricsReport): void {
    for (const result of ['probed', 'stamped', 'failed', 'unprobed', 'stale'] as const) this.sweepResults.inc({ result }, report[result]);
  }

  dispatched(source: string, reason: string): void {
    this.dispatch.inc({ source, reason });
  }

  /** A watch opened (+1) or ended (-1). */
  watching(delta: 1 | -1): void {
    this.watchers.inc(delta);
  }

  watchOverflowed(): void {
    this.watchOverflows.inc();
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
