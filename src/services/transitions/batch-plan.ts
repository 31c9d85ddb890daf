/**
 * The one planner of transitions, without I/O. Given one snapshot of everything a set of events reads, it decides
 * every event in order as if each had been applied on its own after the ones before it (each decision sees the
 * effects of the earlier ones), and gathers what they write as the rows of the one write statement
 * (`TRANSITION_SQL.write`). A lone event is a batch of one: the one-event path and group commit plan alike.
 *
 * Each event's outcome is provisional until the write says whether its deployment's row was written (`verdictOf`):
 * an event decided on top of an applied event of the same deployment earlier in the batch (`dirty`) stands or falls
 * with that deployment's version check; events decided on the snapshot alone stand as they are (a rejection or a
 * noop is what the one-event path would have decided, had it run first).
 */
import { NotYetError } from '../../errors';
import type {
  AppliedEventRow,
  NoopClaimRow,
  TransitionSnapshotKeys,
  TransitionSnapshotRow,
  TransitionWrite,
  TransitionWriteRow,
  HandedOffRow,
} from '../../entities/sql';
import { DEFAULT_ACTOR, payloadDigest } from '../../events/schemas';
import { decide, TIME_DEPENDENT_NOOPS, type Decision, type MachineEvent } from '../../machine';
import { duplicateOf, eventIdConflict, sameEvent, type ApplyResult, type StateEvent } from './outcomes';
import type { EventTrace } from './tracing';
import { machineSnapshot, rowsOf, WorkingState, type WorkingDeployment } from './working-state';

/** An event ready to be decided: validated, with its machine form (cutoffs applied). */
export interface PreparedEvent {
  readonly event: StateEvent;
  readonly machineEvent: MachineEvent;
  /** its `transition` span when it is traced (tracing.ts): the outbox row carries the span's `traceparent` */
  readonly trace?: EventTrace | null;
}

/** What one event of the batch came to. */
export type PlannedOutcome =
  /** final whatever the write does (unless `dirty` and its deployment's row is not written) */
  | { readonly kind: 'done'; readonly result: ApplyResult }
  /** a noop whose claim must take (else another delivery claimed the eventId first) */
  | { readonly kind: 'noop_claim'; readonly result: ApplyResult }
  /** applied: complete once the write returns its history row's id */
  | { readonly kind: 'applied'; readonly result: Extract<ApplyResult, { outcome: 'applied' }> }
  | { readonly kind: 'deferred'; readonly error: NotYetError };

export interface PlannedEvent {
  readonly prepared: PreparedEvent;
  readonly outcome: PlannedOutcome;
  /** decided on top of applied events of its deployment in this batch: redone if that deployment's write loses */
  readonly dirty: boolean;
}

export interface BatchPlan {
  readonly events: readonly PlannedEvent[];
  /** the rows of the write; nothing to write when `writesAnything` says so */
  readonly write: TransitionWrite;
  /** deployments with applied events in this batch */
  readonly writes: ReadonlySet<string>;
}

/** What the snapshot read needs: every deployment, named attempt and eventId of the batch. */
export function snapshotKeys(events: readonly PreparedEvent[]): TransitionSnapshotKeys {
  const deployments = new Set<string>();
  const attempts = new Set<string>();
  const numbering = new Set<string>();
  for (const { event } of events) {
    deployments.add(event.data.deploymentId);
    const attemptId = attemptIdOf(event);
    if (attemptId !== null) attempts.add(attemptId);
    if (event.name === 'attempt.create') numbering.add(event.data.deploymentId);
  }
  return { deployments: [...deployments], attempts: [...attempts], eventIds: events.map((e) => e.event.eventId), numbering: [...numbering] };
}

export function attemptIdOf(event: StateEvent): string | null {
  return 'attemptId' in event.data ? event.data.attemptId : null;
}

/**
 * Decides every event of the batch in order. Callers keep an eventId, and an attempt id, to one event and one
 * deployment per batch (`splitBatch`), so no decision here depends on another deployment's.
 */
export function planBatch(events: readonly PreparedEvent[], snapshot: TransitionSnapshotRow, now: Date): BatchPlan {
  const state = new WorkingState(snapshot);
  const applied: AppliedEventRow[] = [];
  const noopClaims: NoopClaimRow[] = [];
  const planned = events.map((prepared) => planEvent(prepared, state, now, applied, noopClaims));
  const { writes, ...rows } = rowsOf(state, now);
  return { events: planned, write: { ...rows, applied, noopClaims }, writes };
}

function planEvent(prepared: PreparedEvent, state: WorkingState, now: Date, applied: AppliedEventRow[], noopClaims: NoopClaimRow[]): PlannedEvent {
  const { event, machineEvent } = prepared;
  const { deploymentId } = event.data;
  const attemptId = attemptIdOf(event);
  const base = { eventId: event.eventId, deploymentId };
  const working = state.deployments.get(deploymentId) ?? null;
  const dirty = working !== null && working.applied > 0;
  const planned = (outcome: PlannedOutcome): PlannedEvent => ({ prepared, outcome, dirty });

  const p = state.processed.get(event.eventId);
  if (p !== undefined) {
    const result = sameEvent(event, p.event_name, p.deployment_id, p.payload_sha256)
      ? duplicateOf(event, p)
      : eventIdConflict(event, p.event_name, p.deployment_id);
    return planned({ kind: 'done', result });
  }
  const attempt = attemptId === null ? undefined : state.attempts.get(attemptId);
  if (attempt !== undefined && attempt.deploymentId !== deploymentId) {
    const message = `attempt ${attempt.id} belongs to another deployment`;
    return planned({ kind: 'done', result: { ...base, outcome: 'rejected', code: 'id_conflict', message } });
  }
  const decision = decide(machineSnapshot(state, working, attempt), machineEvent, now);
  switch (decision.kind) {
    case 'deferred':
      return planned({ kind: 'deferred', error: new NotYetError(decision.why, deploymentId, attemptId ?? undefined) });
    case 'rejected':
      return planned({ kind: 'done', result: { ...base, outcome: 'rejected', code: decision.code, message: decision.message } });
    case 'noop': {
      const result: ApplyResult = { ...base, outcome: 'noop', reason: decision.why };
      // a noop that only says "not yet" is no decision about the event: it stays free to apply later
      if (TIME_DEPENDENT_NOOPS.has(decision.why)) return planned({ kind: 'done', result });
      noopClaims.push({
        event_id: event.eventId,
        event_name: event.name,
        deployment_id: deploymentId,
        reason: decision.why,
        version: working?.version ?? null,
        payload_sha256: payloadDigest(event.data),
        at: now,
        needs_win: dirty,
      });
      return planned({ kind: 'noop_claim', result });
    }
    case 'applied': {
      const target = working ?? state.create(deploymentId, event);
      const row = applyDecision(target, state, event, decision, now, prepared.trace?.traceparent ?? null);
      applied.push(row);
      return planned({ kind: 'applied', result: appliedResult(row) });
    }
  }
}

/** Applies an applied decision to the working state; returns its claim, history and outbox row. */
function applyDecision(
  d: WorkingDeployment,
  state: WorkingState,
  event: StateEvent,
  decision: Extract<Decision, { kind: 'applied' }>,
  now: Date,
  traceparent: string | null,
): AppliedEventRow {
  const { effects } = decision;
  d.version += 1;
  d.applied += 1;
  d.state = decision.to;
  if (effects.createAttempt !== undefined) state.createAttempt(d, effects.createAttempt.attemptId);
  for (const change of effects.attempts) state.changeAttempt(change);
  if (effects.currentAttemptId !== undefined) {
    d.setCurrent = true;
    d.currentAttemptId = effects.currentAttemptId;
  }
  if (effects.endpoint !== undefined) {
    d.setEndpoint = true;
    d.endpoint = effects.endpoint;
  }
  if (effects.lastReadyAt !== undefined) {
    d.setReady = true;
    d.lastReadyAt = effects.lastReadyAt;
  }
  return {
    event_id: event.eventId,
    event_name: event.name,
    deployment_id: d.id,
    attempt_id: attemptIdOf(event),
    from_state: decision.from,
    to_state: decision.to,
    version: d.version,
    reason: decision.reason,
    actor: event.data.actor ?? DEFAULT_ACTOR,
    payload_sha256: payloadDigest(event.data),
    at: now,
    traceparent,
  };
}

function appliedResult(row: AppliedEventRow): Extract<ApplyResult, { outcome: 'applied' }> {
  return {
    outcome: 'applied',
    eventId: row.event_id,
    deploymentId: row.deployment_id,
    attemptId: row.attempt_id,
    from: row.from_state,
    to: row.to_state,
    version: row.version,
    reason: row.reason,
    transitionId: '',
  };
}

/** What the write reported, as `verdictOf` reads it. */
export interface WriteReport {
  /** deployments whose row was written */
  readonly won: ReadonlySet<string>;
  /** history row ids by eventId */
  readonly transitions: ReadonlyMap<string, string>;
  /** eventIds whose noop claim took */
  readonly noopClaimed: ReadonlySet<string>;
  /** the outbox rows it wrote, for the relay of this process, when it asked and nothing waited for the relay */
  readonly handoff: readonly HandedOffRow[] | null;
}

/** The write's row as a report; null (nothing was written) reports nothing. */
export function writeReportOf(row: TransitionWriteRow | null): WriteReport {
  const handoff = row?.handoff ?? null;
  return {
    won: new Set(row?.won ?? []),
    transitions: new Map(Object.entries(row?.transitions ?? {})),
    noopClaimed: new Set(row?.noop_claimed ?? []),
    handoff: handoff !== null && handoff.length > 0 ? handoff : null,
  };
}

/** What a planned event came to once the write has run. */
export type Verdict =
  | { readonly kind: 'settled'; readonly result: ApplyResult }
  | { readonly kind: 'failed'; readonly error: Error }
  /** its deployment's version check lost to a concurrent writer: it was decided on what is no longer there */
  | { readonly kind: 'redo' }
  /** its noop's claim did not take: another delivery claimed the eventId first */
  | { readonly kind: 'claimed_elsewhere' };

export function verdictOf(p: PlannedEvent, plan: BatchPlan, report: WriteReport): Verdict {
  const { deploymentId } = p.prepared.event.data;
  if (plan.writes.has(deploymentId) && !report.won.has(deploymentId) && (p.dirty || p.outcome.kind === 'applied')) {
    return { kind: 'redo' };
  }
  switch (p.outcome.kind) {
    case 'done':
      return { kind: 'settled', result: p.outcome.result };
    case 'deferred':
      return { kind: 'failed', error: p.outcome.error };
    case 'noop_claim':
      return report.noopClaimed.has(p.prepared.event.eventId) ? { kind: 'settled', result: p.outcome.result } : { kind: 'claimed_elsewhere' };
    case 'applied': {
      const transitionId = report.transitions.get(p.prepared.event.eventId);
      if (transitionId === undefined) throw new Error(`the write returned no history row for ${p.prepared.event.eventId}`);
      return { kind: 'settled', result: { ...p.outcome.result, transitionId } };
    }
  }
}

/**
 * Which events of a set can go in one batch (`now`) and which wait for the next (`later`), by index. An eventId, and
 * an attempt id, belong to one event and one deployment per batch: a second delivery of an eventId, or another
 * deployment naming the same attempt, waits for the next batch (decided after this one has committed, as one at a
 * time would). What waits holds back every later event that could depend on it: those of its deployment, of its
 * eventId and of its attempt.
 */
export function splitBatch(events: readonly PreparedEvent[]): { readonly now: number[]; readonly later: number[] } {
  const now: number[] = [];
  const later: number[] = [];
  const eventIds = new Set<string>();
  const attemptOwner = new Map<string, string>();
  const held = { deployments: new Set<string>(), eventIds: new Set<string>(), attempts: new Set<string>() };
  events.forEach(({ event }, i) => {
    const deploymentId = event.data.deploymentId;
    const attemptId = attemptIdOf(event);
    const owner = attemptId === null ? undefined : attemptOwner.get(attemptId);
    if (
      held.deployments.has(deploymentId) ||
      held.eventIds.has(event.eventId) ||
      (attemptId !== null && held.attempts.has(attemptId)) ||
      eventIds.has(event.eventId) ||
      (owner !== undefined && owner !== deploymentId)
    ) {
      held.deployments.add(deploymentId);
      held.eventIds.add(event.eventId);
      if (attemptId !== null) held.attempts.add(attemptId);
      later.push(i);
      return;
    }
    eventIds.add(event.eventId);
    if (attemptId !== null) attemptOwner.set(attemptId, deploymentId);
    now.push(i);
  });
  return { now, later };
}
