/**
 * `npm run chaos`: a bounded fault-injection run of the whole fleet on loopback, ending in a report.
 *
 * It starts its own Redis and PostgreSQL under `<repo>/.fleet/chaos` (so it may kill and restart them), migrates,
 * runs several `fleet worker` processes (each: lifecycle worker, standby-or-leader outbox relay, sweep), and drives
 * a scripted workload (chaos/workload.ts) over hundreds of deployments while it injects faults on a schedule:
 * SIGKILL of workers and of the relay leader, redis-server SIGKILLed and restarted (AOF), PostgreSQL restarted in
 * immediate mode, backends terminated, Redis client connections killed, bursts of redeliveries (same eventId, new
 * job) and of out-of-order replays (old events under new eventIds); and a consumer group of several processes reads
 * the (partitioned) transition stream while its members join, are SIGKILLed mid-handler and paused past their lease
 * (chaos/consumer-group.ts). Then it drains and accounts for every event the generator intended (applied, noop,
 * rejected with the expected code, or lost), checks every deployment's history and the transition stream with the
 * history checker, compares every deployment with the state its script ends in, and checks that the consumer group
 * handled every version of every deployment, per deployment never a lower version after a higher one, never with two
 * owners of a partition at once.
 *
 * Usage: npm run chaos -- [--ci] [--deployments N] [--workers N] [--duration S] [--fault-every S] [--drain-timeout S]
 *        [--phases MIN-MAX] [--concurrency N] [--seed N] [--dir DIR] [--json FILE]
 *        [--hosts N] [--redis-cluster] [--durable | --no-durable] [--partition S] [--stream-partitions N]
 *        [--previous REF] [--pg-failover | --pg-async]
 * With --hosts N the services and N worker hosts each run in a network namespace (chaos/lab.ts) and the faults add
 * partitions of a worker host (and the consumer group's member on it) and of the relay leader's host; with
 * --redis-cluster, master failovers. The stream has 4 partitions unless --stream-partitions says otherwise. With
 * --pg-failover (with --hosts) PostgreSQL is a primary and a streaming standby on hosts of their own that fail over
 * (synchronous replication; --pg-async without it). With
 * --previous REF (e.g. v0.1.0) the run is a rolling upgrade from that release to this checkout (chaos/upgrade.ts).
 * Exit code 0 only when nothing was lost, nothing applied twice, the stream has no gap, the checker is clean and the
 * consumer group's check too.
 */
import * as fs from 'node:fs';
import { countEvents, countWrongFinalStates, checkRunHistory, Samples } from './accounting';
import { AuditConsumer } from './audit';
import { Barriers } from './barriers';
import { ConsumerGroup } from './consumer-group';
import { drain } from './drain';
import { CHAOS_SWEEP_EVERY_S, Fleet } from './fleet';
import { countSweeps } from './sweeps';
import { parseChaosArgs, type ChaosOptions } from './options';
import { buildReport, formatReport, type ChaosReport } from './report';
import { FaultSchedule } from './schedule';
import { ScriptPlayer } from './scripts';
import { Sender } from './sender';
import { Upgrade, type UpgradeReport } from './upgrade';
import { planWorkload, Random } from './workload';

export type { ChaosOptions } from './options';
export type { ChaosReport } from './report';
export type { FaultKind, FaultRecord } from './schedule';
export { parseChaosArgs, formatReport };

/** Runs the chaos suite; `say` gets progress lines. */
export async function runChaos(options: ChaosOptions, say: (line: string) => void): Promise<ChaosReport> {
  const t0 = Date.now();
  const elapsed = () => (Date.now() - t0) / 1000;
  const log = (line: string) => say(`[${elapsed().toFixed(1).padStart(6)}s] ${line}`);
  const fleet = await Fleet.start(options, log);
  const group = new ConsumerGroup(fleet, log);
  const onExit = (): void => group.killAll();
  process.once('exit', onExit);
  try {
    await group.start();
    const report = await runAgainst(fleet, group, options, { t0, elapsed, log });
    if (options.jsonFile !== null) fs.writeFileSync(options.jsonFile, `${JSON.stringify(report, null, 2)}\n`);
    return report;
  } finally {
    process.off('exit', onExit);
    await group.stop();
    await fleet.close();
  }
}

interface Clock {
  readonly t0: number;
  readonly elapsed: () => number;
  readonly log: (line: string) => void;
}

/** The workload under faults, the drain and the accounting, against a started fleet. */
async function runAgainst(fleet: Fleet, group: ConsumerGroup, options: ChaosOptions, { t0, elapsed, log }: Clock): Promise<ChaosReport> {
  const runId = `c${options.seed.toString(36)}`;
  const timing = new Random(options.seed ^ 0x5eed);
  const scripts = planWorkload({ deployments: options.deployments, phases: options.phases, random: new Random(options.seed), runId });
  const sender = new Sender(fleet.producers, timing);
  const audit = new AuditConsumer(fleet.redisUrl, fleet.streamKey, options.streamPartitions, log);
  audit.start();
  const barriers = new Barriers(fleet.pool, fleet.producer);
  const player = new ScriptPlayer(sender, barriers, timing);
  // starts spread over 90 % of the window: scripts are still in flight when the last fault hits
  const scriptRuns = player.startAll(scripts, options.durationS * 900);
  const where =
    options.hosts > 0
      ? ` on ${options.hosts} hosts${options.redisCluster ? ', Redis Cluster' : ''}${options.durable ? ', durable enqueue' : ''}`
      : '';
  log(
    `${scripts.length} deployments, ${options.workers} workers x ${options.concurrency}${where}, faults every ${options.faultEveryS}s for ${options.durationS}s (seed ${options.seed})`,
  );

  const faults = new FaultSchedule({ fleet, group, sender, scripts: player, audit, timing }, options, elapsed, log);
  // a mixed-version run: the upgrade from the previous release plays over the fault window, faults and all
  const upgrade = fleet.previous === null ? null : new Upgrade(fleet, fleet.previous, log);
  try {
    await Promise.all([faults.run(options, elapsed, log), upgrade?.run(options.durationS, elapsed)]);
  } catch (err) {
    await upgrade?.stop(); // no worker grown or retired while the run tears down
    throw err;
  }
  log(`fault window over; ${sender.sent.size} events so far; draining`);

  const drainedAt = await drain({ fleet, sender, barriers, scripts: player, scriptRuns, scriptCount: scripts.length }, options.drainTimeoutS, log);
  await barriers.stop();
  for (const [id, label] of [...player.stepOf].slice(0, 10)) log(`unfinished: deployment ${id} at step ${label}`);
  const { lastFaultAt } = faults;
  log(
    drainedAt === null
      ? `drain timed out after ${options.drainTimeoutS}s`
      : `drained ${((drainedAt - lastFaultAt) / 1000).toFixed(1)}s after the last fault`,
  );

  // every worker host still takes jobs once the faults are over
  const decided = [...sender.sent.values()].filter((e) => e.expect.kind === 'decided');
  // (not after a drain that timed out: the sender is aborted by then, and the run has failed already)
  const probed =
    drainedAt === null ? new Map<string, number>() : await faults.hosts?.probeLiveness((n) => sender.redeliver(timing.pick(decided), `-live${n}`));
  const activity = (await faults.hosts?.activity(t0, probed)) ?? [];
  // a moment for a relay that is between XADD and its mark, then stop the workers gracefully
  await fleet.stopWorkers();
  await audit.stop();
  // the stream is complete now: the consumer group reads it to its end, then stops
  const groupDrained = await group.drain(60_000);
  if (!groupDrained) log('the consumer group did not read the stream to its end within 60 s');
  await group.stop();

  await upgrade?.stop();
  const upgradeReport: UpgradeReport | null = upgrade?.report(sender.sentBy, group.startedBy) ?? null;
  const samples = new Samples();
  const events = await countEvents(fleet, sender.sent, barriers.rejectionsSeen, samples);
  const wrongFinalState = await countWrongFinalStates(fleet, scripts, samples);
  const history = await checkRunHistory(fleet, sender.sent, audit);
  const finalVersions = new Map(
    (await fleet.pool.query<{ id: string; version: number }>(`SELECT id, version FROM deployments`)).rows.map((r) => [r.id, r.version]),
  );
  return buildReport({
    options,
    events: { sent: sender.sent.size, ...events, ...sender.counters },
    history,
    consumers: { ...faults.consumers, auditRestarts: audit.restarts, auditStops: { ...audit.stops } },
    group: group.report(finalVersions, groupDrained),
    deployments: { total: scripts.length, scriptsFinished: player.finished, wrongFinalState },
    faultLog: faults.log,
    leaderKills: faults.leaderKills,
    workers: { started: fleet.workers.started, unexpectedExits: fleet.workers.unexpectedExits, exitsBy: { ...fleet.workers.exitsBy } },
    lostSamples: samples.list,
    sweeps: countSweeps(fleet.workersLog, CHAOS_SWEEP_EVERY_S),
    hosts:
      faults.hosts === null
        ? null
        : { partitions: faults.hosts.partitions, failovers: faults.hosts.failovers, pgFailovers: faults.hosts.pgFailovers, activity },
    upgrade: upgradeReport,
    t0,
    lastFaultAt,
    drainedAt,
  });
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
