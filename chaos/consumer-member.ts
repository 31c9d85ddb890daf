/**
 * One member of the chaos run's consumer group (chaos/consumer-group.ts), a process of its own so that a fault can
 * SIGKILL it, SIGSTOP it or cut its host off for real: a `TransitionConsumer` whose handler takes a few ms and writes
 * a line per call to this process's record file. Each line carries the time on the host's monotonic clock
 * (`process.hrtime`: CLOCK_MONOTONIC, one clock for every process of the machine, network namespaces included), so
 * that the runner can put the calls of every member, live or killed, in one order.
 *
 * Record lines (space-separated; each written with one write(2), so a SIGKILL loses none that was written):
 *   S <ns> <partition> <holding> <deploymentId> <version> <streamId>   a handler call starts
 *   E <ns>                                                              it returns
 *   A|R|L <ns> <partition>                                              a partition acquired, released, lost
 *   X <ns> <why> <message>                                              the run ended: resync, missing, error
 * `holding` counts this process's acquisitions of the partition: the calls of one holding are one owner's.
 *
 * The members share one `VersionStore`, as the contract asks of a group's consumers: a table in the chaos fleet's
 * PostgreSQL (durable through Redis wipes and failovers, which bring entries back under new ids), whose writes never
 * lower a version (a member paused in a handler call finishes it after the next owner went on).
 *
 * Usage: node dist/chaos/consumer-member.js '<MemberConfig as JSON>'. Exit codes: 0 stopped (SIGTERM), 3 the group's
 * position is lost (ResyncRequiredError, or the group missing at start: Redis lost it), 1 anything else.
 */
import * as fs from 'node:fs';
import { Pool } from 'pg';
import { isTransient, ResyncRequiredError } from '../src/errors';
import { createLogger } from '../src/log';
import { createRedis, type RedisConnection } from '../src/redis/connection';
import { TransitionConsumer, type TransitionEntry, type VersionStore } from '../src/streams/consumer';
import { partitionKeys, partitionOf, readPartitions } from '../src/streams/partitions';
import { sleep } from '../src/util';

export interface MemberConfig {
  readonly redisUrl: string;
  /** the stream's base key, and the number of partitions the fleet is configured with */
  readonly streamKey: string;
  readonly partitions: number;
  readonly group: string;
  readonly consumer: string;
  readonly leaseMs: number;
  /** how long a handler call takes */
  readonly handlerMs: number;
  readonly recordFile: string;
  /** the chaos fleet's PostgreSQL, where the group's versions are (VERSIONS_TABLE) */
  readonly databaseUrl: string;
}

/** The exit code of a member whose group lost its position. */
export const RESYNC_EXIT = 3;

/** The group's versions: the highest handled per deployment. */
export const VERSIONS_TABLE = 'chaos_consumer_versions';

/** The group's shared version store in PostgreSQL (an outage is the consumer's to wait out: a transient error). */
function sharedVersionStore(pool: Pool): VersionStore {
  return {
    get: async (deploymentId) =>
      (await pool.query<{ version: number }>(`SELECT version FROM ${VERSIONS_TABLE} WHERE deployment_id = $1`, [deploymentId])).rows[0]?.version,
    set: async (deploymentId, version) =>
      void (await pool.query(
        `INSERT INTO ${VERSIONS_TABLE} (deployment_id, version) VALUES ($1, $2)
         ON CONFLICT (deployment_id) DO UPDATE SET version = GREATEST(${VERSIONS_TABLE}.version, EXCLUDED.version)`,
        [deploymentId, version],
      )),
  };
}

/**
 * Waits for the fleet to have recorded its partitions (a wiped Redis lost the record until the relay writes it
 * again), then says whether the group is on every partition. A member never makes the group: one started after Redis
 * lost it would make it anew, silently past what the relay republished meanwhile.
 */
async function groupReady(config: MemberConfig): Promise<boolean> {
  const redis = createRedis(config.redisUrl, 'worker', `lifecycle-fleet-chaos-${config.consumer}`);
  redis.on('error', () => undefined);
  try {
    for (let waited = 0; (await waitingOut(() => readPartitions(redis, config.streamKey))) !== config.partitions; waited += 200) {
      if (waited > 60_000) return false;
      await sleep(200);
    }
    for (const key of partitionKeys(config.streamKey, config.partitions)) {
      const groups = await waitingOut(() => groupsOn(redis, key));
      if (!groups.some((g) => g[g.indexOf('name') + 1] === config.group)) return false;
    }
    return true;
  } finally {
    redis.disconnect();
  }
}

/** Runs `command` until it does not fail transiently (Redis away, loading, a cluster failing over). */
async function waitingOut<T>(command: () => Promise<T>): Promise<T> {
  for (;;) {
    try {
      return await command();
    } catch (err) {
      if (!isTransient(err)) throw err;
      await sleep(500);
    }
  }
}

/** The groups of a stream (none when it does not exist). */
async function groupsOn(redis: RedisConnection, key: string): Promise<unknown[][]> {
  try {
    return (await redis.xinfo('GROUPS', key)) as unknown[][];
  } catch (err) {
    if (err instanceof Error && /no such key/i.test(err.message)) return [];
    throw err;
  }
}

async function main(config: MemberConfig): Promise<number> {
  const fd = fs.openSync(config.recordFile, 'a');
  const write = (line: string): void => void fs.writeSync(fd, `${line}\n`);
  const now = (): string => process.hrtime.bigint().toString();
  if (!(await groupReady(config))) {
    write(`X ${now()} missing the group is not on every partition`);
    return RESYNC_EXIT;
  }
  const holdings = new Map<number, number>();
  const pool = new Pool({
    connectionString: config.databaseUrl,
    max: 2,
    application_name: 'lifecycle-fleet-chaos-consumer',
    connectionTimeoutMillis: 5000,
  });
  pool.on('error', () => undefined); // a terminated backend: the next query fails, and the consumer waits it out
  const consumer = new TransitionConsumer({
    redis: config.redisUrl,
    streamKey: config.streamKey,
    group: config.group,
    consumer: config.consumer,
    batchSize: 10,
    blockMs: 500,
    leaseMs: config.leaseMs,
    versions: sharedVersionStore(pool),
    logger: createLogger('info'),
    onPartitionChange: ({ partition, change }) => {
      if (change === 'acquired') holdings.set(partition, (holdings.get(partition) ?? 0) + 1);
      write(`${change === 'acquired' ? 'A' : change === 'released' ? 'R' : 'L'} ${now()} ${partition}`);
    },
    handler: async (entry: TransitionEntry) => {
      const n = partitionOf(entry.deploymentId, config.partitions);
      write(`S ${now()} ${n} ${holdings.get(n) ?? 0} ${entry.deploymentId} ${entry.version} ${entry.streamId}`);
      await sleep(config.handlerMs);
      write(`E ${now()}`);
    },
  });
  process.once('SIGTERM', () => void consumer.close());
  try {
    await consumer.run();
    return 0;
  } catch (err) {
    const resync = err instanceof ResyncRequiredError;
    write(`X ${now()} ${resync ? 'resync' : 'error'} ${(err instanceof Error ? err.message : String(err)).replace(/\s+/g, ' ').slice(0, 300)}`);
    return resync ? RESYNC_EXIT : 1;
  } finally {
    await consumer.close();
    await pool.end().catch(() => undefined);
    fs.closeSync(fd);
  }
}

if (require.main === module) {
  main(JSON.parse(process.argv[2] ?? '{}') as MemberConfig).then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`consumer-member: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      process.exit(1);
    },
  );
}
