/**
 * Scenario 1: end-to-end throughput, enqueue -> committed transition -> stream entry, one worker process, several
 * concurrencies; baselines (a) direct pg, (b) BullMQ no-op, (c) naive TypeORM save(), all on the same services.
 */
import { log, round } from '../lib/common';
import type { BenchServices } from '../lib/services';
import { cpuGroups, runWorkerLevel, type WorkerKind, type WorkerRun } from '../lib/workers';
import { runDirect, seedReadyDeployments, withClient, type DirectRun, type DirectVariant } from '../lib/workload';

export interface ThroughputOptions {
  readonly concurrencies: readonly number[];
  readonly directConcurrencies: readonly number[];
  /** measured events per level (after the warm-up) */
  readonly events: (concurrency: number) => number;
  readonly warmup: number;
  readonly kinds: readonly WorkerKind[];
  /**
   * Every level runs this many times, rounds one after the other (so a burst of outside load hits all kinds of
   * worker alike), and the best run of each counts: on a shared machine noise only ever slows a run down.
   */
  readonly rounds: number;
  readonly cpuProfDir?: string;
  /** the `before` kind's built checkout (`--before DIR`) */
  readonly beforeRoot?: string;
}

export interface ThroughputResult {
  readonly workload: string;
  readonly rounds: number;
  /** every run, all rounds */
  readonly allRuns: readonly WorkerRun[];
  readonly allDirect: readonly DirectRun[];
  /** the best run of each kind and concurrency */
  readonly runs: readonly WorkerRun[];
  readonly direct: readonly DirectRun[];
  readonly best: {
    readonly ours: WorkerRun;
    readonly noop: WorkerRun | null;
    readonly naive: WorkerRun | null;
    readonly direct: DirectRun;
    /** ours with group commit off (FLEET_BATCH_MAX=1) at ours' best concurrency: before and after issue 18 */
    readonly unbatched?: WorkerRun | null;
    /** `before` (an earlier commit, `--before`) at ours' best concurrency */
    readonly before?: WorkerRun | null;
    /** ours with tracing on (FLEET_TRACE_BENCH=1) at ours' best concurrency, when `traced` ran */
    readonly traced?: WorkerRun | null;
    /** ours with FLEET_STREAM_PARTITIONS=16 at ours' best concurrency, when `partitioned` ran (issue 29) */
    readonly partitioned?: WorkerRun | null;
  };
  /** diagnostic: baseline (a) with a NOTIFY inside each transaction, at (a)'s best concurrency */
  readonly directWithNotify: DirectRun;
  /** ours (best) / baseline (best) */
  readonly ratios: { readonly vsDirect: number; readonly vsNoop: number | null; readonly vsNaive: number | null };
}

/**
 * Each worker run has a stream (prefix) of its own over the one database: rows of earlier runs must be neither
 * pending (the naive baseline publishes nothing) nor traceable to a stream, or the new run's relay would publish
 * them (a relay that finds its stream behind the outbox republishes what the stream lacks).
 */
async function isolateOutbox(dbUrl: string): Promise<void> {
  await withClient(dbUrl, (c) => c.query(`UPDATE outbox SET published_at = COALESCE(published_at, now()), stream_id = NULL`));
}

/**
 * Every run starts from a settled database: dead rows of earlier runs vacuumed (the outbox above rewrites every
 * row), statistics current, and a checkpoint behind it, so that neither autovacuum nor a checkpoint's writes land
 * inside whichever run comes later (they did: every second round measured up to twice the PostgreSQL CPU per event).
 */
async function settle(adminUrl: string): Promise<void> {
  await withClient(adminUrl, async (c) => {
    await c.query('VACUUM (ANALYZE)');
    await c.query('CHECKPOINT');
  });
}

export async function runThroughput(services: BenchServices, options: ThroughputOptions): Promise<ThroughputResult> {
  const dbUrl = await services.createDatabase('e2e');
  const allRuns: WorkerRun[] = [];
  const allDirect: DirectRun[] = [];
  const runDirectLevel = async (concurrency: number, variant: DirectVariant): Promise<DirectRun> => {
    const n = options.events(concurrency);
    const ids = await seedReadyDeployments(dbUrl, options.warmup + n);
    await settle(services.asAdmin(dbUrl));
    await runDirect(dbUrl, ids.slice(0, options.warmup), concurrency, variant); // warm-up
    const run = await runDirect(dbUrl, ids.slice(options.warmup), concurrency, variant, cpuGroups({ servicePids: services.pids }, null));
    log(
      `throughput direct (${variant}) c=${String(concurrency).padStart(2)}: ${round(run.eventsPerSec)} tx/s ` +
        `(${run.events} in ${round(run.seconds, 2)} s, CPU ms/event ${JSON.stringify(run.cpuMsPerEvent)})`,
    );
    return run;
  };
  for (let r = 1; r <= options.rounds; r++) {
    for (const concurrency of options.concurrencies) {
      const events = options.events(concurrency);
      for (const kind of options.kinds) {
        await isolateOutbox(dbUrl);
        const ids = await seedReadyDeployments(dbUrl, options.warmup + events);
        await settle(services.asAdmin(dbUrl));
        const run = await runWorkerLevel(
          {
            kind,
            concurrency,
            redisUrl: services.redisUrl,
            databaseUrl: dbUrl,
            prefix: services.prefix(`${kind}-c${concurrency}-r${r}`),
            servicePids: services.pids,
            ...(options.cpuProfDir !== undefined ? { cpuProfDir: options.cpuProfDir } : {}),
            ...(options.beforeRoot !== undefined ? { beforeRoot: options.beforeRoot } : {}),
          },
          ids,
          options.warmup,
        );
        log(
          `throughput round ${r} ${kind.padEnd(5)} c=${String(concurrency).padStart(2)}: ${round(run.eventsPerSec)} events/s ` +
            `(${run.events} in ${round(run.seconds, 2)} s, peak RSS ${run.peakRssMb ?? '?'} MiB, failed ${run.failed}, ` +
            `CPU ms/event ${JSON.stringify(run.cpuMsPerEvent)})`,
        );
        allRuns.push(run);
      }
    }
    for (const concurrency of options.directConcurrencies) {
      allDirect.push(await runDirectLevel(concurrency, 'statements'));
      allDirect.push(await runDirectLevel(concurrency, 'one-statement'));
    }
  }
  const bestBy = <T extends { eventsPerSec: number }>(items: readonly T[], key: (x: T) => string): T[] => {
    const best = new Map<string, T>();
    for (const x of items) {
      const k = key(x);
      const b = best.get(k);
      if (b === undefined || x.eventsPerSec > b.eventsPerSec) best.set(k, x);
    }
    return [...best.values()];
  };
  const runs = bestBy(
    allRuns.filter((x) => x.failed === 0),
    (x) => `${x.kind}:${x.concurrency}`,
  );
  const direct = bestBy(allDirect, (x) => `${x.variant}:${x.concurrency}`);

  const bestOf = (kind: WorkerKind): WorkerRun | null =>
    runs.filter((r) => r.kind === kind).sort((a, b) => b.eventsPerSec - a.eventsPerSec)[0] ?? null;
  const ours = bestOf('ours');
  const bestDirect = [...direct].sort((a, b) => b.eventsPerSec - a.eventsPerSec)[0];
  if (ours === null || bestDirect === undefined) throw new Error('throughput: no successful run of ours or of baseline (a)');
  const withNotify = await runDirectLevel(bestDirect.concurrency, 'statements+notify');
  const noop = bestOf('noop');
  const naive = bestOf('naive');
  return {
    workload:
      'deployment.teardown of ready deployments, one event per deployment: each is one applied transition ' +
      '(processed-event claim, version-checked UPDATE, history row, outbox row), enqueued through the SDK (64 in flight)',
    rounds: options.rounds,
    allRuns,
    allDirect,
    runs,
    direct,
    best: {
      ours,
      noop,
      naive,
      direct: bestDirect,
      unbatched: runs.find((x) => x.kind === 'unbatched' && x.concurrency === ours.concurrency) ?? null,
      before: runs.find((x) => x.kind === 'before' && x.concurrency === ours.concurrency) ?? null,
      traced: runs.find((x) => x.kind === 'traced' && x.concurrency === ours.concurrency) ?? null,
      partitioned: runs.find((x) => x.kind === 'partitioned' && x.concurrency === ours.concurrency) ?? null,
    },
    directWithNotify: withNotify,
    ratios: {
      vsDirect: round(ours.eventsPerSec / bestDirect.eventsPerSec, 3),
      vsNoop: noop === null ? null : round(ours.eventsPerSec / noop.eventsPerSec, 3),
      vsNaive: naive === null ? null : round(ours.eventsPerSec / naive.eventsPerSec, 3),
    },
  };
}
