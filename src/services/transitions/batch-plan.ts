/**
 * Group commit's decisions, without I/O: given one snapshot of everything a batch of events reads, decide every
 * event in order as if each had been applied on its own after the ones before it (each decision sees the effects
 * of the batch's earlier decisions), and gather what the batch writes as the column arrays of `BATCH_SQL.write`.
 *
 * Each event's outcome is provisional until the write says whether its deployment's row was written: an event
 * decided on top of an applied event of the same deployment earlier in the batch (`dirty`) stands or falls with
 * that deployment's version check; events decided on the snapshot alone stand as they are (a rejection or a noop is
 * what the one-event path would have decided, had it run first).
 */
import { NotYetError } from '../../errors';
import type { BatchSnapshotRow, BatchWriteParams } from '../../entities/sql';
import { DEFAULT_ACTOR, payloadDigest } from '../../events/schemas';
import {
  decide,
  livenessOf,
  TIME_DEPENDENT_NOOPS,
  type AttemptSnapshot,
  type AttemptStatus,
  type Decision,
  type DeploymentState,
  type Endpoint,
  type MachineEvent,
} from '../../machine';
import { duplicateOf, eventIdConflict, sameEvent, type ApplyResult, type StateEvent } from './outcomes';
import type { EventTrace } from './tracing';

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
  readonly events: PlannedEvent[];
  readonly write: BatchWriteParams;
  /** deployments with applied events in this batch */
  readonly writes: ReadonlySet<string>;
}

/** What the snapshot read needs: every deployment, named attempt and eventId of the batch. */
export function snapshotKeys(events: readonly PreparedEvent[]): { deployments: string[]; attempts: string[]; eventIds: string[]; numbering: string[] } {
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

interface WorkingDeployment {
  readonly id: string;
  name: string;
  state: DeploymentState;
  version: number;
  currentAttemptId: string | null;
  maxNumber: number;
  /** the version read (null: the deployment did not exist: it is inserted) */
  readonly fromVersion: number | null;
  applied: number;
  setCurrent: boolean;
  setEndpoint: boolean;
  endpoint: Endpoint | null;
  setReady: boolean;
  lastReadyAt: Date | null;
}

interface WorkingAttempt {
  readonly id: string;
  readonly deploymentId: string;
  status: AttemptStatus;
  readonly lastHeartbeatAt: Date | null;
  startedAt: Date | null;
  /** created in this batch, with this number */
  readonly number: number | null;
  changed: boolean;
  /** values this batch set (a change's null leaves the column as it is, as the one-event write's COALESCE does) */
  reason: string | null;
  setStartedAt: Date | null;
  setEndedAt: Date | null;
}

const date = (value: string | null): Date | null => (value === null ? null : new Date(value));

/**
 * Decides every event of the batch in order. Callers keep an eventId, and an attempt id, to one event and one
 * deployment per batch (see `TransitionService.applyMany`), so no decision here depends on another deployment's.
 */
export function planBatch(events: readonly PreparedEvent[], snapshot: BatchSnapshotRow, now: Date): BatchPlan {
  const deployments = new Map<string, WorkingDeployment>();
  for (const d of snapshot.deployments ?? []) {
    deployments.set(d.id, {
      id: d.id,
      name: d.name,
      state: d.state,
      version: d.version,
      currentAttemptId: d.current_attempt_id,
      maxNumber: d.max_number ?? 0,
      fromVersion: d.version,
      applied: 0,
      setCurrent: false,
      setEndpoint: false,
      endpoint: null,
      setReady: false,
      lastReadyAt: null,
    });
  }
  const attempts = new Map<string, WorkingAttempt>();
  for (const a of snapshot.attempts ?? []) {
    attempts.set(a.id, {
      id: a.id,
      deploymentId: a.deployment_id,
      status: a.status,
      lastHeartbeatAt: date(a.last_heartbeat_at),
      startedAt: date(a.started_at),
      number: null,
      changed: false,
      reason: null,
      setStartedAt: null,
      setEndedAt: null,
    });
  }
  const processed = new Map((snapshot.processed ?? []).map((p) => [p.event_id, p]));
  const write = emptyWrite();
  const planned: PlannedEvent[] = [];

  for (const prepared of events) {
    const { event, machineEvent } = prepared;
    const { deploymentId } = event.data;
    const attemptId = attemptIdOf(event);
    const base = { eventId: event.eventId, deploymentId };
    const working = deployments.get(deploymentId) ?? null;
    const dirty = working !== null && working.applied > 0;
    const push = (outcome: PlannedOutcome) => planned.push({ prepared, outcome, dirty });

    const p = processed.get(event.eventId);
    if (p !== undefined) {
      if (!sameEvent(event, p.event_name, p.deployment_id, p.payload_sha256)) {
        push({ kind: 'done', result: eventIdConflict(event, p.event_name, p.deployment_id) });
      } else {
        push({ kind: 'done', result: duplicateOf(event, p) });
      }
      continue;
    }
    const attempt = attemptId === null ? undefined : attempts.get(attemptId);
    if (attempt !== undefined && attempt.deploymentId !== deploymentId) {
      const message = `attempt ${attempt.id} belongs to another deployment`;
      push({ kind: 'done', result: { ...base, outcome: 'rejected', code: 'id_conflict', message } });
      continue;
    }
    const current = working?.currentAttemptId == null ? undefined : attempts.get(working.currentAttemptId);
    const decision = decide(
      {
        deployment:
          working === null
            ? null
            : { name: working.name, state: working.state, version: working.version, currentAttemptId: working.currentAttemptId },
        attempt: attempt === undefined ? null : attemptView(attempt),
        currentAttempt: current === undefined ? null : { id: current.id, status: current.status },
      },
      machineEvent,
      now,
    );
    switch (decision.kind) {
      case 'deferred':
        push({ kind: 'deferred', error: new NotYetError(decision.why, deploymentId, attemptId ?? undefined) });
        break;
      case 'rejected':
        push({ kind: 'done', result: { ...base, outcome: 'rejected', code: decision.code, message: decision.message } });
        break;
      case 'noop': {
        const result: ApplyResult = { ...base, outcome: 'noop', reason: decision.why };
        if (TIME_DEPENDENT_NOOPS.has(decision.why)) {
          push({ kind: 'done', result });
          break;
        }
        const n = write.noopClaims;
        n.eventId.push(event.eventId);
        n.eventName.push(event.name);
        n.deploymentId.push(deploymentId);
        n.reason.push(decision.why);
        n.version.push(working?.version ?? null);
        n.sha.push(payloadDigest(event.data));
        n.at.push(now);
        n.needsWin.push(dirty);
        push({ kind: 'noop_claim', result });
        break;
      }
      case 'applied': {
        const target = working ?? created(deploymentId, event, deployments);
        const result = applyDecision(target, attempts, event, attemptId, decision, now, write, prepared.trace?.traceparent ?? null);
        push({ kind: 'applied', result });
        break;
      }
    }
  }

  const writes = new Set<string>();
  // every batch writes its deployment rows in id order, so two batches lock rows in the same order
  for (const d of [...deployments.values()].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0))) {
    if (d.applied === 0) continue;
    writes.add(d.id);
    if (d.fromVersion === null) {
      const i = write.inserts;
      i.id.push(d.id);
      i.name.push(d.name);
      i.state.push(d.state);
      i.version.push(d.version);
      i.endpointUrl.push(d.endpoint?.url ?? null);
      i.endpointKind.push(d.endpoint?.kind ?? null);
      i.currentAttemptId.push(d.currentAttemptId);
      i.lastReadyAt.push(d.lastReadyAt);
      i.at.push(now);
    } else {
      const u = write.updates;
      u.id.push(d.id);
      u.fromVersion.push(d.fromVersion);
      u.toVersion.push(d.version);
      u.state.push(d.state);
      u.at.push(now);
      u.setCurrent.push(d.setCurrent);
      u.currentAttemptId.push(d.currentAttemptId);
      u.setEndpoint.push(d.setEndpoint);
      u.endpointUrl.push(d.endpoint?.url ?? null);
      u.endpointKind.push(d.endpoint?.kind ?? null);
      u.setReady.push(d.setReady);
      u.lastReadyAt.push(d.lastReadyAt);
    }
  }
  for (const a of attempts.values()) {
    if (!writes.has(a.deploymentId)) continue;
    if (a.number !== null) {
      const n = write.newAttempts;
      n.id.push(a.id);
      n.deploymentId.push(a.deploymentId);
      n.number.push(a.number);
      n.status.push(a.status);
      n.reason.push(a.reason);
      n.startedAt.push(a.setStartedAt);
      n.endedAt.push(a.setEndedAt);
      n.at.push(now);
    } else if (a.changed) {
      const x = write.changedAttempts;
      x.id.push(a.id);
      x.deploymentId.push(a.deploymentId);
      x.status.push(a.status);
      x.reason.push(a.reason);
      x.startedAt.push(a.setStartedAt);
      x.endedAt.push(a.setEndedAt);
    }
  }
  return { events: planned, write, writes };
}

function attemptView(a: WorkingAttempt): AttemptSnapshot {
  return { id: a.id, status: a.status, livenessAt: livenessOf(a), startedAt: a.startedAt };
}

function created(id: string, event: StateEvent, deployments: Map<string, WorkingDeployment>): WorkingDeployment {
  if (event.name !== 'deployment.create') throw new Error(`only deployment.create may insert (${event.name})`);
  const d: WorkingDeployment = {
    id,
    name: event.data.name,
    state: 'pending',
    version: 0,
    currentAttemptId: null,
    maxNumber: 0,
    fromVersion: null,
    applied: 0,
    setCurrent: false,
    setEndpoint: false,
    endpoint: null,
    setReady: false,
    lastReadyAt: null,
  };
  deployments.set(id, d);
  return d;
}

/** Applies an applied decision to the working state and records its claim and history rows. */
function applyDecision(
  d: WorkingDeployment,
  attempts: Map<string, WorkingAttempt>,
  event: StateEvent,
  attemptId: string | null,
  decision: Extract<Decision, { kind: 'applied' }>,
  now: Date,
  write: BatchWriteParams,
  traceparent: string | null,
): Extract<ApplyResult, { outcome: 'applied' }> {
  const { effects } = decision;
  const from = decision.from;
  d.version += 1;
  d.applied += 1;
  d.state = decision.to;
  if (effects.createAttempt !== undefined) {
    d.maxNumber += 1;
    attempts.set(effects.createAttempt.attemptId, {
      id: effects.createAttempt.attemptId,
      deploymentId: d.id,
      status: 'pending',
      lastHeartbeatAt: null,
      startedAt: null,
      number: d.maxNumber,
      changed: true,
      reason: null,
      setStartedAt: null,
      setEndedAt: null,
    });
  }
  for (const change of effects.attempts) {
    const a = attempts.get(change.attemptId);
    if (a === undefined) throw new Error(`attempt ${change.attemptId} changed by a decision was not in the batch's snapshot`);
    a.status = change.status;
    a.changed = true;
    if (change.reason != null) a.reason = change.reason;
    if (change.startedAt != null) {
      a.setStartedAt = change.startedAt;
      a.startedAt = change.startedAt;
    }
    if (change.endedAt != null) a.setEndedAt = change.endedAt;
  }
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
  const actor = event.data.actor ?? DEFAULT_ACTOR;
  const c = write.claims;
  c.eventId.push(event.eventId);
  c.eventName.push(event.name);
  c.deploymentId.push(d.id);
  c.reason.push(decision.reason);
  c.version.push(d.version);
  c.sha.push(payloadDigest(event.data));
  c.at.push(now);
  const t = write.transitions;
  t.deploymentId.push(d.id);
  t.attemptId.push(attemptId);
  t.from.push(from);
  t.to.push(decision.to);
  t.version.push(d.version);
  t.reason.push(decision.reason);
  t.eventId.push(event.eventId);
  t.actor.push(actor);
  t.at.push(now);
  t.atText.push(now.toISOString());
  t.traceparent.push(traceparent);
  return {
    outcome: 'applied',
    eventId: event.eventId,
    deploymentId: d.id,
    attemptId,
    from,
    to: decision.to,
    version: d.version,
    reason: decision.reason,
    transitionId: '',
  };
}

function emptyWrite(): BatchWriteParams {
  return {
    updates: {
      id: [], fromVersion: [], toVersion: [], state: [], at: [], setCurrent: [], currentAttemptId: [], setEndpoint: [],
      endpointUrl: [], endpointKind: [], setReady: [], lastReadyAt: [],
    },
    inserts: { id: [], name: [], state: [], version: [], endpointUrl: [], endpointKind: [], currentAttemptId: [], lastReadyAt: [], at: [] },
    claims: { eventId: [], eventName: [], deploymentId: [], reason: [], version: [], sha: [], at: [] },
    noopClaims: { eventId: [], eventName: [], deploymentId: [], reason: [], version: [], sha: [], at: [], needsWin: [] },
    newAttempts: { id: [], deploymentId: [], number: [], status: [], reason: [], startedAt: [], endedAt: [], at: [] },
    changedAttempts: { id: [], deploymentId: [], status: [], reason: [], startedAt: [], endedAt: [] },
    transitions: { deploymentId: [], attemptId: [], from: [], to: [], version: [], reason: [], eventId: [], actor: [], at: [], atText: [], traceparent: [] },
  };
}
