/** The chaos run's report: what it holds, how it is put together from a finished run, and its text form. */
import type { EventCounts } from './accounting';
import type { HistoryReport } from './history-checker';
import type { ChaosOptions } from './options';
import type { FaultKind, FaultRecord } from './schedule';

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

/** What a finished run measured, for `buildReport`. */
export interface RunResults {
  readonly options: ChaosOptions;
  readonly events: EventCounts & { readonly sent: number; readonly resent: number; readonly redelivered: number; readonly replayed: number };
  readonly history: HistoryReport;
  readonly consumers: ChaosReport['consumers'];
  readonly deployments: ChaosReport['deployments'];
  readonly faultLog: readonly FaultRecord[];
  readonly leaderKills: number;
  readonly workers: { readonly started: number; readonly unexpectedExits: number };
  readonly lostSamples: readonly string[];
  /** ms since the epoch: the run's start, the last fault's end, the drain's end (null: it did not drain) */
  readonly t0: number;
  readonly lastFaultAt: number;
  readonly drainedAt: number | null;
}

const seconds = (ms: number): number => Number((ms / 1000).toFixed(1));

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
    r.consumers.skipped === 0;
  const { deployments, workers, concurrency, durationS, faultEveryS, phases, drainTimeoutS, seed } = options;
  return {
    ok,
    options: { deployments, workers, concurrency, durationS, faultEveryS, phases, drainTimeoutS, seed },
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
    streamGaps,
    streamRepeats: history.stream?.repeats ?? 0,
    transitions: history.transitions,
    deployments: r.deployments,
    faults: { total: r.faultLog.length, byKind, leaderKills: r.leaderKills },
    workerStarts: r.workers.started,
    unexpectedWorkerExits: r.workers.unexpectedExits,
    checker: { ok: history.ok, violationCounts: history.violationCounts, violations: history.violations },
    lostSamples: r.lostSamples,
    timings: {
      totalS: seconds(Date.now() - r.t0),
      lastFaultAtS: seconds(r.lastFaultAt - r.t0),
      drainAfterLastFaultS: r.drainedAt === null ? null : seconds(r.drainedAt - r.lastFaultAt),
    },
    faultLog: r.faultLog,
  };
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
