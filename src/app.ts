/**
 * The composition root: builds a fleet process's long-lived components (for the roles asked for) in start order and
 * closes them in reverse. No other code builds them; the CLI's short commands (`migrate`, `enqueue`, `status`,
 * `tail`, `demo`, `streams repartition`) make the one client they need (a data source, a producer, a consumer, a
 * Redis connection) themselves.
 *
 * Start order: tracing (only when the OTEL_* variables ask for it) -> database -> producer -> fleet clock -> relay ->
 * sweep -> lifecycle worker -> HTTP.
 * Every component that reads a time reads the fleet clock (Redis's time, src/redis/fleet-clock.ts).
 * Stop order is the reverse: HTTP stops taking requests, the worker finishes its in-flight jobs, the sweep finishes
 * its tick, the relay publishes what the last jobs committed, then the connections close.
 */
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import type { DataSource } from 'typeorm';
import { createDataSource } from './entities/schema/data-source';
import { Database } from './entities/sql';
import type { FleetConfig } from './config';
import { assertSchemaSupported, migrationsApplied } from './entities/schema/migrate';
import { buildHttpServer } from './http/server';
import { TokenStore } from './http/tokens';
import type { Logger } from './log';
import { FleetMetrics, watchedReads } from './metrics';
import { LIFECYCLE_QUEUE, MAINTENANCE_QUEUE } from './queues/names';
import { readBacklog } from './queues/backlog';
import { FleetClock } from './redis/fleet-clock';
import { LifecycleProducer } from './queues/producer';
import { connectionForKey, createRedis, describeRedis, describeServer, logReport, ServerWatch, type RedisConnection } from './redis/connection';
import { Sweeper } from './services/sweep/sweeper';
import { createStampBuffer } from './services/stamps';
import { TransitionService } from './services/transitions';
import { streamCounts } from './streams/consumer';
import { OutboxRelay, relayLagSeconds, transitionStreamKey } from './streams/outbox-relay';
import { recordPartitions } from './streams/partitions';
import { readPartitionStats } from './streams/stream-stats';
import { LifecycleWorker, type LifecycleWorkerOptions } from './workers/lifecycle-worker';
import { SweepWorker } from './workers/sweep-worker';
import { settleWithin } from './util';
import { startTracing, type Tracing } from './telemetry';

export interface Endpoints {
  readonly redisUrl: string;
  readonly databaseUrl: string;
}

export interface FleetRoles {
  /** run the lifecycle worker (default true) */
  readonly worker?: boolean;
  /** run an outbox relay: one is active fleet-wide, the others stand by (default true) */
  readonly relay?: boolean;
  /** register the sweep scheduler and take sweep jobs: one sweep per tick fleet-wide (default true) */
  readonly sweep?: boolean;
  /** serve HTTP on FLEET_HTTP_HOST:FLEET_HTTP_PORT (default false) */
  readonly http?: boolean;
  /**
   * Called once when the lifecycle worker's fetch watchdog finds it stuck (jobs waiting, none taken for 30 s, the
   * queue not paused: see `LifecycleWorkerOptions.watchdog`). The `fleet` commands stop the process with exit code 5 so that its
   * supervisor starts a fresh one; by default it is only logged.
   */
  readonly onStuck?: (why: string) => void;
}

export interface Fleet {
  readonly dataSource: DataSource;
  readonly service: TransitionService;
  readonly producer: LifecycleProducer;
  readonly metrics: FleetMetrics;
  readonly worker: LifecycleWorker | null;
  readonly relay: OutboxRelay | null;
  readonly sweep: SweepWorker | null;
  readonly http: FastifyInstance | null;
  /** where HTTP listens, e.g. `http://127.0.0.1:3000`; null without the http role */
  readonly httpUrl: string | null;
  /** tracing, when the OTEL_* variables turned it on (docs/architecture.md, "Tracing"); null: off, nothing loaded */
  readonly tracing: Tracing | null;
  /** graceful stop in reverse start order; safe to call twice */
  close(graceMs?: number): Promise<void>;
}

/**
 * What the lifecycle worker's fetch watchdog reads of its queue (`LifecycleWorkerOptions.watchdog`), on a connection
 * other than the worker's: the queue's backlog, and as its activity, its BullMQ event stream's entries ever added
 * (jobs added, started, finished).
 */
export function lifecycleQueueWatch(
  redis: RedisConnection,
  queue: Pick<Queue, 'name' | 'toKey'>,
): Pick<NonNullable<LifecycleWorkerOptions['watchdog']>, 'waiting' | 'activity'> {
  return {
    waiting: () => readBacklog(redis, queue),
    activity: async () => (await streamCounts(redis, queue.toKey('events'))).added,
  };
}

/** Stops one component, given what is left of the stop's grace period. */
type Closer = (graceMs: number) => Promise<void>;

export async function startFleet(config: FleetConfig, endpoints: Endpoints, logger: Logger, roles: FleetRoles = {}): Promise<Fleet> {
  const closers: Closer[] = [];
  const close = (graceMs: number) => closeInReverse(closers, graceMs, logger);
  // SIGHUP re-reads the API tokens in an HTTP process, and is harmless in every other (Node would exit on it)
  const reloadable: Reloadable = { tokens: null };
  const onHangup = hangupHandler(reloadable, config, logger);
  process.on('SIGHUP', onHangup);
  closers.push(async () => void process.off('SIGHUP', onHangup));

  try {
    const base = await startBase(config, endpoints, logger, closers);
    const { tracing, dataSource, producer, metrics, now, stampBuffer } = base;
    const relay = (roles.relay ?? true) ? await startRelay(config, endpoints, logger, base, closers) : null;
    // while this process's relay is the active one, commits wake it directly rather than with a NOTIFY
    const service = new TransitionService({
      dataSource,
      now,
      logger,
      relay: relay ?? undefined,
      endpointAllow: config.endpointAllow,
      orphanAfterS: config.orphanAfterS,
      progressDeadlineS: config.progressDeadlineS,
      stampBuffer,
    });
    if (config.endpointAllow === null && ((roles.worker ?? true) || (roles.sweep ?? true))) {
      logger.info('FLEET_ENDPOINT_ALLOW is unset: this process takes and probes any endpoint host (set it wherever producers are not all trusted)');
    }
    const sweep = (roles.sweep ?? true) ? await startSweep(config, endpoints, logger, base, closers) : null;
    const worker = (roles.worker ?? true) ? await startWorker(config, endpoints, logger, base, service, roles.onStuck, closers) : null;
    const { http, httpUrl } =
      (roles.http ?? false) ? await startHttp(config, endpoints, logger, base, reloadable, closers) : { http: null, httpUrl: null };

    let closing: Promise<void> | null = null;
    return {
      dataSource,
      service,
      producer,
      metrics,
      worker,
      relay,
      sweep,
      http,
      httpUrl,
      tracing,
      close: (graceMs = 30_000) => (closing ??= close(graceMs)),
    };
  } catch (err) {
    await close(1000);
    throw err;
  }
}

/**
 * Stops the components in reverse start order under one deadline for the whole stop: a component that cannot stop
 * (BullMQ's close and the relay's last publish wait for Redis, for ever, while it is unreachable) is left behind once
 * its share is spent, and the stop goes on.
 */
async function closeInReverse(closers: Closer[], graceMs: number, logger: Logger): Promise<void> {
  const deadline = Date.now() + graceMs;
  for (const closer of closers.splice(0).reverse()) {
    const left = Math.max(1000, deadline - Date.now());
    try {
      if ((await settleWithin(closer(left), left)) === 'timeout') logger.warn({ graceMs }, 'a component did not stop in time; leaving it behind');
    } catch (err) {
      logger.error({ err }, 'error while closing');
    }
  }
}

/** What SIGHUP reloads: the API tokens, once the HTTP role loaded them. */
interface Reloadable {
  tokens: TokenStore | null;
}

function hangupHandler(reloadable: Reloadable, config: FleetConfig, logger: Logger): () => void {
  return () => {
    const tokens = reloadable.tokens;
    if (tokens === null) {
      logger.info('SIGHUP: nothing to reload in this process (no API tokens file)');
      return;
    }
    try {
      logger.info({ tokens: tokens.reload(), file: config.apiTokensFile }, 'API tokens reloaded');
    } catch (err) {
      logger.error({ err: (err as Error).message }, 'API tokens not reloaded; the previous ones stay in force');
    }
  };
}

/** What every process starts, whatever its roles, in start order; the roles are built on it. */
interface Base {
  readonly tracing: Tracing | null;
  /** BullMQ's `telemetry` option for the process's queues and workers, when tracing is on */
  readonly telemetry: { readonly telemetry?: Tracing['bullmq'] };
  readonly dataSource: DataSource;
  readonly producer: LifecycleProducer;
  /** the fleet clock */
  readonly now: () => Date;
  readonly stampBuffer: ReturnType<typeof createStampBuffer>;
  /** a second view of the queues, for queue-depth metrics, Bull Board and the worker's watchdog */
  readonly monitorRedis: RedisConnection;
  readonly maintenance: Queue;
  readonly pgWatch: ServerWatch;
  readonly redisWatch: ServerWatch;
  readonly metrics: FleetMetrics;
}

async function startBase(config: FleetConfig, endpoints: Endpoints, logger: Logger, closers: Closer[]): Promise<Base> {
  // first to start, last to stop: the spans of the shutdown itself are flushed
  const tracing = await startTracing(config.tracing, logger);
  if (tracing !== null) closers.push(() => tracing.close());
  const telemetry = tracing === null ? {} : { telemetry: tracing.bullmq };

  const dataSource = createDataSource({
    url: endpoints.databaseUrl,
    poolSize: config.concurrency + 6,
    applicationName: 'lifecycle-fleet',
  });
  await dataSource.initialize();
  closers.push(() => dataSource.destroy());
  if (!(await migrationsApplied(dataSource))) {
    throw new Error('the database schema is not up to date: run `fleet migrate` first');
  }
  // a newer release's migrations are fine (a rolling upgrade) unless they say this version cannot read the schema
  await assertSchemaSupported(dataSource);

  const producer = new LifecycleProducer({
    connection: endpoints.redisUrl,
    prefix: config.prefix,
    endpointAllow: config.endpointAllow,
    durable: config.durableReplicas > 0 ? { replicas: config.durableReplicas, timeoutMs: config.durableTimeoutMs } : null,
    ...telemetry,
  });
  closers.push(() => producer.close());
  const now = await startClock(config, endpoints, logger, closers);
  // heartbeat and readiness stamps wait in Redis until the tick writes them in batches; it closes after the
  // worker, the sweep and HTTP (closers run in reverse)
  const stampBuffer = createStampBuffer({ redisUrl: endpoints.redisUrl, dataSource, prefix: config.prefix, logger });
  closers.push(() => stampBuffer.close());
  // a second view of the maintenance queue, for queue-depth metrics and Bull Board
  const monitorRedis = createRedis(endpoints.redisUrl, 'worker', 'lifecycle-fleet-monitor');
  // this process's one view of each server: one line when it is lost, one when it is back, whichever component saw it
  const pgWatch = new ServerWatch(describeServer('PostgreSQL', endpoints.databaseUrl), logReport(logger));
  const redisWatch = new ServerWatch(describeRedis(monitorRedis), logReport(logger)).attach(monitorRedis, (err) =>
    logger.warn({ err }, 'redis error'),
  );
  const maintenance = new Queue(MAINTENANCE_QUEUE, { connection: monitorRedis, prefix: config.prefix });
  maintenance.on('error', () => undefined);
  closers.push(async () => {
    await maintenance.close();
    monitorRedis.disconnect();
  });

  const metrics = new FleetMetrics({
    queueCounts: async () => {
      const states = ['waiting', 'active', 'delayed', 'completed', 'failed', 'prioritized'] as const;
      return {
        [LIFECYCLE_QUEUE]: await producer.queue.getJobCounts(...states),
        [MAINTENANCE_QUEUE]: await maintenance.getJobCounts(...states),
      };
    },
    relayLagSeconds: () => relayLagSeconds(new Database(dataSource)),
    streamPartitions: () => readPartitionStats(monitorRedis, transitionStreamKey(config.prefix)),
    postgresUp: () => !pgWatch.isDown,
    reads: watchedReads({ relay_lag: pgWatch, queue_counts: redisWatch, stream_partitions: redisWatch }, logger),
  });
  return { tracing, telemetry, dataSource, producer, now, stampBuffer, monitorRedis, maintenance, pgWatch, redisWatch, metrics };
}

/** The one clock of the fleet: Redis's time. Its own fail-fast connection, so a sample never waits for a reconnect. */
async function startClock(config: FleetConfig, endpoints: Endpoints, logger: Logger, closers: Closer[]): Promise<() => Date> {
  const clockRedis = createRedis(endpoints.redisUrl, 'producer', 'lifecycle-fleet-clock');
  // on a cluster every node has a clock of its own: ask the master that serves the fleet's slot, always
  const slots = new Map<string, number>();
  const clock = new FleetClock({ redis: { time: async () => (await connectionForKey(clockRedis, `${config.prefix}:clock`, slots)).time() }, logger });
  closers.push(async () => {
    clock.close();
    clockRedis.disconnect();
  });
  await clock.start();
  logger.info({ offsetMs: Math.round(clock.offset ?? 0) }, "fleet clock: Redis time minus this host's");
  return clock.now;
}

async function startRelay(config: FleetConfig, endpoints: Endpoints, logger: Logger, base: Base, closers: Closer[]): Promise<OutboxRelay> {
  // the stream's number of partitions is recorded for its consumers; a fleet started with another one stops here
  await recordPartitions(base.monitorRedis, transitionStreamKey(config.prefix), config.streamPartitions);
  const r = new OutboxRelay({
    databaseUrl: endpoints.databaseUrl,
    redis: endpoints.redisUrl,
    streamKey: transitionStreamKey(config.prefix),
    partitions: config.streamPartitions,
    maxLen: config.streamMaxLen,
    durable: config.durableReplicas > 0 ? { replicas: config.durableReplicas, timeoutMs: config.durableTimeoutMs } : null,
    logger,
    redisWatch: base.redisWatch,
    pgWatch: base.pgWatch,
    onPublished: (n) => base.metrics.publishedCount(n),
  });
  closers.push(() => r.close());
  r.start();
  return r;
}

async function startSweep(config: FleetConfig, endpoints: Endpoints, logger: Logger, base: Base, closers: Closer[]): Promise<SweepWorker> {
  const { dataSource, now, pgWatch, producer, maintenance, stampBuffer, metrics } = base;
  const sweeper = new Sweeper({
    dataSource,
    now,
    pgWatch,
    producer,
    shardQueue: maintenance,
    flushStamps: async (now) => (await stampBuffer.flush(now)).stamped,
    everyS: config.sweepEveryS,
    readyWindowS: config.readyWindowS,
    orphanAfterS: config.orphanAfterS,
    progressDeadlineS: config.progressDeadlineS,
    probeConcurrency: config.probeConcurrency,
    // no probe starts after 80% of the tick: a tick's shards never run into the next tick's
    probeBudgetMs: Math.max(1000, config.sweepEveryS * 800),
    logger,
    metrics: { onSweep: (result) => metrics.sweep(result), onShard: (report) => metrics.shard(report) },
    endpointAllow: config.endpointAllow,
  });
  const s = new SweepWorker({
    connection: endpoints.redisUrl,
    prefix: config.prefix,
    sweeper,
    everyS: config.sweepEveryS,
    logger,
    redisWatch: base.redisWatch,
    durable: config.durableReplicas > 0 ? { replicas: config.durableReplicas, timeoutMs: config.durableTimeoutMs } : null,
  });
  closers.push((graceMs) => s.close(graceMs));
  await s.start();
  return s;
}

async function startWorker(
  config: FleetConfig,
  endpoints: Endpoints,
  logger: Logger,
  base: Base,
  service: TransitionService,
  onStuck: FleetRoles['onStuck'],
  closers: Closer[],
): Promise<LifecycleWorker> {
  const w = new LifecycleWorker({
    connection: endpoints.redisUrl,
    prefix: config.prefix,
    service,
    stampBuffer: base.stampBuffer,
    concurrency: config.concurrency,
    maxBatch: config.batchMax,
    logger,
    redisWatch: base.redisWatch,
    pgWatch: base.pgWatch,
    onJob: (report) => base.metrics.job(report),
    ...base.telemetry,
    watchdog: { ...lifecycleQueueWatch(base.monitorRedis, base.producer.queue), onStuck: onStuck ?? (() => undefined) },
  });
  closers.push((graceMs) => w.close(graceMs));
  await w.worker.waitUntilReady();
  return w;
}

async function startHttp(
  config: FleetConfig,
  endpoints: Endpoints,
  logger: Logger,
  base: Base,
  reloadable: Reloadable,
  closers: Closer[],
): Promise<{ http: FastifyInstance; httpUrl: string }> {
  const tokens =
    config.apiTokensFile === null ? null : new TokenStore(config.apiTokensFile, { warn: (message, fields) => logger.warn(fields, message) });
  reloadable.tokens = tokens;
  if (tokens === null) {
    logger.warn(
      { host: config.httpHost },
      'the HTTP API is open: no FLEET_API_TOKENS_FILE (allowed on loopback only; create tokens with `fleet token create`)',
    );
  } else {
    logger.info({ tokens: tokens.size, file: config.apiTokensFile }, 'API tokens loaded');
  }
  // fail-fast: a rate-limit counter that cannot be reached is skipped, not waited for
  const rateLimitRedis = createRedis(endpoints.redisUrl, 'producer', 'lifecycle-fleet-ratelimit');
  rateLimitRedis.on('error', () => undefined);
  closers.push(async () => rateLimitRedis.disconnect());
  const app = await buildHttpServer({
    now: base.now,
    tokens,
    rateLimitRedis,
    config,
    dataSource: base.dataSource,
    producer: base.producer,
    redis: base.monitorRedis,
    queues: [base.producer.queue, base.maintenance],
    stampBuffer: base.stampBuffer,
    metrics: base.metrics,
    logger,
  });
  closers.push(() => app.close());
  await app.listen({ host: config.httpHost, port: config.httpPort });
  const address = app.server.address();
  const port = typeof address === 'object' && address !== null ? address.port : config.httpPort;
  return { http: app, httpUrl: `http://${config.httpHost.includes(':') ? `[${config.httpHost}]` : config.httpHost}:${port}` };
}

/**
 * Runs until SIGTERM or SIGINT, then stops gracefully; a second signal exits at once.
 * Resolves when the fleet has stopped. The handlers are in place when it returns: call it before logging that the
 * process started, or a supervisor (or a test) that stops it on that line can kill it before they are.
 */
export function closeOnSignals(fleet: { close(graceMs?: number): Promise<void> }, logger: Logger, graceMs = 30_000): Promise<void> {
  return new Promise((resolve) => {
    let stoppingSince: number | null = null;
    const onSignal = (signal: NodeJS.Signals) => {
      if (stoppingSince !== null) {
        // Ctrl-C under `npm start` reaches us twice at once (from the terminal and forwarded by npm): only a
        // signal sent a moment later is a person asking to force the stop.
        if (Date.now() - stoppingSince < 1000) return;
        logger.warn({ signal }, 'second signal: exiting without waiting');
        process.exit(1);
      }
      stoppingSince = Date.now();
      logger.info({ signal, graceMs }, 'stopping: finishing in-flight jobs');
      fleet.close(graceMs).then(
        () => {
          logger.info('stopped');
          process.off('SIGTERM', onSignal);
          process.off('SIGINT', onSignal);
          resolve();
        },
        (err: unknown) => {
          logger.error({ err }, 'error while stopping');
          process.exitCode = 1;
          resolve();
        },
      );
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
}
