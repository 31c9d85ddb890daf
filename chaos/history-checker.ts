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
 * - the stream (`stream`): every version appears; the first occurrences of a deployment's versions come in
 *   increasing order; a repeat is identical to its first occurrence; every entry matches its history row.
 *
 * Read-only; safe to run against a live fleet, though in-flight transitions may then show as stream gaps.
 */
import type IORedis from 'ioredis';
import type { DataSource } from 'typeorm';
import { decide } from '../src/machine';
import type { AttemptStatus, Decision, DeploymentState, MachineEvent, Snapshot, TransitionReason } from '../src/machine';
import { parseEntry, type TransitionEntry } from '../src/streams/consumer';

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
   * check the transition stream too: a connection and `<prefix>:transitions`; `before`: entries a consumer read
   * before they were trimmed away (in stream order), checked as if the stream still held them
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

interface DeploymentRow {
  id: string;
  name: string;
  state: DeploymentState;
  version: number;
  current_attempt_id: string | null;
}
interface AttemptRow {
  id: string;
  deployment_id: string;
  status: AttemptStatus;
}
interface TransitionRow {
  id: string;
  deployment_id: string;
  attempt_id: string | null;
  from_state: DeploymentState | null;
  to_state: DeploymentState;
  version: number;
  reason: string;
  event_id: string;
  created_at: Date;
}
interface ProcessedRow {
  event_id: string;
  event_name: string;
  deployment_id: string;
  outcome: string;
  reason: string;
  version: number | null;
}

/** The deployment as the replay sees it after some number of transitions. */
interface ReplayState {
  readonly name: string;
  readonly state: DeploymentState | null;
  readonly version: number;
  readonly currentAttemptId: string | null;
  readonly attempts: ReadonlyMap<string, AttemptStatus>;
}

/** The event each transition reason comes from: a reason names exactly one event. */
const EVENT_OF_REASON: Readonly<Record<TransitionReason, MachineEvent['type']>> = {
  created: 'deployment.create',
  attempt_created: 'attempt.create',
  attempt_started: 'attempt.start',
  attempt_succeeded: 'attempt.end',
  attempt_failed: 'attempt.end',
  cancelled: 'attempt.cancel',
  orphaned: 'attempt.orphaned',
  progress_deadline_exceeded: 'attempt.expired',
  torn_down: 'deployment.teardown',
  resolved: 'deployment.resolve',
};

function isReason(reason: string): reason is TransitionReason {
  return Object.prototype.hasOwnProperty.call(EVENT_OF_REASON, reason);
}

/** Rebuilds the machine event of an applied transition from its history row. */
export function eventFromHistory(row: Pick<TransitionRow, 'attempt_id' | 'from_state' | 'to_state' | 'reason'>, name: string): MachineEvent | null {
  if (!isReason(row.reason)) return null;
  const type = EVENT_OF_REASON[row.reason];
  const attemptId = row.attempt_id ?? '';
  switch (type) {
    case 'deployment.create':
      return { type, name };
    case 'attempt.create':
    case 'attempt.start':
    case 'attempt.cancel':
    case 'attempt.orphaned':
    case 'attempt.expired':
      return { type, attemptId };
    case 'attempt.end':
      return { type, attemptId, outcome: row.reason === 'attempt_succeeded' ? 'succeeded' : 'failed' };
    case 'deployment.teardown':
      return { type, force: row.from_state === 'unknown' };
    case 'deployment.resolve':
      return { type, outcome: row.to_state === 'ready' ? 'ready' : 'failed' };
  }
}

/** The machine event of a sent event, or null for stamps and anything the machine does not decide. */
export function eventFromSent(sent: SentEvent): MachineEvent | null {
  const d = sent.data;
  const str = (k: string): string => (typeof d[k] === 'string' ? d[k] : '');
  switch (sent.name) {
    case 'deployment.create':
      return { type: sent.name, name: str('name') };
    case 'attempt.create':
    case 'attempt.start':
    case 'attempt.cancel':
    case 'attempt.orphaned':
    case 'attempt.expired':
      return { type: sent.name, attemptId: str('attemptId') };
    case 'attempt.end':
      return { type: sent.name, attemptId: str('attemptId'), outcome: str('outcome') === 'succeeded' ? 'succeeded' : 'failed' };
    case 'deployment.teardown':
      return { type: sent.name, force: d.force === true };
    case 'deployment.resolve':
      return { type: sent.name, outcome: str('outcome') === 'ready' ? 'ready' : 'failed' };
    default:
      return null;
  }
}

function snapshotOf(state: ReplayState, event: MachineEvent): Snapshot {
  const attemptId = 'attemptId' in event ? event.attemptId : null;
  const named = attemptId === null ? undefined : state.attempts.get(attemptId);
  const current = state.currentAttemptId === null ? undefined : state.attempts.get(state.currentAttemptId);
  return {
    deployment:
      state.state === null
        ? null
        : { name: state.name, state: state.state, version: state.version, currentAttemptId: state.currentAttemptId },
    attempt: attemptId !== null && named !== undefined ? { id: attemptId, status: named } : null,
    currentAttempt: state.currentAttemptId !== null && current !== undefined ? { id: state.currentAttemptId, status: current } : null,
  };
}

function applyDecision(state: ReplayState, decision: Extract<Decision, { kind: 'applied' }>): ReplayState {
  const attempts = new Map(state.attempts);
  if (decision.effects.createAttempt !== undefined) attempts.set(decision.effects.createAttempt.attemptId, 'pending');
  for (const change of decision.effects.attempts) attempts.set(change.attemptId, change.status);
  return {
    name: state.name,
    state: decision.to,
    version: state.version + 1,
    currentAttemptId: decision.effects.currentAttemptId === undefined ? state.currentAttemptId : decision.effects.currentAttemptId,
    attempts,
  };
}

const describeDecision = (d: Decision): string =>
  d.kind === 'applied' ? `applied ${d.from ?? '(none)'} -> ${d.to} (${d.reason})` : d.kind === 'noop' ? `noop ${d.why}` : d.kind === 'rejected' ? `rejected ${d.code}` : `deferred ${d.why}`;

/** Replay time is irrelevant to the decision's kind and states; a fixed instant keeps the replay pure. */
const REPLAY_NOW = new Date(0);

class Collector {
  readonly counts: Partial<Record<ViolationKind, number>> = {};
  readonly list: Violation[] = [];
  constructor(private readonly max: number) {}
  add(v: Violation): void {
    this.counts[v.kind] = (this.counts[v.kind] ?? 0) + 1;
    if (this.list.length < this.max) this.list.push(v);
  }
  count(kind: ViolationKind): number {
    return this.counts[kind] ?? 0;
  }
}

function groupBy<T>(rows: readonly T[], key: (row: T) => string): Map<string, T[]> {
  const out = new Map<string, T[]>();
  for (const row of rows) {
    const k = key(row);
    const list = out.get(k);
    if (list === undefined) out.set(k, [row]);
    else list.push(row);
  }
  return out;
}

export async function checkHistory(options: HistoryCheckOptions): Promise<HistoryReport> {
  const ds = options.dataSource;
  const v = new Collector(options.maxViolations ?? 50);
  const scope = options.deploymentIds === undefined ? null : [...options.deploymentIds];
  const where = (column: string) => (scope === null ? '' : `WHERE ${column} = ANY($1)`);
  const params = scope === null ? [] : [scope];

  const deployments = await ds.query<DeploymentRow[]>(
    `SELECT id, name, state, version, current_attempt_id FROM deployments ${where('id')} ORDER BY id`,
    params,
  );
  const attempts = groupBy(
    await ds.query<AttemptRow[]>(`SELECT id, deployment_id, status FROM attempts ${where('deployment_id')}`, params),
    (r) => r.deployment_id,
  );
  const allTransitions = await ds.query<TransitionRow[]>(
    `SELECT id::text AS id, deployment_id, attempt_id, from_state, to_state, version, reason, event_id, created_at
       FROM state_transitions ${where('deployment_id')} ORDER BY deployment_id, version, id`,
    params,
  );
  const transitions = groupBy(allTransitions, (r) => r.deployment_id);
  const allProcessed = await ds.query<ProcessedRow[]>(
    `SELECT event_id, event_name, deployment_id, outcome, reason, version FROM processed_events ${where('deployment_id')}`,
    params,
  );
  const processedById = new Map(allProcessed.map((p) => [p.event_id, p]));
  const processed = groupBy(allProcessed, (r) => r.deployment_id);

  // exactly once: eventIds in history
  const historyByEvent = groupBy(allTransitions, (r) => r.event_id);
  let appliedTwice = 0;
  for (const [eventId, rows] of historyByEvent) {
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

  let historyGaps = 0;
  const byDeployment = new Map<string, DeploymentRow>();
  for (const d of deployments) {
    byDeployment.set(d.id, d);
    const rows = transitions.get(d.id) ?? [];
    const ownAttempts = attempts.get(d.id) ?? [];

    // gap-free versions 1..version
    const versions = rows.map((r) => r.version);
    const expected = Array.from({ length: d.version }, (_, i) => i + 1);
    if (versions.length !== expected.length || versions.some((ver, i) => ver !== expected[i])) {
      const present = new Set(versions);
      const missing = expected.filter((ver) => !present.has(ver));
      const repeated = versions.filter((ver, i) => versions.indexOf(ver) !== i);
      const extra = versions.filter((ver) => ver > d.version);
      historyGaps += missing.length + repeated.length + extra.length;
      v.add({
        kind: 'version_gap',
        deploymentId: d.id,
        detail: `history versions [${versions.join(', ')}] for version ${d.version}` +
          `${missing.length > 0 ? `; missing ${missing.join(', ')}` : ''}${repeated.length > 0 ? `; repeated ${repeated.join(', ')}` : ''}`,
      });
    }
    const top = versions.length === 0 ? 0 : Math.max(...versions);
    if (top !== d.version) {
      v.add({ kind: 'version_mismatch', deploymentId: d.id, detail: `version ${d.version}, highest history version ${top}` });
    }

    // every history row claimed by exactly one applied processed row, and vice versa
    for (const row of rows) {
      const claim = processedById.get(row.event_id);
      if (claim === undefined && options.claimsSince !== undefined && row.created_at < options.claimsSince) continue;
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
    const ownProcessed = processed.get(d.id) ?? [];
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

    // the machine, replayed over the applied events in version order
    const states: ReplayState[] = [{ name: d.name, state: null, version: 0, currentAttemptId: null, attempts: new Map() }];
    let replayOk = true;
    for (const row of rows) {
      const current = states[states.length - 1];
      if (current === undefined) break;
      const event = eventFromHistory(row, d.name);
      const claim = processedById.get(row.event_id);
      if (event === null) {
        v.add({ kind: 'replay_mismatch', deploymentId: d.id, version: row.version, eventId: row.event_id, detail: `unknown reason "${row.reason}"` });
        replayOk = false;
        break;
      }
      if (claim !== undefined && claim.event_name !== event.type) {
        v.add({
          kind: 'replay_mismatch',
          deploymentId: d.id,
          version: row.version,
          eventId: row.event_id,
          detail: `reason ${row.reason} comes from ${event.type}, but the event was ${claim.event_name}`,
        });
      }
      const sent = options.events?.get(row.event_id);
      if (sent !== undefined) checkSent(v, d.id, row.version, row.event_id, sent, event);
      const decision = decide(snapshotOf(current, event), event, REPLAY_NOW);
      if (
        decision.kind !== 'applied' ||
        decision.from !== row.from_state ||
        decision.to !== row.to_state ||
        decision.reason !== row.reason ||
        row.version !== current.version + 1
      ) {
        v.add({
          kind: 'replay_mismatch',
          deploymentId: d.id,
          version: row.version,
          eventId: row.event_id,
          detail: `history: ${row.from_state ?? '(none)'} -> ${row.to_state} (${row.reason}); the machine at version ${current.version}: ${describeDecision(decision)}`,
        });
        replayOk = false;
        break;
      }
      states.push(applyDecision(current, decision));
    }

    const final = states[states.length - 1];
    if (replayOk && final !== undefined) {
      const problems: string[] = [];
      if (final.state !== d.state) problems.push(`state ${d.state}, replay ${String(final.state)}`);
      if (final.version !== d.version) problems.push(`version ${d.version}, replay ${final.version}`);
      if (final.currentAttemptId !== d.current_attempt_id) {
        problems.push(`current attempt ${String(d.current_attempt_id)}, replay ${String(final.currentAttemptId)}`);
      }
      for (const a of ownAttempts) {
        const replayed = final.attempts.get(a.id);
        if (replayed !== a.status) problems.push(`attempt ${a.id} ${a.status}, replay ${replayed ?? '(never created)'}`);
      }
      for (const id of final.attempts.keys()) {
        if (!ownAttempts.some((a) => a.id === id)) problems.push(`attempt ${id} missing`);
      }
      if (problems.length > 0) v.add({ kind: 'final_state_mismatch', deploymentId: d.id, detail: problems.join('; ') });
    }

    // noops, checked against the machine at the version they saw
    if (options.events !== undefined && replayOk) {
      for (const p of ownProcessed) {
        if (p.outcome !== 'noop') continue;
        const sent = options.events.get(p.event_id);
        if (sent === undefined) continue;
        const event = eventFromSent(sent);
        const at = states[p.version ?? 0];
        if (event === null || at === undefined || sent.name !== p.event_name) {
          v.add({
            kind: 'event_mismatch',
            deploymentId: d.id,
            version: p.version ?? undefined,
            eventId: p.event_id,
            detail: `recorded ${p.event_name} noop at version ${String(p.version)}; sent ${sent.name}`,
          });
          continue;
        }
        const decision = decide(snapshotOf(at, event), event, REPLAY_NOW);
        if (decision.kind !== 'noop' || decision.why !== p.reason) {
          v.add({
            kind: 'noop_mismatch',
            deploymentId: d.id,
            version: p.version ?? undefined,
            eventId: p.event_id,
            detail: `recorded noop ${p.reason}; the machine at version ${String(p.version)}: ${describeDecision(decision)}`,
          });
        }
      }
    }
  }
  // processed rows and history of deployments that do not exist
  for (const [deploymentId, rows] of transitions) {
    if (!byDeployment.has(deploymentId)) {
      v.add({ kind: 'version_gap', deploymentId, detail: `${rows.length} history rows for a deployment that does not exist` });
    }
  }

  const stream = options.stream === undefined ? null : await checkStream(options.stream, scope === null ? null : new Set(scope), byDeployment, transitions, v);

  const applied = allProcessed.filter((p) => p.outcome === 'applied').length;
  return {
    ok: v.list.length === 0,
    deployments: deployments.length,
    transitions: allTransitions.length,
    processed: { applied, noop: allProcessed.length - applied },
    appliedTwice,
    historyGaps,
    stream,
    violationCounts: v.counts,
    violations: v.list,
  };
}

function checkSent(v: Collector, deploymentId: string, version: number, eventId: string, sent: SentEvent, fromHistory: MachineEvent): void {
  const fromSent = eventFromSent(sent);
  if (fromSent === null || sent.data.deploymentId !== deploymentId || JSON.stringify(normalize(fromSent)) !== JSON.stringify(normalize(fromHistory))) {
    v.add({
      kind: 'event_mismatch',
      deploymentId,
      version,
      eventId,
      detail: `history applied ${JSON.stringify(fromHistory)}; sent ${sent.name} ${JSON.stringify(sent.data)}`,
    });
  }
}

/** Fields that history cannot tell (a teardown's force outside `unknown`) are left out of the comparison. */
function normalize(event: MachineEvent): MachineEvent {
  return event.type === 'deployment.teardown' ? { type: event.type } : event;
}

const STREAM_FIELDS = ['transitionId', 'deploymentId', 'attemptId', 'from', 'to', 'version', 'reason', 'eventId'] as const;

export interface StreamSource {
  readonly redis: IORedis;
  readonly key: string;
  readonly before?: readonly TransitionEntry[];
}

async function checkStream(
  stream: StreamSource,
  scope: ReadonlySet<string> | null,
  deployments: ReadonlyMap<string, DeploymentRow>,
  transitions: ReadonlyMap<string, readonly TransitionRow[]>,
  v: Collector,
): Promise<StreamSummary> {
  let entries = 0;
  let repeats = 0;
  let outOfOrder = 0;
  let mismatches = 0;
  /** per deployment: first occurrence of each version, and the highest first occurrence so far */
  const firsts = new Map<string, Map<number, TransitionEntry>>();
  const highest = new Map<string, number>();
  const rowsAt = new Map<string, Map<number, TransitionRow>>();
  for (const [id, rows] of transitions) rowsAt.set(id, new Map(rows.map((r) => [r.version, r])));

  const before = stream.before ?? [];
  const seenBefore = new Set(before.map((e) => e.streamId));
  const beforePage: Array<[string, string[]]> = before.map((e) => [e.streamId, Object.entries(e).flat().map(String)]);
  for (let start = '-', early = true; ; early = false) {
    const page = early ? beforePage : ((await stream.redis.xrange(stream.key, start, '+', 'COUNT', 2000)) as Array<[string, string[]]>);
    for (const [id, fields] of page) {
      if (!early && seenBefore.has(id)) continue;
      const entry = parseEntry(id, fields);
      if (scope !== null && !scope.has(entry.deploymentId)) continue;
      entries++;
      const seen = firsts.get(entry.deploymentId) ?? new Map<number, TransitionEntry>();
      firsts.set(entry.deploymentId, seen);
      const first = seen.get(entry.version);
      if (first !== undefined) {
        repeats++;
        const differs = STREAM_FIELDS.filter((f) => String(first[f]) !== String(entry[f]));
        if (differs.length > 0) {
          mismatches++;
          v.add({
            kind: 'stream_entry_mismatch',
            deploymentId: entry.deploymentId,
            version: entry.version,
            detail: `entry ${id} repeats ${first.streamId} with different ${differs.join(', ')}`,
          });
        }
        continue;
      }
      seen.set(entry.version, entry);
      const top = highest.get(entry.deploymentId) ?? 0;
      if (entry.version < top) {
        outOfOrder++;
        v.add({
          kind: 'stream_out_of_order',
          deploymentId: entry.deploymentId,
          version: entry.version,
          detail: `entry ${id}: version ${entry.version} first appears after version ${top}`,
        });
      } else {
        highest.set(entry.deploymentId, entry.version);
      }
      const row = rowsAt.get(entry.deploymentId)?.get(entry.version);
      if (row === undefined) {
        mismatches++;
        v.add({
          kind: 'stream_unknown_entry',
          deploymentId: entry.deploymentId,
          version: entry.version,
          detail: `entry ${id}: ${deployments.has(entry.deploymentId) ? 'no history row at this version' : 'no such deployment'}`,
        });
        continue;
      }
      const want: Record<(typeof STREAM_FIELDS)[number], string> = {
        transitionId: row.id,
        deploymentId: row.deployment_id,
        attemptId: row.attempt_id ?? '',
        from: row.from_state ?? '',
        to: row.to_state,
        version: String(row.version),
        reason: row.reason,
        eventId: row.event_id,
      };
      const differs = STREAM_FIELDS.filter((f) => String(entry[f]) !== want[f]);
      if (differs.length > 0) {
        mismatches++;
        v.add({
          kind: 'stream_entry_mismatch',
          deploymentId: entry.deploymentId,
          version: entry.version,
          detail: `entry ${id} differs from history in ${differs.map((f) => `${f} (${String(entry[f])} != ${want[f]})`).join(', ')}`,
        });
      }
    }
    if (early) continue; // then the stream itself, from its start
    const last = page[page.length - 1];
    if (page.length < 2000 || last === undefined) break;
    start = `(${last[0]}`;
  }

  let gaps = 0;
  for (const d of deployments.values()) {
    const seen = firsts.get(d.id);
    const missing: number[] = [];
    for (let ver = 1; ver <= d.version; ver++) if (seen?.has(ver) !== true) missing.push(ver);
    if (missing.length > 0) {
      gaps += missing.length;
      v.add({
        kind: 'stream_missing_version',
        deploymentId: d.id,
        detail: `versions ${missing.join(', ')} of ${d.version} are not on the stream`,
      });
    }
  }
  return { entries, repeats, gaps, outOfOrder, mismatches };
}
