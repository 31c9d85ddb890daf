/**
 * `npm run chaos`: a bounded fault-injection run of the whole fleet on loopback, ending in a report.
 *
 * It starts its own Redis and PostgreSQL under `<repo>/.fleet/chaos` (so it may kill and restart them), migrates,
 * runs several `fleet worker` processes (each: lifecycle worker, standby-or-leader outbox relay, sweep), and drives
 * a scripted workload (chaos/workload.ts) over hundreds of deployments while it injects faults on a schedule:
 * SIGKILL of workers and of the relay leader, redis-server SIGKILLed and restarted (AOF), PostgreSQL restarted in
 * immediate mode, backends terminated, Redis client connections killed, bursts of redeliveries (same eventId, new
 * job) and of out-of-order replays (old events under new eventIds). Then it drains and accounts for every event the
 * generator intended (applied, noop, rejected with the expected code, or lost), checks every deployment's history and
 * the transition stream with the history checker, and compares every deployment with the state its script ends in.
 *
 * Usage: npm run chaos -- [--ci] [--deployments N] [--workers N] [--duration S] [--fault-every S] [--drain-timeout S]
 *        [--phases MIN-MAX] [--concurrency N] [--seed N] [--dir DIR] [--json FILE]
 * Exit code 0 only when nothing was lost, nothing applied twice, the stream has no gap and the checker is clean.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { repoRoot, sleep } from '../src/util';
import type IORedis from 'ioredis';
import { Pool } from 'pg';
import { createDataSource } from '../ormconfig';
import { migrate } from '../src/entities/migrate';
import { startLocalServices, type LocalServices } from '../dev/servers';
import { LifecycleProducer, jobIdFor } from '../src/queues/producer';
import { createRedis } from '../src/queues/redis';
import { ResyncRequiredError } from '../src/errors';
import { compareIds, TransitionConsumer, type TransitionEntry, type VersionStore } from '../src/streams/consumer';
import { transitionStreamKey } from '../src/streams/outbox-relay';
import { checkHistory, type HistoryReport, type SentEvent } from './history-checker';
import { findRelayLeader, killRedisClients, terminateBackends, WorkerPool } from './faults';
import { planWorkload, Random, type Barrier, type PlannedEvent, type Script, type Expectation } from './workload';

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
}

export type FaultKind =
  | 'kill-worker'
  | 'kill-relay-leader'
  | 'redis-restart'
  | 'postgres-restart'
  | 'terminate-backends'
  | 'redis-client-kill'
  | 'redelivery-burst'
  | 'replay-burst'
  /** redis-server SIGKILLed and restarted with its data deleted: queues, scheduler and stream gone */
  | 'redis-wipe'
  /** a consumer held on an entry while the stream moves on and is trimmed past it */
  | 'consumer-held';

export interface FaultRecord {
  readonly atS: number;
  readonly kind: FaultKind;
  readonly detail: string;
  readonly tookMs: number;
}

export interface ChaosReport {
  readonly ok: boolean;
  readonly options: Omit<ChaosOptions, 'dir' | 'jsonFile'>;
  readonly events: {
    /** distinct events the generator intended (each its own eventId), replays included */
    readonly sent: number;
    readonly applied: number;
    readonly noop: number;
    /** rejected with the code the script expected */
    readonly rejected: number;
    /** intended, and neither applied, nor a noop, nor rejected as expected */
    readonly lost: number;
    /** decided although a rejection was expected, or rejected although a decision was expected */
    readonly wrongOutcome: number;
    /** re-enqueued with the same eventId and jobId */
    readonly resent: number;
    /** redelivered: the same eventId under another jobId */
    readonly redelivered: number;
    /** old events sent again under new eventIds, out of order */
    readonly replayed: number;
  };
  readonly appliedTwice: number;
  /**
   * consumers held behind the trim point while running: `resyncs` stopped with ResyncRequiredError (as they must),
   * `skipped` went on past the hole (must be 0); `auditRestarts`: the recording consumer restarted (a wiped Redis)
   */
  readonly consumers: { readonly resyncs: number; readonly skipped: number; readonly auditRestarts: number };
  readonly streamGaps: number;
  readonly streamRepeats: number;
  readonly transitions: number;
  readonly deployments: { readonly total: number; readonly scriptsFinished: number; readonly wrongFinalState: number };
  readonly faults: { readonly total: number; readonly byKind: Readonly<Partial<Record<FaultKind, number>>>; readonly leaderKills: number };
  readonly workerStarts: number;
  readonly unexpectedWorkerExits: number;
  readonly checker: Pick<HistoryReport, 'ok' | 'violationCounts' | 'violations'>;
  readonly lostSamples: readonly string[];
  readonly timings: { readonly totalS: number; readonly lastFaultAtS: number; readonly drainAfterLastFaultS: number | null };
  readonly faultLog: readonly FaultRecord[];
}

const CI_PRESET: Partial<ChaosOptions> = { deployments: 200, workers: 3, durationS: 75, faultEveryS: 5, phases: [2, 4], drainTimeoutS: 120 };

export function parseChaosArgs(argv: readonly string[]): ChaosOptions {
  const ci = argv.includes('--ci');
  const defaults: ChaosOptions = {
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
    ...(ci ? CI_PRESET : {}),
  };
  const out: { -readonly [K in keyof ChaosOptions]: ChaosOptions[K] } = { ...defaults };
  const num = (flag: string, value: string | undefined, min: number, max: number): number => {
    const n = Number(value);
    if (value === undefined || !Number.isFinite(n) || n < min || n > max) throw new Error(`${flag}: expected a number from ${min} to ${max}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[i + 1];
    switch (flag) {
      case '--ci':
        continue;
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
      case '--json':
        if (value === undefined) throw new Error('--json: expected a file');
        out.jsonFile = path.resolve(value);
        break;
      default:
        throw new Error(`unknown option ${String(flag)}`);
    }
    i++;
  }
  return out;
}


/** Polls `check` every 100 ms until it gives a value, or gives undefined after `timeoutMs`. */
async function until<T>(check: () => T | undefined | Promise<T | undefined>, timeoutMs: number): Promise<T | undefined> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined || Date.now() > deadline) return value;
    await sleep(100);
  }
}

class Aborted extends Error {}

/** The chaos workers' orphan threshold: a day, so that the sweep never orphans the attempts the workload holds. */
const CHAOS_ORPHAN_AFTER_S = 86_400;

/**
 * The workload declares its orphans itself. A worker applies an orphan only if the attempt has shown no sign of
 * life since the declaration's time minus the threshold (the job's timestamp), so the workload dates its
 * declarations a threshold ahead: "this runner has been silent for a day". Other events keep the real time.
 */
function declaredAt(name: string): { timestamp?: number } {
  return name === 'attempt.orphaned' ? { timestamp: Date.now() + (CHAOS_ORPHAN_AFTER_S + 60) * 1000 } : {};
}

interface Tracked {
  readonly name: string;
  readonly data: PlannedEvent['data'];
  readonly expect: Expectation;
  readonly replayable: boolean;
}

/** Runs the chaos suite; `say` gets progress lines. */
export async function runChaos(options: ChaosOptions, say: (line: string) => void): Promise<ChaosReport> {
  const t0 = Date.now();
  const elapsed = () => (Date.now() - t0) / 1000;
  const log = (line: string) => say(`[${elapsed().toFixed(1).padStart(6)}s] ${line}`);
  const runId = `c${options.seed.toString(36)}`;
  const prefix = 'chaos';
  const streamKey = transitionStreamKey(prefix);

  fs.mkdirSync(options.dir, { recursive: true });
  log(`starting Redis (AOF) and PostgreSQL under ${path.relative(process.cwd(), options.dir) || options.dir}`);
  const services: LocalServices = await startLocalServices({ dir: options.dir, redis: true, postgres: true, fresh: true, fast: false });
  const redisUrl = services.redisUrl ?? '';
  const databaseUrl = services.databaseUrl ?? '';

  let workers: WorkerPool | null = null;
  let producer: LifecycleProducer | null = null;
  let admin: IORedis | null = null;
  let pool: Pool | null = null;
  const onExit = () => workers?.killAll();
  process.once('exit', onExit);
  try {
    const ds = createDataSource({ url: databaseUrl, poolSize: 2, applicationName: 'lifecycle-fleet-migrate' });
    await ds.initialize();
    await migrate(ds);
    await ds.destroy();

    const env: NodeJS.ProcessEnv = { ...process.env };
    for (const key of Object.keys(env)) if (key.startsWith('FLEET_') || key === 'REDIS_URL' || key === 'DATABASE_URL') delete env[key];
    const logFile = path.join(options.dir, 'workers.log');
    workers = new WorkerPool(
      {
        command: process.execPath,
        args: [path.join(repoRoot(), 'bin', 'fleet.js'), 'worker'],
        env: {
          ...env,
          REDIS_URL: redisUrl,
          DATABASE_URL: databaseUrl,
          FLEET_PREFIX: prefix,
          FLEET_CONCURRENCY: String(options.concurrency),
          LOG_LEVEL: 'warn',
          // the workload holds attempts in `deploying` on purpose; the sweep must not orphan or expire them
          FLEET_ORPHAN_AFTER_S: String(CHAOS_ORPHAN_AFTER_S),
          FLEET_PROGRESS_DEADLINE_S: '604800',
        },
        logFile,
      },
      options.workers,
      1000,
      log,
    );
    workers.start();
    const pool_ = new Pool({ connectionString: databaseUrl, max: 3, application_name: 'lifecycle-fleet-chaos', connectionTimeoutMillis: 5000 });
    pool = pool_;
    pool_.on('error', () => undefined);
    const admin_ = createRedis(redisUrl, 'producer', 'lifecycle-fleet-chaos');
    admin = admin_;
    admin_.on('error', () => undefined);
    // attempts: 1, as a raw BullMQ producer has it: every retry must be the worker's own (docs/architecture.md, "Who retries")
    const producer_ = new LifecycleProducer({ connection: redisUrl, prefix, defaultJobOptions: { attempts: 1 } });
    producer = producer_;
    const workerPool = workers;

    const plan = new Random(options.seed);
    const timing = new Random(options.seed ^ 0x5eed);
    const scripts = planWorkload({ deployments: options.deployments, phases: options.phases, random: plan, runId });
    const sent = new Map<string, Tracked>();
    const counters = { resent: 0, redelivered: 0, replayed: 0, scriptsFinished: 0, resyncs: 0, skipped: 0, auditRestarts: 0 };

    // --- the audit consumer: records every entry (duplicates included) as a consumer sees it, so the stream check at
    // the end covers entries that a fault trimmed away after the audit had read them
    const auditEntries: TransitionEntry[] = [];
    const keepAll: VersionStore = { get: () => undefined, set: () => undefined };
    let audit: TransitionConsumer | null = null;
    let auditStopped = false;
    const startAudit = (): void => {
      const consumer = new TransitionConsumer({
        redis: redisUrl,
        streamKey,
        group: 'chaos-audit',
        consumer: 'audit',
        startId: '0',
        batchSize: 500,
        blockMs: 200,
        versions: keepAll,
        handler: (entry) => void auditEntries.push(entry),
      });
      audit = consumer;
      consumer.run().then(
        () => undefined,
        async (err: unknown) => {
          await consumer.close();
          if (auditStopped) return;
          counters.auditRestarts++;
          log(`audit consumer stopped (${err instanceof Error ? err.message.slice(0, 120) : String(err)}); starting it again from 0`);
          await sleep(500);
          if (!auditStopped) startAudit();
        },
      );
    };
    startAudit();
    const auditReached = (id: string) => {
      const last = auditEntries[auditEntries.length - 1];
      return last !== undefined && compareIds(last.streamId, id) >= 0;
    };
    const background = new Set<Promise<void>>();
    let aborted = false;

    const retrying = async (what: () => Promise<unknown>): Promise<void> => {
      for (;;) {
        if (aborted) throw new Aborted();
        try {
          await what();
          return;
        } catch (err) {
          if (err instanceof Error && err.name === 'ValidationError') throw err;
          await sleep(200 + timing.int(0, 300));
        }
      }
    };
    const inBackground = (task: () => Promise<void>) => {
      const p = task().catch(() => undefined);
      background.add(p);
      void p.finally(() => background.delete(p));
    };
    const sendIntended = async (event: Tracked) => {
      sent.set(event.data.eventId, event);
      await retrying(() => producer_.enqueue(event.name, event.data, declaredAt(event.name)));
    };
    const redeliver = (event: Tracked, n: number) =>
      retrying(() => producer_.queue.add(event.name, event.data, { jobId: `${jobIdFor(event.data.eventId)}.redelivery${n}`, ...declaredAt(event.name) }));

    /** rejections the barriers saw (job failed, with its reason): the job may be gone by the end (a wiped Redis) */
    const rejectionsSeen = new Map<string, string>();
    // --- barriers: one poller for all deployments waiting on one
    const waiting = new Map<string, { barrier: Barrier; resolve: () => void; reject: (err: Error) => void }>();
    const barrier = (deploymentId: string, b: Barrier) =>
      new Promise<void>((resolve, reject) => {
        if (aborted) reject(new Aborted());
        else waiting.set(deploymentId, { barrier: b, resolve, reject });
      });
    let polling = true;
    const poller = (async () => {
      while (polling) {
        await sleep(250);
        if (waiting.size === 0) continue;
        try {
          const ids = [...waiting.entries()].filter(([, w]) => w.barrier.state !== null).map(([id]) => id);
          const rows =
            ids.length === 0
              ? []
              : (
                  await pool_.query<{ id: string; state: string; current_attempt_id: string | null }>(
                    `SELECT id, state, current_attempt_id FROM deployments WHERE id = ANY($1)`,
                    [ids],
                  )
                ).rows;
          const stateOf = new Map(rows.map((r) => [r.id, r]));
          for (const [id, w] of [...waiting]) {
            const want = w.barrier.state;
            const row = stateOf.get(id);
            if (want !== null && (row?.state !== want.state || row.current_attempt_id !== want.currentAttemptId)) continue;
            let rejectedAll = true;
            for (const r of w.barrier.rejected) {
              const job = await producer_.queue.getJob(jobIdFor(r.eventId));
              if (job === undefined || typeof job.failedReason !== 'string' || job.finishedOn === undefined) {
                rejectedAll = false;
                break;
              }
              rejectionsSeen.set(r.eventId, job.failedReason);
            }
            if (!rejectedAll) continue;
            waiting.delete(id);
            w.resolve();
          }
        } catch {
          // a service is down: poll again
        }
      }
    })();

    // --- the workload
    /** each script's current step: what its producer would send again if the queue lost it */
    const stepEvents = new Map<string, readonly Tracked[]>();
    const stepOf = new Map<string, string>();
    const runScript = async (script: Script, startAfterMs: number) => {
      await sleep(startAfterMs);
      for (const step of script.steps) {
        stepOf.set(script.deploymentId, step.label);
        stepEvents.set(script.deploymentId, step.events);
        await Promise.all(
          timing.shuffle(step.events).map(async (planned) => {
            // out of order: most events go at once, some late
            await sleep(timing.int(0, 300) + (timing.chance(0.2) ? timing.int(300, 1500) : 0));
            const event: Tracked = planned;
            await sendIntended(event);
            // a rejection is not recorded, so a later copy of a rejected event is decided afresh: only events that
            // are decided are sent again
            const again = event.expect.kind === 'decided';
            if (again && timing.chance(0.15)) {
              inBackground(async () => {
                await sleep(timing.int(0, 2000));
                await retrying(() => producer_.enqueue(event.name, event.data));
                counters.resent++;
              });
            }
            if (again && timing.chance(0.1)) {
              inBackground(async () => {
                await sleep(timing.int(0, 3000));
                await redeliver(event, 0);
                counters.redelivered++;
              });
            }
          }),
        );
        await barrier(script.deploymentId, step.barrier);
        await sleep(timing.int(200, 1500));
      }
      counters.scriptsFinished++;
      stepOf.delete(script.deploymentId);
    };
    // starts spread over 90 % of the window: scripts are still in flight when the last fault hits
    const spread = options.durationS * 900;
    const scriptRuns = scripts.map((s, i) => runScript(s, Math.round((i / scripts.length) * spread)).catch((err: unknown) => {
      if (!(err instanceof Aborted)) throw err;
    }));
    log(`${scripts.length} deployments, ${options.workers} workers x ${options.concurrency}, faults every ${options.faultEveryS}s for ${options.durationS}s (seed ${options.seed})`);

    // --- faults
    const faultLog: FaultRecord[] = [];
    let leaderKills = 0;
    const kinds: FaultKind[] = [
      'kill-worker',
      'redis-client-kill',
      'consumer-held',
      'kill-relay-leader',
      'redelivery-burst',
      'redis-wipe',
      'terminate-backends',
      'redis-restart',
      'replay-burst',
      'kill-worker',
      'postgres-restart',
      'kill-relay-leader',
    ];
    const inject = async (kind: FaultKind): Promise<string> => {
      switch (kind) {
        case 'kill-worker': {
          const pids = workerPool.pids();
          if (pids.length === 0) return 'no worker running';
          const pid = timing.pick(pids);
          workerPool.kill(pid);
          return `SIGKILL worker pid ${pid}`;
        }
        case 'kill-relay-leader': {
          // right after a restart the relays may still be contending for the lock: give them a few seconds
          let leader: number | null = null;
          for (let i = 0; i < 10 && leader === null; i++) {
            if (i > 0) await sleep(500);
            leader = await findRelayLeader(pool_, workerPool.pids()).catch(() => null);
          }
          if (leader === null) {
            const pids = workerPool.pids();
            if (pids.length === 0) return 'no worker running';
            const pid = timing.pick(pids);
            workerPool.kill(pid);
            return `leader not found; SIGKILL worker pid ${pid}`;
          }
          workerPool.kill(leader);
          leaderKills++;
          return `SIGKILL relay leader pid ${leader}`;
        }
        case 'redis-restart':
          await services.restartRedis({ signal: 'SIGKILL', downMs: 1000 });
          return 'redis-server SIGKILLed, down 1 s, restarted from its AOF';
        case 'redis-wipe': {
          await services.restartRedis({ signal: 'SIGKILL', downMs: 1000, wipe: true });
          // The queue lost its jobs. A producer that keeps its own record of what it sent (as a deploy pipeline
          // does) sends again what was not decided yet: every event it expects decided (any order converges: one
          // that an earlier step no longer waited for, such as a start overtaken by its end, is a noop whenever it
          // comes), and its current step's expected rejections (an earlier step's were seen; sent again later they
          // would meet another state). The stream is rebuilt by the relay from the outbox.
          const decided = new Set((await pool_.query<{ event_id: string }>(`SELECT event_id FROM processed_events`)).rows.map((r) => r.event_id));
          const currentRejections = [...stepEvents.values()].flat().filter((e) => e.expect.kind === 'rejected' && sent.has(e.data.eventId));
          const again = [...[...sent.values()].filter((e) => e.expect.kind === 'decided'), ...currentRejections].filter((e) => !decided.has(e.data.eventId));
          for (const event of again) {
            inBackground(async () => {
              await retrying(() => producer_.enqueue(event.name, event.data, declaredAt(event.name)));
              counters.resent++;
            });
          }
          return `redis-server SIGKILLed, its data deleted, restarted empty; ${again.length} undecided events sent again`;
        }
        case 'consumer-held':
          return holdConsumerBehindTrim();
        case 'postgres-restart':
          await services.restartPostgres({ mode: 'immediate', downMs: 1000 });
          return 'PostgreSQL stopped in immediate mode, down 1 s, restarted (crash recovery)';
        case 'terminate-backends':
          return `pg_terminate_backend: ${await terminateBackends(pool_)} backends`;
        case 'redis-client-kill':
          return `CLIENT KILL TYPE normal: ${await killRedisClients(admin_)} connections`;
        case 'redelivery-burst': {
          const candidates = [...sent.values()].filter((e) => e.expect.kind === 'decided');
          const picked = Array.from({ length: Math.min(60, candidates.length) }, () => timing.pick(candidates));
          picked.forEach((event, n) =>
            inBackground(async () => {
              await redeliver(event, n + 1);
              counters.redelivered++;
            }),
          );
          return `${picked.length} events redelivered under new job ids`;
        }
        case 'replay-burst': {
          const candidates = [...sent.values()].filter((e) => e.replayable);
          const picked = Array.from({ length: Math.min(60, candidates.length) }, () => timing.pick(candidates));
          picked.forEach((event, n) => {
            const replay: Tracked = { ...event, data: { ...event.data, eventId: `${event.data.eventId}.r${n}x${faultLog.length}` } };
            inBackground(async () => {
              await sendIntended(replay);
              counters.replayed++;
            });
          });
          return `${picked.length} earlier events replayed under new eventIds`;
        }
      }
    };
    /**
     * A consumer group made at the stream's end, whose handler hangs on the first entry it gets; 40 entries behind
     * it are trimmed away (once the audit has read them); then the handler is let go. The consumer must stop with
     * ResyncRequiredError, not go on past the hole.
     */
    const holdConsumerBehindTrim = async (): Promise<string> => {
      const group = `held-${faultLog.length}`;
      let release: () => void = () => undefined;
      const gate = new Promise<void>((resolve) => (release = resolve));
      const handled: TransitionEntry[] = [];
      const held = new TransitionConsumer({
        redis: redisUrl,
        streamKey,
        group,
        consumer: 'held',
        batchSize: 1,
        blockMs: 200,
        versions: keepAll,
        handler: async (entry) => {
          handled.push(entry);
          if (handled.length === 1) await gate;
        },
      });
      const outcome = held.run().then(
        () => 'stopped' as const,
        (err: unknown) => err,
      );
      try {
        const first = await until(() => handled[0]?.streamId, 15_000);
        if (first === undefined) return 'no entry came to hold the consumer on';
        const behind = await until(async () => {
          const next = await admin_.xrange(streamKey, `(${first}`, '+', 'COUNT', 41);
          return next.length >= 41 ? next[40]?.[0] : undefined;
        }, 20_000);
        if (behind === undefined) return 'too little traffic behind the held consumer';
        if ((await until(() => (auditReached(behind) ? true : undefined), 20_000)) === undefined) return 'the audit did not catch up; nothing trimmed';
        const trimmed = await admin_.xtrim(streamKey, 'MINID', behind);
        release();
        const result = await Promise.race([outcome, until(() => (handled.length > 1 ? 'skipped' : undefined), 15_000)]);
        if (result instanceof ResyncRequiredError) {
          counters.resyncs++;
          return `consumer held at ${first}; ${trimmed} entries trimmed behind it; it stopped with resync_required`;
        }
        if (result === 'skipped') counters.skipped++;
        return `consumer held at ${first}; ${trimmed} entries trimmed; it ${result === 'skipped' ? 'WENT ON PAST THE HOLE' : `ended with ${String(result)}`}`;
      } finally {
        release();
        await held.close();
        await admin_.xgroup('DESTROY', streamKey, group).catch(() => undefined);
      }
    };

    let lastFaultAt = 0;
    const workloadStart = Date.now();
    for (let k = 0; ; k++) {
      const at = options.faultEveryS * (k + 1);
      if (at > options.durationS) break;
      await sleep(Math.max(0, at * 1000 - (Date.now() - workloadStart)));
      // the last fault is the heaviest, so that "drain after the last fault" measures a recovery
      const last = options.faultEveryS * (k + 2) > options.durationS;
      const kind = last ? 'postgres-restart' : (kinds[k % kinds.length] ?? 'kill-worker');
      const started = Date.now();
      let detail: string;
      try {
        detail = await inject(kind);
      } catch (err) {
        detail = `failed: ${err instanceof Error ? err.message : String(err)}`;
      }
      const record = { atS: Number(elapsed().toFixed(1)), kind, detail, tookMs: Date.now() - started };
      faultLog.push(record);
      lastFaultAt = Date.now();
      log(`fault ${kind}: ${detail}${record.tookMs > 100 ? ` (${record.tookMs} ms)` : ''}`);
    }
    log(`fault window over; ${sent.size} events so far; draining`);

    // --- drain: every script finished, the queue idle, the outbox published
    const deadline = Date.now() + options.drainTimeoutS * 1000;
    const abortAt = setTimeout(() => {
      aborted = true;
      for (const w of waiting.values()) w.reject(new Aborted());
      waiting.clear();
    }, Math.max(0, deadline - Date.now()));
    const progress = setInterval(() => log(`draining: ${counters.scriptsFinished}/${scripts.length} scripts done, ${sent.size} events`), 10_000);
    await Promise.all(scriptRuns);
    while (background.size > 0 && !aborted) await Promise.race([...background]);
    let drainedAt: number | null = null;
    while (!aborted) {
      try {
        const counts = await producer_.queue.getJobCounts('waiting', 'active', 'delayed', 'prioritized', 'waiting-children');
        const busy = Object.values(counts).reduce((a, b) => a + b, 0);
        const { rows } = await pool_.query<{ n: string }>(`SELECT count(*) AS n FROM outbox WHERE published_at IS NULL`);
        if (busy === 0 && Number(rows[0]?.n) === 0) {
          drainedAt = Date.now();
          break;
        }
      } catch {
        // a service is still coming back
      }
      await sleep(250);
    }
    clearTimeout(abortAt);
    clearInterval(progress);
    polling = false;
    await poller;
    for (const [id, label] of [...stepOf].slice(0, 10)) log(`unfinished: deployment ${id} at step ${label}`);
    log(drainedAt === null ? `drain timed out after ${options.drainTimeoutS}s` : `drained ${((drainedAt - lastFaultAt) / 1000).toFixed(1)}s after the last fault`);

    // a moment for a relay that is between XADD and its mark, then stop the workers gracefully
    await workerPool.stop();
    workers = null;
    auditStopped = true;
    await (audit as TransitionConsumer | null)?.close();

    // --- accounting
    const processed = new Map(
      (await pool_.query<{ event_id: string; outcome: string }>(`SELECT event_id, outcome FROM processed_events`)).rows.map((r) => [r.event_id, r.outcome]),
    );
    let applied = 0;
    let noop = 0;
    let rejected = 0;
    let lost = 0;
    let wrongOutcome = 0;
    const lostSamples: string[] = [];
    for (const [eventId, event] of sent) {
      const outcome = processed.get(eventId);
      if (outcome !== undefined) {
        if (event.expect.kind === 'rejected') wrongOutcome++;
        if (outcome === 'applied') applied++;
        else noop++;
        continue;
      }
      const job = await producer_.queue.getJob(jobIdFor(eventId));
      const seen = rejectionsSeen.get(eventId);
      const state = job === undefined ? (seen === undefined ? 'missing' : 'failed') : await job.getState();
      const reason = job?.failedReason ?? seen ?? '';
      if (event.expect.kind === 'rejected' && state === 'failed' && reason.startsWith(`${event.expect.code}:`)) {
        rejected++;
        continue;
      }
      if (state === 'failed') wrongOutcome++;
      lost++;
      if (lostSamples.length < 20) lostSamples.push(`${eventId} ${event.name} ${event.data.deploymentId}: job ${state}${reason === '' ? '' : ` (${reason})`}`);
    }

    const { rows: finals } = await pool_.query<{ id: string; state: string; current_attempt_id: string | null }>(
      `SELECT id, state, current_attempt_id FROM deployments`,
    );
    const finalById = new Map(finals.map((r) => [r.id, r]));
    let wrongFinalState = 0;
    for (const script of scripts) {
      const row = finalById.get(script.deploymentId);
      if (row === undefined || row.state !== script.final.state || row.current_attempt_id !== script.final.currentAttemptId) {
        wrongFinalState++;
        if (lostSamples.length < 20) {
          lostSamples.push(
            `${script.deploymentId}: ended ${row === undefined ? 'absent' : `${row.state}/${String(row.current_attempt_id)}`}, script says ${script.final.state}/${String(script.final.currentAttemptId)}`,
          );
        }
      }
    }

    const checkDs = createDataSource({ url: databaseUrl, poolSize: 2, applicationName: 'lifecycle-fleet-chaos-check' });
    await checkDs.initialize();
    let history: HistoryReport;
    try {
      const events = new Map<string, SentEvent>([...sent].map(([id, e]) => [id, { name: e.name, data: e.data }]));
      history = await checkHistory({ dataSource: checkDs, stream: { redis: admin_, key: streamKey, before: auditEntries }, events, maxViolations: 20 });
    } finally {
      await checkDs.destroy();
    }

    const byKind: Partial<Record<FaultKind, number>> = {};
    for (const f of faultLog) byKind[f.kind] = (byKind[f.kind] ?? 0) + 1;
    const streamGaps = history.stream?.gaps ?? 0;
    const report: ChaosReport = {
      ok:
        lost === 0 &&
        wrongOutcome === 0 &&
        history.appliedTwice === 0 &&
        streamGaps === 0 &&
        history.ok &&
        wrongFinalState === 0 &&
        drainedAt !== null &&
        counters.skipped === 0,
      options: {
        deployments: options.deployments,
        workers: options.workers,
        concurrency: options.concurrency,
        durationS: options.durationS,
        faultEveryS: options.faultEveryS,
        phases: options.phases,
        drainTimeoutS: options.drainTimeoutS,
        seed: options.seed,
      },
      events: { sent: sent.size, applied, noop, rejected, lost, wrongOutcome, resent: counters.resent, redelivered: counters.redelivered, replayed: counters.replayed },
      appliedTwice: history.appliedTwice,
      consumers: { resyncs: counters.resyncs, skipped: counters.skipped, auditRestarts: counters.auditRestarts },
      streamGaps,
      streamRepeats: history.stream?.repeats ?? 0,
      transitions: history.transitions,
      deployments: { total: scripts.length, scriptsFinished: counters.scriptsFinished, wrongFinalState },
      faults: { total: faultLog.length, byKind, leaderKills },
      workerStarts: workerPool.started,
      unexpectedWorkerExits: workerPool.unexpectedExits,
      checker: { ok: history.ok, violationCounts: history.violationCounts, violations: history.violations },
      lostSamples,
      timings: {
        totalS: Number(elapsed().toFixed(1)),
        lastFaultAtS: Number(((lastFaultAt - t0) / 1000).toFixed(1)),
        drainAfterLastFaultS: drainedAt === null ? null : Number(((drainedAt - lastFaultAt) / 1000).toFixed(1)),
      },
      faultLog,
    };
    if (options.jsonFile !== null) fs.writeFileSync(options.jsonFile, `${JSON.stringify(report, null, 2)}\n`);
    return report;
  } finally {
    process.off('exit', onExit);
    await workers?.stop(5000);
    await producer?.close();
    admin?.disconnect();
    await pool?.end().catch(() => undefined);
    await services.stop();
  }
}

export function formatReport(r: ChaosReport): string {
  const lines = [
    '',
    `chaos report (seed ${r.options.seed}): ${r.ok ? 'OK' : 'FAILED'}`,
    `  scale               ${r.options.deployments} deployments, ${r.options.workers} worker processes x ${r.options.concurrency}, ${r.options.durationS} s of faults every ${r.options.faultEveryS} s`,
    `  events sent         ${r.events.sent} distinct (${r.events.replayed} of them out-of-order replays under new eventIds)`,
    `    + duplicates      ${r.events.resent} re-enqueued (same jobId), ${r.events.redelivered} redelivered (same eventId, new jobId)`,
    `  applied             ${r.events.applied}`,
    `  noop                ${r.events.noop}`,
    `  rejected            ${r.events.rejected} (as the scripts expected)`,
    `  lost                ${r.events.lost}`,
    `  wrong outcome       ${r.events.wrongOutcome}`,
    `  applied twice       ${r.appliedTwice}`,
    `  stream gaps         ${r.streamGaps} (${r.streamRepeats} repeated entries, allowed)`,
    `  transitions         ${r.transitions}`,
    `  final states        ${r.deployments.total - r.deployments.wrongFinalState}/${r.deployments.total} as scripted (${r.deployments.scriptsFinished} scripts finished)`,
    `  history checker     ${r.checker.ok ? 'clean' : JSON.stringify(r.checker.violationCounts)}`,
    `  faults              ${r.faults.total}: ${Object.entries(r.faults.byKind).map(([k, n]) => `${k} x${n}`).join(', ')}`,
    `  relay leader kills  ${r.faults.leaderKills}`,
    `  held consumers      ${r.consumers.resyncs} stopped with resync_required, ${r.consumers.skipped} went past the hole (audit restarts ${r.consumers.auditRestarts})`,
    `  worker starts       ${r.workerStarts} (${r.unexpectedWorkerExits} exited by themselves: a worker started while a service is down exits 1, and is restarted)`,
    `  drain after last fault  ${r.timings.drainAfterLastFaultS === null ? 'did not drain' : `${r.timings.drainAfterLastFaultS} s`} (last fault at ${r.timings.lastFaultAtS} s, total ${r.timings.totalS} s)`,
  ];
  for (const v of r.checker.violations.slice(0, 10)) lines.push(`  ! ${v.kind} ${v.deploymentId} v${String(v.version ?? '-')}: ${v.detail}`);
  for (const s of r.lostSamples.slice(0, 10)) lines.push(`  ! ${s}`);
  return `${lines.join('\n')}\n`;
}

async function main(): Promise<number> {
  let options: ChaosOptions;
  try {
    options = parseChaosArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`chaos: ${err instanceof Error ? err.message : String(err)}\n`);
    return 2;
  }
  const report = await runChaos(options, (line) => process.stderr.write(`${line}\n`));
  process.stdout.write(formatReport(report));
  return report.ok ? 0 : 1;
}

if (require.main === module) {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`chaos: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      process.exit(1);
    },
  );
}
