/** The chaos run's report: what it holds, how it is put together from a finished run, and its text form. */
import type { EventCounts } from './accounting';
import { groupClean, type ConsumerGroupReport } from './consumer-group';
import type { HistoryReport } from './history-checker';
import type { ChaosOptions } from './options';
import type { FailoverEvent, HostActivity, PartitionRecord, PgFailoverEvent } from './host-faults';
import type { FaultKind, FaultRecord } from './schedule';
import type { SweepCounts } from './sweeps';
import { upgradeShown, type UpgradeReport } from './upgrade';

/** A partitioned worker's held jobs must run again elsewhere within this (issue 17). */
export const RERUN_WITHIN_MS = 15_000;
/** After the relay leader's host is cut off, another relay must publish within this. */
export const TAKEOVER_WITHIN_MS = 30_000;

/** What a run on several hosts measured. */
export interface HostsReport {
  readonly partitions: readonly PartitionRecord[];
  readonly failovers: readonly FailoverEvent[];
  /** PostgreSQL failovers (--pg-failover) */
  readonly pgFailovers: readonly PgFailoverEvent[];
  /** how many jobs each worker host finished, and when it last did */
  readonly activity: readonly HostActivity[];
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
  readonly consumers: {
    readonly resyncs: number;
    readonly skipped: number;
    readonly auditRestarts: number;
    /** why the audit consumer stopped: `other` (not a resync, not a lost group) must be 0 */
    readonly auditStops: { readonly resync: number; readonly other: number };
  };
  /** the consumer group of several processes: its faults, and its check (complete, in order, fenced) */
  readonly group: ConsumerGroupReport;
  readonly streamGaps: number;
  readonly streamRepeats: number;
  readonly transitions: number;
  readonly deployments: { readonly total: number; readonly scriptsFinished: number; readonly wrongFinalState: number };
  readonly faults: { readonly total: number; readonly byKind: Readonly<Partial<Record<FaultKind, number>>>; readonly leaderKills: number };
  readonly workerStarts: number;
  readonly unexpectedWorkerExits: number;
  /** those exits by exit code or signal (`code 4`: a service unreachable at its start; `code 5`: its fetch watchdog) */
  readonly workerExitsBy: Readonly<Record<string, number>>;
  readonly checker: Pick<HistoryReport, 'ok' | 'violationCounts' | 'violations'>;
  readonly lostSamples: readonly string[];
  /** sweep ticks counted from the workers' logs: each must start exactly once */
  readonly sweeps: SweepCounts;
  /** partitions and failovers (--hosts), or null */
  readonly hosts: HostsReport | null;
  /** a mixed-version run's upgrade (--previous), or null */
  readonly upgrade: UpgradeReport | null;
  readonly timings: { readonly totalS: number; readonly lastFaultAtS: number; readonly drainAfterLastFaultS: number | null };
  readonly faultLog: readonly FaultRecord[];
}

/** What a finished run measured, for `buildReport`. */
export interface RunResults {
  readonly options: ChaosOptions;
  readonly events: EventCounts & { readonly sent: number; readonly resent: number; readonly redelivered: number; readonly replayed: number };
  readonly history: HistoryReport;
  readonly consumers: ChaosReport['consumers'];
  readonly group: ConsumerGroupReport;
  readonly deployments: ChaosReport['deployments'];
  readonly faultLog: readonly FaultRecord[];
  readonly leaderKills: number;
  readonly workers: { readonly started: number; readonly unexpectedExits: number; readonly exitsBy: Readonly<Record<string, number>> };
  readonly lostSamples: readonly string[];
  readonly sweeps: SweepCounts;
  readonly hosts: HostsReport | null;
  readonly upgrade: UpgradeReport | null;
  /** ms since the epoch: the run's start, the last fault's end, the drain's end (null: it did not drain) */
  readonly t0: number;
  readonly lastFaultAt: number;
  readonly drainedAt: number | null;
}

const seconds = (ms: number): number => Number((ms / 1000).toFixed(1));

/** Every partitioned worker's held jobs ran again in time; every cut-off leader was replaced and published in time. */
export function hostsHeld(hosts: HostsReport | null): boolean {
  if (hosts === null) return true;
  return (
    hosts.partitions.every(
      (p) =>
        p.notRerun === 0 &&
        (p.rerunMaxMs === null || p.rerunMaxMs <= RERUN_WITHIN_MS) &&
        (!p.ledRelay || (p.firstPublishMs !== null && p.firstPublishMs <= TAKEOVER_WITHIN_MS)),
    ) &&
    hosts.failovers.every((f) => f.rejoinedAfterMs !== null) &&
    hosts.pgFailovers.every((f) => f.rejoinedAfterMs !== null && f.twoPrimaries === 0 && f.fleetAppliedMs !== null && f.decidedBefore > 0) &&
    hosts.activity.every((a) => a.probed > 0)
  );
}

/** Decided events the PostgreSQL failovers lost (0 with synchronous replication). */
export function pgFailoverLosses(hosts: HostsReport | null): number {
  return hosts === null ? 0 : hosts.pgFailovers.reduce((n, f) => n + f.ackedLost, 0);
}

/** Acknowledged events the failovers lost (the run's `lost` must stay 0 with durable enqueue; without, it may not). */
export function failoverLosses(hosts: HostsReport | null): number {
  return hosts === null ? 0 : hosts.failovers.reduce((n, f) => n + Math.max(0, f.ackedLost), 0);
}

export function buildReport(r: RunResults): ChaosReport {
  const { options, events, history } = r;
  const byKind: Partial<Record<FaultKind, number>> = {};
  for (const f of r.faultLog) byKind[f.kind] = (byKind[f.kind] ?? 0) + 1;
  const streamGaps = history.stream?.gaps ?? 0;
  const ok =
    events.lost === 0 &&
    events.wrongOutcome === 0 &&
    history.appliedTwice === 0 &&
    streamGaps === 0 &&
    history.ok &&
    r.deployments.wrongFinalState === 0 &&
    r.drainedAt !== null &&
    r.consumers.skipped === 0 &&
    r.consumers.auditStops.other === 0 &&
    groupClean(r.group) &&
    r.sweeps.startedTwice === 0 &&
    hostsHeld(r.hosts) &&
    (r.upgrade === null || upgradeShown(r.upgrade)) &&
    (!options.durable || failoverLosses(r.hosts) === 0) &&
    (!options.pgSync || pgFailoverLosses(r.hosts) === 0) &&
    // every PostgreSQL failover injected was measured to its end (one that failed half-way leaves no record)
    (r.hosts?.pgFailovers.length ?? 0) === (byKind['postgres-failover'] ?? 0);
  const {
    deployments,
    workers,
    concurrency,
    durationS,
    faultEveryS,
    phases,
    drainTimeoutS,
    seed,
    hosts,
    redisCluster,
    durable,
    partitionS,
    streamPartitions,
    previous,
    pgFailover,
    pgSync,
  } = options;
  return {
    ok,
    options: {
      deployments,
      workers,
      concurrency,
      durationS,
      faultEveryS,
      phases,
      drainTimeoutS,
      seed,
      hosts,
      redisCluster,
      durable,
      partitionS,
      streamPartitions,
      previous,
      pgFailover,
      pgSync,
    },
    events: {
      sent: events.sent,
      applied: events.applied,
      noop: events.noop,
      rejected: events.rejected,
      lost: events.lost,
      wrongOutcome: events.wrongOutcome,
      resent: events.resent,
      redelivered: events.redelivered,
      replayed: events.replayed,
    },
    appliedTwice: history.appliedTwice,
    consumers: r.consumers,
    group: r.group,
    streamGaps,
    streamRepeats: history.stream?.repeats ?? 0,
    transitions: history.transitions,
    deployments: r.deployments,
    faults: { total: r.faultLog.length, byKind, leaderKills: r.leaderKills },
    workerStarts: r.workers.started,
    unexpectedWorkerExits: r.workers.unexpectedExits,
    workerExitsBy: r.workers.exitsBy,
    checker: { ok: history.ok, violationCounts: history.violationCounts, violations: history.violations },
    lostSamples: r.lostSamples,
    sweeps: r.sweeps,
    hosts: r.hosts,
    upgrade: r.upgrade,
    timings: {
      totalS: seconds(Date.now() - r.t0),
      lastFaultAtS: seconds(r.lastFaultAt - r.t0),
      drainAfterLastFaultS: r.drainedAt === null ? null : seconds(r.drainedAt - r.lastFaultAt),
    },
    faultLog: r.faultLog,
  };
}

export function formatReport(r: ChaosReport): string {
  const where =
    r.options.hosts > 0
      ? `, on ${r.options.hosts} hosts${r.options.redisCluster ? ' with a Redis Cluster' : ''}, durable enqueue ${r.options.durable ? 'on' : 'off'}${r.options.pgFailover ? `, PostgreSQL failing over (${r.options.pgSync ? 'synchronous' : 'asynchronous'} replication)` : ''}`
      : '';
  const lines = [
    '',
    `chaos report (seed ${r.options.seed}${where}): ${r.ok ? 'OK' : 'FAILED'}`,
    `  scale               ${r.options.deployments} deployments, ${r.options.workers} worker processes x ${r.options.concurrency}, ${r.options.durationS} s of faults every ${r.options.faultEveryS} s, a stream of ${r.options.streamPartitions} partition(s)`,
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
    `  faults              ${r.faults.total}: ${Object.entries(r.faults.byKind)
      .map(([k, n]) => `${k} x${n}`)
      .join(', ')}`,
    `  relay leader kills  ${r.faults.leaderKills}`,
    `  held consumers      ${r.consumers.resyncs} stopped with resync_required, ${r.consumers.skipped} went past the hole (audit restarts ${r.consumers.auditRestarts}: ${r.consumers.auditStops.resync} resync, ${r.consumers.auditStops.other} other)`,
    ...groupLines(r),
    `  worker starts       ${r.workerStarts} (${r.unexpectedWorkerExits} exited by themselves and were restarted: ${
      Object.entries(r.workerExitsBy)
        .map(([how, n]) => `${how} x${n}`)
        .join(', ') || 'none'
    }; code 4: a service unreachable at its start, code 5: its fetch watchdog found it stuck)`,
    `  sweep ticks         ${r.sweeps.ticks} started, ${r.sweeps.startedTwice} started twice, ${r.sweeps.refused} redeliveries refused, ${r.sweeps.missing} never started`,
    ...hostLines(r),
    ...upgradeLines(r),
    `  drain after last fault  ${r.timings.drainAfterLastFaultS === null ? 'did not drain' : `${r.timings.drainAfterLastFaultS} s`} (last fault at ${r.timings.lastFaultAtS} s, total ${r.timings.totalS} s)`,
  ];
  for (const v of r.checker.violations.slice(0, 10)) lines.push(`  ! ${v.kind} ${v.deploymentId} v${String(v.version ?? '-')}: ${v.detail}`);
  for (const v of r.group.check.violations.slice(0, 10))
    lines.push(
      `  ! ${v.kind}${v.deploymentId === undefined ? '' : ` ${v.deploymentId}`}${v.version === undefined ? '' : ` v${v.version}`}: ${v.detail}`,
    );
  for (const s of r.lostSamples.slice(0, 10)) lines.push(`  ! ${s}`);
  return `${lines.join('\n')}\n`;
}

function groupLines(r: ChaosReport): string[] {
  const g = r.group;
  const { check, faults } = g;
  const violations = Object.values(check.violationCounts).reduce((n, c) => n + c, 0);
  const exits = g.members.exits;
  const cutOff = r.hosts?.partitions.filter((p) => p.consumers.length > 0).length ?? 0;
  return [
    `  consumer group      ${check.calls} handler calls (${check.redelivered} redelivered), ${g.acquisitions} partitions taken over (${g.leasesLost} leases lost), ${g.resyncs.length} resyncs (${check.fromHistory} versions read from history), violations ${violations === 0 ? '0' : JSON.stringify(check.violationCounts)}${g.drained ? '' : ', DID NOT DRAIN'}`,
    `    its faults        ${faults.joins} joins (${faults.leaves} leaves), ${faults.kills} SIGKILLs (${faults.killsMidHandler} mid-handler), ${faults.pauses} pauses past the lease${r.hosts === null ? '' : `, ${cutOff} hosts cut off with a member`}; ${g.members.initial}-${g.members.max} members, ${g.members.started} processes, exits by themselves: ${exits.resync} resync, ${exits.other} other`,
  ];
}

function upgradeLines(r: ChaosReport): string[] {
  const u = r.upgrade;
  if (u === null) return [];
  const s = u.samples;
  const at = (v: number | null): string => (v === null ? 'never' : `${v} s`);
  return [
    `  upgrade             ${u.previous.ref} (${u.previous.version}, ${u.previous.commit.slice(0, 7)}) -> ${u.current.version} (${u.current.commit.slice(0, 7)})${upgradeShown(u) ? '' : ': NOT SHOWN (see below)'}`,
    `    migration         ${u.migration.ok ? `started at ${at(u.migration.atS)} under load, fleet migrate done ${u.migration.tookS ?? '-'} s later (its process start included)` : 'FAILED'}: ${u.migration.output} (${u.migration.tries} run(s))`,
    `    workers           ${r.options.workers} of ${u.previous.version} from the start, ${r.options.workers} of ${u.current.version} joined at ${at(u.currentWorkersAtS)}, those of ${u.previous.version} retired by ${at(u.previousRetiredAtS)}`,
    `    1 s samples       ${s.total}: active jobs on ${u.previous.version} ${s.activePrevious}, on ${u.current.version} ${s.activeCurrent}, on both at once ${s.activeBoth}; relay led by ${u.previous.version} ${s.relayPrevious}, by ${u.current.version} ${s.relayCurrent}, moved between them ${s.relayMoves} times`,
    `    producers         ${u.eventsByProducer.previous} events through ${u.previous.version}'s, ${u.eventsByProducer.current} through ${u.current.version}'s; consumer group members started: ${u.previous.version} ${u.membersStarted.previous}, ${u.current.version} ${u.membersStarted.current}`,
  ];
}

const ms = (v: number | null): string => (v === null ? '-' : `${(v / 1000).toFixed(1)} s`);

function hostLines(r: ChaosReport): string[] {
  if (r.hosts === null) return [];
  const { partitions, failovers } = r.hosts;
  const lines = [
    `  partitions          ${partitions.length} (${partitions.filter((p) => p.ledRelay).length} of the relay leader's host), ${r.options.partitionS} s each (the leader's host at least ${TAKEOVER_WITHIN_MS / 1000 + 2} s)`,
  ];
  for (const p of partitions) {
    const relay = p.ledRelay
      ? `; relay taken over after ${ms(p.takeoverMs)}, stream moved after ${ms(p.firstPublishMs)} (within ${TAKEOVER_WITHIN_MS / 1000} s)`
      : '';
    const consumers = p.consumers.length === 0 ? '' : `; consumers ${p.consumers.join(', ')} cut off`;
    lines.push(
      `    at ${p.atS} s ${p.host}: ${p.inFlight} held jobs ran again elsewhere after at most ${ms(p.rerunMaxMs)}${p.notRerun > 0 ? `, ${p.notRerun} did not` : ''} (within ${RERUN_WITHIN_MS / 1000} s)${relay}${consumers}`,
    );
  }
  lines.push(
    `  master failovers    ${failovers.length}: ${failoverLosses(r.hosts)} acknowledged events lost by them (durable enqueue ${r.options.durable ? 'on' : 'off'})`,
  );
  if (r.options.pgFailover) {
    const pg = r.hosts.pgFailovers;
    lines.push(
      `  postgres failovers  ${pg.length} (${r.options.pgSync ? 'synchronous' : 'asynchronous'} replication): ${pgFailoverLosses(r.hosts)} decided events lost by them, ${pg.reduce((n, f) => n + f.inFlightKept, 0)} in-flight commits kept, ${pg.reduce((n, f) => n + f.twoPrimaries, 0)} samples with two primaries`,
    );
    for (const f of pg) {
      lines.push(
        `    at ${f.atS} s ${f.killed} -> ${f.promoted}${f.cutReplicationMs > 0 ? ` (cut off from it ${ms(f.cutReplicationMs)} before, ${f.activeAtCut} jobs in flight)` : ''}: promoted after ${ms(f.promotedMs)}, address moved ${ms(f.addressMovedMs)}, writable ${ms(f.writableMs)}, the fleet applying again ${ms(f.fleetAppliedMs)}; ${f.ackedLost} of ${f.decidedBefore} decided events lost, ${f.inFlightKept} in-flight commits kept; old primary back as a standby after ${ms(f.rejoinedAfterMs)}`,
      );
    }
  }
  lines.push(
    `  jobs finished       ${r.hosts.activity.map((a) => `${a.host} ${a.finished} (last at ${a.lastS ?? '-'} s)`).join(', ')} of the last 10,000 the queue keeps`,
  );
  lines.push(
    `  liveness after it   ${r.hosts.activity.map((a) => `${a.host} took ${a.probed}`).join(', ')} of ${r.hosts.activity.reduce((n, a) => n + a.probed, 0)} jobs sent one at a time to the idle fleet after the faults (each host must take some within 60 s)`,
  );
  for (const f of failovers) {
    lines.push(
      `    at ${f.atS} s master ${f.killed} -> replica ${f.promoted} in ${ms(f.tookMs)}; ${f.ackedLost} acknowledged events lost; old master back as a replica after ${ms(f.rejoinedAfterMs)}`,
    );
  }
  return lines;
}
