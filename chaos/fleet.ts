/**
 * The fleet under test: its own Redis (AOF) and PostgreSQL, migrated; `fleet worker` processes kept running by a
 * WorkerPool; and the runner's own connections (a pg pool, an admin Redis client, a producer).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { RedisConnection } from '../src/redis/connection';
import { Pool } from 'pg';
import { createDataSource } from '../ormconfig';
import { startLocalServices, type LocalServices } from '../dev/servers';
import { migrate } from '../src/entities/schema/migrate';
import { LifecycleProducer } from '../src/queues/producer';
import { createRedis } from '../src/redis/connection';
import { transitionStreamKey } from '../src/streams/outbox-relay';
import { partitionKeys } from '../src/streams/partitions';
import { repoRoot } from '../src/util';
import { Queue } from 'bullmq';
import type { OwnRedisCluster } from '../dev/redis-cluster';
import { LIFECYCLE_QUEUE } from '../src/queues/names';
import { WorkerPool } from './faults';
import { ChaosLab } from './lab';
import type { ChaosOptions } from './options';
import { currentRelease, migrateProcess, preparePrevious, type Release } from './releases';

/** The chaos workers' orphan threshold: a day, so that the sweep never orphans the attempts the workload holds. */
export const CHAOS_ORPHAN_AFTER_S = 86_400;

/** The fleet's key prefix: on a Redis Cluster, a hash tag (every key of the fleet in one slot). */
function prefixOf(options: Pick<ChaosOptions, 'redisCluster'>): string {
  return options.redisCluster ? '{chaos}' : 'chaos';
}

/** The sweep tick of the chaos fleet: short, so that a run has dozens of ticks to count (each must start once). */
export const CHAOS_SWEEP_EVERY_S = 5;

/** The environment of a worker process: ours, without any fleet setting, then the chaos fleet's. */
function workerEnv(options: ChaosOptions, redisUrl: string, databaseUrl: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const key of Object.keys(env)) if (key.startsWith('FLEET_') || key === 'REDIS_URL' || key === 'DATABASE_URL') delete env[key];
  return {
    ...env,
    REDIS_URL: redisUrl,
    DATABASE_URL: databaseUrl,
    FLEET_PREFIX: prefixOf(options),
    FLEET_CONCURRENCY: String(options.concurrency),
    // info: the sweep's 'sweep tick started' lines, counted per tick by the report
    LOG_LEVEL: 'info',
    FLEET_SWEEP_EVERY_S: String(CHAOS_SWEEP_EVERY_S),
    ...(options.durable ? { FLEET_DURABLE_ENQUEUE: '1' } : {}),
    FLEET_STREAM_PARTITIONS: String(options.streamPartitions),
    // the workload holds attempts in `deploying` on purpose; the sweep must not orphan or expire them
    FLEET_ORPHAN_AFTER_S: String(CHAOS_ORPHAN_AFTER_S),
    FLEET_PROGRESS_DEADLINE_S: '604800',
  };
}

async function migrateDatabase(databaseUrl: string): Promise<void> {
  const ds = createDataSource({ url: databaseUrl, poolSize: 2, applicationName: 'lifecycle-fleet-migrate' });
  await ds.initialize();
  await migrate(ds);
  await ds.destroy();
}

export class Fleet {
  readonly prefix: string;
  /** the transition stream's base key (`<prefix>:transitions`) */
  readonly streamKey: string;
  /** its partitions' keys, in partition order (the base key alone with one partition) */
  readonly partitionKeys: readonly string[];
  readonly redisUrl: string;
  readonly databaseUrl: string;
  /** where the workers' output goes (the sweep counts read it) */
  readonly workersLog: string;
  private lifecycleQueue: Queue | null = null;
  private workerPool: WorkerPool | null = null;
  /** true once the workers were stopped gracefully */
  private workersStopped = false;
  private pgPool: Pool | null = null;
  private adminRedis: RedisConnection | null = null;
  private lifecycleProducer: LifecycleProducer | null = null;
  private previousProducer: LifecycleProducer | null = null;
  /** the current checkout as a release, and the previous one of a mixed-version run (else null) */
  readonly current: Release;
  readonly previous: Release | null;
  private readonly onExit = () => {
    if (!this.workersStopped) this.workerPool?.killAll();
  };

  private constructor(
    readonly services: LocalServices,
    /** the hosts of a `--hosts` run, or null on loopback */
    readonly lab: ChaosLab | null,
    readonly options: ChaosOptions,
    previous: Release | null,
  ) {
    this.current = currentRelease();
    this.previous = previous;
    this.redisUrl = lab?.redisUrl ?? services.redisUrl ?? '';
    this.databaseUrl = lab?.databaseUrl ?? services.databaseUrl ?? '';
    this.prefix = prefixOf(options);
    this.streamKey = transitionStreamKey(this.prefix);
    this.partitionKeys = partitionKeys(this.streamKey, options.streamPartitions);
    this.workersLog = path.join(options.dir, 'workers.log');
  }

  /** The Redis Cluster of a `--redis-cluster` run, or null. */
  get cluster(): OwnRedisCluster | null {
    return this.lab?.cluster ?? null;
  }

  /** Starts the services and the workers; on failure, stops whatever it started and throws. */
  static async start(options: ChaosOptions, log: (line: string) => void): Promise<Fleet> {
    fs.mkdirSync(options.dir, { recursive: true });
    const previous = options.previous === null ? null : preparePrevious(options.previous, log);
    let fleet: Fleet;
    if (options.hosts > 0) {
      const lab = await ChaosLab.start(options, log);
      fleet = new Fleet(lab.services, lab, options, previous);
    } else {
      log(`starting Redis (AOF) and PostgreSQL under ${path.relative(process.cwd(), options.dir) || options.dir}`);
      const services = await startLocalServices({ dir: options.dir, redis: true, postgres: true, fresh: true, fast: false });
      fleet = new Fleet(services, null, options, previous);
    }
    process.once('exit', fleet.onExit);
    try {
      await fleet.boot(options, log);
    } catch (err) {
      await fleet.close();
      throw err;
    }
    return fleet;
  }

  private async boot(options: ChaosOptions, log: (line: string) => void): Promise<void> {
    const { previous } = this;
    // a mixed-version run starts on the previous release's schema: the current one's migrations come mid-run
    if (previous === null) await migrateDatabase(this.databaseUrl);
    else {
      const run = await migrateProcess(previous, this.databaseUrl);
      if (run.code !== 0) throw new Error(`fleet migrate of ${previous.ref} exited ${run.code}: ${run.stderr.trim()}`);
      log(`schema of ${previous.ref} (${previous.version}): ${run.stdout.trim()}`);
    }
    const spec = {
      command: process.execPath,
      args: [path.join(repoRoot(), 'bin', 'fleet.js'), 'worker'],
      argsFor: (slot: number) => [path.join(this.releaseOfSlot(slot).dir, 'bin', 'fleet.js'), 'worker'],
      env: workerEnv(options, this.redisUrl, this.databaseUrl),
      logFile: this.workersLog,
      ...(this.lab === null ? {} : { wrap: (slot: number) => this.lab?.wrap(slot) ?? [] }),
    };
    this.workerPool = new WorkerPool(spec, options.workers, 1000, log);
    this.workerPool.start();
    const pool = new Pool({ connectionString: this.databaseUrl, max: 3, application_name: 'lifecycle-fleet-chaos', connectionTimeoutMillis: 5000 });
    this.pgPool = pool;
    pool.on('error', () => undefined);
    const admin = createRedis(this.redisUrl, 'producer', 'lifecycle-fleet-chaos');
    this.adminRedis = admin;
    admin.on('error', () => undefined);
    // attempts: 1, as a raw BullMQ producer has it: every retry must be the worker's own (docs/architecture.md, "Who retries")
    this.lifecycleProducer = new LifecycleProducer({
      connection: this.redisUrl,
      prefix: this.prefix,
      defaultJobOptions: { attempts: 1 },
      durable: options.durable ? { replicas: 1, timeoutMs: 1000 } : null,
    });
    if (previous !== null) {
      // the previous release's own producer class, loaded from its build (its dependencies resolve from its tree)
      const { LifecycleProducer: PreviousProducer } = (await import(path.join(previous.dir, 'dist', 'src', 'queues', 'producer.js'))) as {
        LifecycleProducer: typeof LifecycleProducer;
      };
      this.previousProducer = new PreviousProducer({
        connection: this.redisUrl,
        prefix: this.prefix,
        defaultJobOptions: { attempts: 1 },
        durable: options.durable ? { replicas: 1, timeoutMs: 1000 } : null,
      });
    }
    this.lifecycleQueue = new Queue(LIFECYCLE_QUEUE, { connection: admin, prefix: this.prefix });
    this.lifecycleQueue.on('error', () => undefined);
  }

  /**
   * The release a worker slot runs: in a mixed-version run the first `workers` slots are the previous release's and
   * the slots added by the upgrade the current one's; else every slot is current.
   */
  releaseOfSlot(slot: number): Release {
    return this.previous !== null && slot < this.options.workers ? this.previous : this.current;
  }

  /** The producers the workload sends through: the current release's, and the previous one's in a mixed run. */
  get producers(): readonly LifecycleProducer[] {
    return [this.producer, ...(this.previousProducer === null ? [] : [this.previousProducer])];
  }

  /** The lifecycle queue, to look at jobs (which worker holds one). */
  get queue(): Queue {
    return Fleet.need(this.lifecycleQueue, 'lifecycle queue');
  }

  private static need<T>(value: T | null, what: string): T {
    if (value === null) throw new Error(`the chaos fleet has no ${what} (not started)`);
    return value;
  }
  get workers(): WorkerPool {
    return Fleet.need(this.workerPool, 'workers');
  }
  get pool(): Pool {
    return Fleet.need(this.pgPool, 'pg pool');
  }
  get admin(): RedisConnection {
    return Fleet.need(this.adminRedis, 'admin Redis client');
  }
  get producer(): LifecycleProducer {
    return Fleet.need(this.lifecycleProducer, 'producer');
  }

  /** Stops the workers gracefully (their counters stay readable). */
  async stopWorkers(): Promise<void> {
    await this.workers.stop();
    this.workersStopped = true;
  }

  /** Stops everything still running: workers (5 s grace), connections, services. */
  async close(): Promise<void> {
    process.off('exit', this.onExit);
    if (!this.workersStopped) await this.workerPool?.stop(5000);
    await this.lifecycleProducer?.close();
    await this.previousProducer?.close();
    await this.lifecycleQueue?.close().catch(() => undefined);
    this.adminRedis?.disconnect();
    await this.pgPool?.end().catch(() => undefined);
    if (this.lab !== null) await this.lab.close();
    else await this.services.stop();
  }
}
