/** The chaos run's options: defaults, the `--ci` preset, and the command line. */
import * as path from 'node:path';
import { MAX_STREAM_PARTITIONS } from '../src/streams/partitions';
import { repoRoot } from '../src/util';

export interface ChaosOptions {
  /** deployments, each with a scripted lifecycle (default 400; --ci 200) */
  readonly deployments: number;
  /** worker processes (default 4; --ci 3) */
  readonly workers: number;
  /** lifecycle worker concurrency per process (default 8) */
  readonly concurrency: number;
  /** the fault window in seconds: faults are injected during it, deployments start during its first 90 % (default 240; --ci 75) */
  readonly durationS: number;
  /** one fault every this many seconds (default 6; --ci 5) */
  readonly faultEveryS: number;
  /** phases after the first attempt per deployment (default 3-6; --ci 2-4) */
  readonly phases: readonly [number, number];
  /** after the fault window, give up draining after this long (default 240 s; --ci 120 s) */
  readonly drainTimeoutS: number;
  readonly seed: number;
  /** services, data and logs (default `<repo>/.fleet/chaos`) */
  readonly dir: string;
  /** also write the report as JSON here */
  readonly jsonFile: string | null;
  /**
   * worker hosts (default 0: every process on loopback). N > 0: PostgreSQL and Redis run on a host `svc` and one
   * `fleet worker` per host on N hosts `w1..wN`, each a network namespace of its own (dev/netns.ts; root), and the
   * faults gain partitions of a worker host and of the relay leader's host
   */
  readonly hosts: number;
  /** Redis Cluster (3 masters, a replica each) instead of one Redis; the faults gain master failovers */
  readonly redisCluster: boolean;
  /**
   * durable enqueue (FLEET_DURABLE_ENQUEUE=1 for the workers' relay, `durable` for the producer): default on with
   * --redis-cluster, off otherwise; `--no-durable` measures what a failover loses without it
   */
  readonly durable: boolean;
  /** how long a partitioned host stays cut off, in seconds (default 20: past the 8 s job lock and the relay's ~11 s) */
  readonly partitionS: number;
  /**
   * partitions of the transition stream (FLEET_STREAM_PARTITIONS for the workers; default 4, so that the audit, the
   * history checker and the consumer group cover partitions; 1: the one stream of a fleet before partitions)
   */
  readonly streamPartitions: number;
  /**
   * a mixed-version run (a git ref, e.g. v0.1.0; default none): the workers start as that release's (on its own
   * schema), some consumer group members and a share of the events are its throughout, and mid-run the current
   * release's migrations are applied, its workers join, then the previous release's retire (chaos/upgrade.ts)
   */
  readonly previous: string | null;
  /**
   * PostgreSQL as a pg_auto_failover formation (a primary and a streaming standby on hosts of their own, the database
   * at an address that moves to the promoted standby; needs --hosts) instead of one server on `svc`; the faults gain
   * `postgres-failover`, which takes the place of the in-place PostgreSQL restart (dev/pg-failover.ts)
   */
  readonly pgFailover: boolean;
  /** with --pg-failover: synchronous replication (default); `--pg-async` measures what a failover loses without it */
  readonly pgSync: boolean;
}

type MutableOptions = { -readonly [K in keyof ChaosOptions]: ChaosOptions[K] };

const CI_PRESET: Partial<ChaosOptions> = { deployments: 200, workers: 3, durationS: 75, faultEveryS: 5, phases: [2, 4], drainTimeoutS: 120 };

function defaultOptions(ci: boolean): ChaosOptions {
  return {
    deployments: 400,
    workers: 4,
    concurrency: 8,
    durationS: 240,
    faultEveryS: 6,
    phases: [3, 6],
    drainTimeoutS: 240,
    seed: Date.now() % 1_000_000,
    dir: path.join(repoRoot(), '.fleet', 'chaos'),
    jsonFile: null,
    hosts: 0,
    redisCluster: false,
    durable: false,
    partitionS: 20,
    streamPartitions: 4,
    previous: null,
    pgFailover: false,
    pgSync: true,
    ...(ci ? CI_PRESET : {}),
  };
}

function num(flag: string, value: string | undefined, min: number, max: number): number {
  const n = Number(value);
  if (value === undefined || !Number.isFinite(n) || n < min || n > max) throw new Error(`${flag}: expected a number from ${min} to ${max}`);
  return n;
}

/** Sets the option `flag` names from `value` (the next argument). */
function applyFlag(out: MutableOptions, flag: string | undefined, value: string | undefined): void {
  switch (flag) {
    case '--deployments':
      out.deployments = num(flag, value, 1, 100_000);
      break;
    case '--workers':
      out.workers = num(flag, value, 1, 32);
      break;
    case '--concurrency':
      out.concurrency = num(flag, value, 1, 256);
      break;
    case '--duration':
      out.durationS = num(flag, value, 5, 24 * 3600);
      break;
    case '--fault-every':
      out.faultEveryS = num(flag, value, 1, 3600);
      break;
    case '--drain-timeout':
      out.drainTimeoutS = num(flag, value, 10, 24 * 3600);
      break;
    case '--seed':
      out.seed = num(flag, value, 0, 2 ** 31);
      break;
    case '--phases': {
      const m = /^(\d+)-(\d+)$/.exec(value ?? '');
      if (m === null || Number(m[1]) > Number(m[2])) throw new Error('--phases: expected MIN-MAX, e.g. 2-4');
      out.phases = [Number(m[1]), Number(m[2])];
      break;
    }
    case '--dir':
      if (value === undefined) throw new Error('--dir: expected a directory');
      out.dir = path.resolve(value);
      break;
    case '--hosts':
      out.hosts = num(flag, value, 1, 8);
      break;
    case '--partition':
      out.partitionS = num(flag, value, 1, 600);
      break;
    case '--stream-partitions':
      out.streamPartitions = num(flag, value, 1, MAX_STREAM_PARTITIONS);
      break;
    case '--previous':
      if (value === undefined || value.startsWith('-')) throw new Error('--previous: expected a git ref, e.g. v0.1.0');
      out.previous = value;
      break;
    case '--json':
      if (value === undefined) throw new Error('--json: expected a file');
      out.jsonFile = path.resolve(value);
      break;
    default:
      throw new Error(`unknown option ${String(flag)}`);
  }
}

/** Flags without a value. */
const SWITCHES = new Set(['--ci', '--redis-cluster', '--durable', '--no-durable', '--pg-failover', '--pg-async']);

export function parseChaosArgs(argv: readonly string[]): ChaosOptions {
  const out: MutableOptions = { ...defaultOptions(argv.includes('--ci')) };
  for (let i = 0; i < argv.length; i++) {
    if (SWITCHES.has(argv[i] ?? '')) continue;
    applyFlag(out, argv[i], argv[i + 1]);
    i++;
  }
  out.redisCluster = argv.includes('--redis-cluster');
  out.durable = argv.includes('--durable') || (out.redisCluster && !argv.includes('--no-durable'));
  out.pgFailover = argv.includes('--pg-failover') || argv.includes('--pg-async');
  out.pgSync = !argv.includes('--pg-async');
  if (out.pgFailover && out.hosts === 0) throw new Error('--pg-failover: the primary and its standby run on hosts of their own: add --hosts N');
  if (out.hosts > 0) out.workers = out.hosts; // one `fleet worker` per host
  // the faults find a host's worker by its slot, one per host; an upgrade runs two releases' workers side by side
  if (out.previous !== null && out.hosts > 0) throw new Error('--previous: a mixed-version run is on loopback (without --hosts)');
  return out;
}
