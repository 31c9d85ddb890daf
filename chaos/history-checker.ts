/**
 * The history checker: after a run (a test, the chaos suite, an incident), verifies from PostgreSQL and the
 * transition stream alone that nothing was lost, nothing was applied twice and the stream is complete.
 *
 * For every deployment:
 * - history: `state_transitions` versions are exactly 1..`deployments.version`, one row each;
 * - exactly once: every history row's eventId has one `processed_events` row with outcome `applied` for the same
 *   deployment and version, and every `applied` row has exactly one history row; no eventId is in history twice;
 * - the machine: replaying `decide` over the applied events in version order reproduces every transition (from,
 *   to, reason) and ends in the deployment's state, version and current attempt, and in every attempt's status.
 *   Applied events are rebuilt from history (the reason names the event; `attempt.end`'s outcome, `resolve`'s
 *   outcome and `teardown`'s force follow from it), so the check needs no producer-side record;
 * - given what the producer sent (`events`), every recorded noop is checked too: at the version it saw, the
 *   machine must decide the same noop; and every applied event must be the event that was sent;
 * - the stream (`stream`, every partition): every version appears; the first occurrences of a deployment's versions come in
 *   increasing order; a repeat is identical to its first occurrence; every entry matches its history row.
 *
 * Read-only; safe to run against a live fleet, though in-flight transitions may then show as stream gaps.
 *
 * This file has the report's shape, the database checks (versions, exactly once) and the walk over deployments;
 * history-rows.ts reads PostgreSQL, history-replay.ts replays the machine, history-stream.ts checks the stream.
 */
import type { RedisConnection } from '../src/redis/connection';
import type { DataSource } from 'typeorm';
import type { TransitionEntry } from '../src/streams/consumer';
import {
  Collector,
  groupBy,
  readHistoryRows,
  type AttemptRow,
  type DeploymentRow,
  type HistoryRows,
  type ProcessedRow,
  type TransitionRow,
} from './history-rows';
import { checkFinalState, checkNoops, replayDeployment } from './history-replay';
import { checkStream } from './history-stream';

export { eventFromHistory, eventFromSent } from './history-replay';

export type ViolationKind =
  /** history versions are not exactly 1..version (a version is missing or repeated) */
  | 'version_gap'
  /** the deployment's version is not the highest history version */
  | 'version_mismatch'
  /** one eventId has more than one history row */
  | 'applied_twice'
  /** a history row whose eventId has no matching `applied` processed_events row */
  | 'history_without_claim'
  /** a processed_events `applied` row with no history row at its version */
  | 'claim_without_history'
  /** the machine, replayed, does not make this transition */
  | 'replay_mismatch'
  /** after the replay, the deployment or an attempt is not where the machine says */
  | 'final_state_mismatch'
  /** (with `events`) a recorded noop the machine would not have decided at that version */
  | 'noop_mismatch'
  /** (with `events`) an applied or noop event that is not what the producer sent */
  | 'event_mismatch'
  /** the stream lacks a version of the deployment */
  | 'stream_missing_version'
  /** a version's first occurrence comes after a higher version's first occurrence */
  | 'stream_out_of_order'
  /** a stream entry differs from its history row or from its own first occurrence */
  | 'stream_entry_mismatch'
  /** a stream entry for a version or deployment that history does not have */
  | 'stream_unknown_entry';

export interface Violation {
  readonly kind: ViolationKind;
  readonly deploymentId: string;
  readonly version?: number;
  readonly eventId?: string;
  readonly detail: string;
}

/** An event as the producer sent it: the job name and payload. */
export interface SentEvent {
  readonly name: string;
  readonly data: Readonly<Record<string, unknown>>;
}

export interface HistoryCheckOptions {
  readonly dataSource: DataSource;
  /**
   * check the transition stream too: a connection and `<prefix>:transitions` (the base key: every partition the
   * fleet recorded is read); `before`: entries a consumer read before they were trimmed away (per deployment in
   * stream order), checked as if the stream still held them
   */
  readonly stream?: StreamSource;
  /** only these deployments (default: every deployment in the database) */
  readonly deploymentIds?: readonly string[];
  /** what the producer sent, by eventId: enables the noop and event checks */
  readonly events?: ReadonlyMap<string, SentEvent>;
  /** violations listed in the report (default 50); all are counted */
  readonly maxViolations?: number;
  /**
   * The relay prunes processed_events rows after its `processedRetentionMs` (7 days): transitions made before this
   * instant need no claim. Default: every transition needs one.
   */
  readonly claimsSince?: Date;
}

export interface StreamSummary {
  readonly entries: number;
  /** entries that repeat an earlier entry (at-least-once delivery) */
  readonly repeats: number;
  /** versions missing from the stream */
  readonly gaps: number;
  readonly outOfOrder: number;
  readonly mismatches: number;
}

export interface HistoryReport {
  /** true when there is no violation */
  readonly ok: boolean;
  readonly deployments: number;
  readonly transitions: number;
  readonly processed: { readonly applied: number; readonly noop: number };
  /** eventIds in history more than once */
  readonly appliedTwice: number;
  /** missing or repeated history versions */
  readonly historyGaps: number;
  readonly stream: StreamSummary | null;
  readonly violationCounts: Readonly<Partial<Record<ViolationKind, number>>>;
  /** the first `maxViolations` violations */
  readonly violations: readonly Violation[];
}

export interface StreamSource {
  readonly redis: RedisConnection;
  readonly key: string;
  readonly before?: readonly TransitionEntry[];
}

export async function checkHistory(options: HistoryCheckOptions): Promise<HistoryReport> {
  const v = new Collector(options.maxViolations ?? 50);
  const scope = options.deploymentIds === undefined ? null : [...options.deploymentIds];
  const rows = await readHistoryRows(options.dataSource, scope);
  const appliedTwice = checkAppliedTwice(v, rows.allTransitions);

  let historyGaps = 0;
  const byDeployment = new Map<string, DeploymentRow>();
  for (const d of rows.deployments) {
    byDeployment.set(d.id, d);
    historyGaps += checkDeployment(v, d, rows, options);
  }
  // processed rows and history of deployments that do not exist
  for (const [deploymentId, history] of rows.transitions) {
    if (!byDeployment.has(deploymentId)) {
      v.add({ kind: 'version_gap', deploymentId, detail: `${history.length} history rows for a deployment that does not exist` });
    }
  }

  const stream =
    options.stream === undefined
      ? null
      : await checkStream(options.stream, scope === null ? null : new Set(scope), byDeployment, rows.transitions, v);

  const applied = rows.allProcessed.filter((p) => p.outcome === 'applied').length;
  return {
    ok: v.list.length === 0,
    deployments: rows.deployments.length,
    transitions: rows.allTransitions.length,
    processed: { applied, noop: rows.allProcessed.length - applied },
    appliedTwice,
    historyGaps,
    stream,
    violationCounts: v.counts,
    violations: v.list,
  };
}

/** Exactly once: eventIds in history more than once. */
function checkAppliedTwice(v: Collector, allTransitions: readonly TransitionRow[]): number {
  let appliedTwice = 0;
  for (const [eventId, rows] of groupBy(allTransitions, (r) => r.event_id)) {
    if (rows.length > 1) {
      appliedTwice++;
      v.add({
        kind: 'applied_twice',
        deploymentId: rows[0]?.deployment_id ?? '',
        eventId,
        detail: `in history ${rows.length} times (versions ${rows.map((r) => r.version).join(', ')})`,
      });
    }
  }
  return appliedTwice;
}

/** Every check of one deployment; returns its history gaps. */
function checkDeployment(v: Collector, d: DeploymentRow, all: HistoryRows, options: HistoryCheckOptions): number {
  const rows = all.transitions.get(d.id) ?? [];
  const ownAttempts: readonly AttemptRow[] = all.attempts.get(d.id) ?? [];
  const ownProcessed: readonly ProcessedRow[] = all.processed.get(d.id) ?? [];
  const gaps = checkVersions(v, d, rows);
  checkClaims(v, d, rows, all.processedById, ownProcessed, options.claimsSince);
  const replay = replayDeployment(v, d, rows, all.processedById, options.events);
  const final = replay.states[replay.states.length - 1];
  if (replay.ok && final !== undefined) checkFinalState(v, d, final, ownAttempts);
  // noops, checked against the machine at the version they saw
  if (options.events !== undefined && replay.ok) checkNoops(v, d.id, replay.states, ownProcessed, options.events);
  return gaps;
}

/** History versions are exactly 1..version; returns how many are missing, repeated or beyond the version. */
function checkVersions(v: Collector, d: DeploymentRow, rows: readonly TransitionRow[]): number {
  let gaps = 0;
  const versions = rows.map((r) => r.version);
  const expected = Array.from({ length: d.version }, (_, i) => i + 1);
  if (versions.length !== expected.length || versions.some((ver, i) => ver !== expected[i])) {
    const present = new Set(versions);
    const missing = expected.filter((ver) => !present.has(ver));
    const repeated = versions.filter((ver, i) => versions.indexOf(ver) !== i);
    const extra = versions.filter((ver) => ver > d.version);
    gaps = missing.length + repeated.length + extra.length;
    v.add({
      kind: 'version_gap',
      deploymentId: d.id,
      detail:
        `history versions [${versions.join(', ')}] for version ${d.version}` +
        `${missing.length > 0 ? `; missing ${missing.join(', ')}` : ''}${repeated.length > 0 ? `; repeated ${repeated.join(', ')}` : ''}`,
    });
  }
  const top = versions.length === 0 ? 0 : Math.max(...versions);
  if (top !== d.version) {
    v.add({ kind: 'version_mismatch', deploymentId: d.id, detail: `version ${d.version}, highest history version ${top}` });
  }
  return gaps;
}

/** Every history row is claimed by exactly one applied processed row, and vice versa. */
function checkClaims(
  v: Collector,
  d: DeploymentRow,
  rows: readonly TransitionRow[],
  processedById: ReadonlyMap<string, ProcessedRow>,
  ownProcessed: readonly ProcessedRow[],
  claimsSince: Date | undefined,
): void {
  for (const row of rows) {
    const claim = processedById.get(row.event_id);
    if (claim === undefined && claimsSince !== undefined && row.created_at < claimsSince) continue;
    if (claim === undefined || claim.outcome !== 'applied' || claim.deployment_id !== d.id || claim.version !== row.version) {
      v.add({
        kind: 'history_without_claim',
        deploymentId: d.id,
        version: row.version,
        eventId: row.event_id,
        detail:
          claim === undefined
            ? 'no processed_events row'
            : `processed_events says ${claim.outcome} at version ${String(claim.version)} of ${claim.deployment_id}`,
      });
    }
  }
  const rowAt = new Map(rows.map((r) => [r.version, r]));
  for (const p of ownProcessed) {
    if (p.outcome !== 'applied') continue;
    const row = p.version === null ? undefined : rowAt.get(p.version);
    if (row === undefined || row.event_id !== p.event_id) {
      v.add({
        kind: 'claim_without_history',
        deploymentId: d.id,
        version: p.version ?? undefined,
        eventId: p.event_id,
        detail: row === undefined ? 'no history row at that version' : `history row at that version is event ${row.event_id}`,
      });
    }
  }
}
