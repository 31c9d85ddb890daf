/**
 * The history checker's machine replay: a deployment's applied events, rebuilt from its history rows, replayed
 * through `decide` in version order; the state it ends in; and the recorded noops, decided again at the version
 * they saw.
 */
import { decide } from '../src/machine';
import type { AttemptStatus, Decision, MachineEvent, Snapshot, TransitionReason } from '../src/machine';
import type { SentEvent } from './history-checker';
import type { AttemptRow, Collector, DeploymentRow, ProcessedRow, TransitionRow } from './history-rows';

/** The deployment as the replay sees it after some number of transitions. */
export interface ReplayState {
  readonly name: string;
  readonly state: DeploymentRow['state'] | null;
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
      state.state === null ? null : { name: state.name, state: state.state, version: state.version, currentAttemptId: state.currentAttemptId },
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
  d.kind === 'applied'
    ? `applied ${d.from ?? '(none)'} -> ${d.to} (${d.reason})`
    : d.kind === 'noop'
      ? `noop ${d.why}`
      : d.kind === 'rejected'
        ? `rejected ${d.code}`
        : `deferred ${d.why}`;

/** Replay time is irrelevant to the decision's kind and states; a fixed instant keeps the replay pure. */
const REPLAY_NOW = new Date(0);

function checkSent(v: Collector, deploymentId: string, version: number, eventId: string, sent: SentEvent, fromHistory: MachineEvent): void {
  const fromSent = eventFromSent(sent);
  if (
    fromSent === null ||
    sent.data.deploymentId !== deploymentId ||
    JSON.stringify(normalize(fromSent)) !== JSON.stringify(normalize(fromHistory))
  ) {
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

export interface Replay {
  /** the state before the first transition, then after each one replayed */
  readonly states: readonly ReplayState[];
  /** every transition replayed as history has it */
  readonly ok: boolean;
}

/** Replays the machine over `d`'s applied events in version order; stops at the first transition it does not make. */
export function replayDeployment(
  v: Collector,
  d: DeploymentRow,
  rows: readonly TransitionRow[],
  processedById: ReadonlyMap<string, ProcessedRow>,
  events: ReadonlyMap<string, SentEvent> | undefined,
): Replay {
  const states: ReplayState[] = [{ name: d.name, state: null, version: 0, currentAttemptId: null, attempts: new Map() }];
  for (const row of rows) {
    const current = states[states.length - 1];
    if (current === undefined) break;
    const event = eventFromHistory(row, d.name);
    const claim = processedById.get(row.event_id);
    if (event === null) {
      v.add({ kind: 'replay_mismatch', deploymentId: d.id, version: row.version, eventId: row.event_id, detail: `unknown reason "${row.reason}"` });
      return { states, ok: false };
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
    const sent = events?.get(row.event_id);
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
      return { states, ok: false };
    }
    states.push(applyDecision(current, decision));
  }
  return { states, ok: true };
}

/** After a replay: the deployment and its attempts are where the machine left them. */
export function checkFinalState(v: Collector, d: DeploymentRow, final: ReplayState, ownAttempts: readonly AttemptRow[]): void {
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

/** Every recorded noop of a sent event: at the version it saw, the machine decides the same noop. */
export function checkNoops(
  v: Collector,
  deploymentId: string,
  states: readonly ReplayState[],
  ownProcessed: readonly ProcessedRow[],
  events: ReadonlyMap<string, SentEvent>,
): void {
  for (const p of ownProcessed) {
    if (p.outcome !== 'noop') continue;
    const sent = events.get(p.event_id);
    if (sent === undefined) continue;
    const event = eventFromSent(sent);
    const at = states[p.version ?? 0];
    if (event === null || at === undefined || sent.name !== p.event_name) {
      v.add({
        kind: 'event_mismatch',
        deploymentId,
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
        deploymentId,
        version: p.version ?? undefined,
        eventId: p.event_id,
        detail: `recorded noop ${p.reason}; the machine at version ${String(p.version)}: ${describeDecision(decision)}`,
      });
    }
  }
}
