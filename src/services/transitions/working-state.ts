/**
 * The planner's working state (batch-plan.ts): the snapshot's deployments and attempts as the batch's decisions
 * change them, one event after another, and the rows of the write they come to. This is the one mapping from a
 * decision's effects to rows.
 */
import type { AttemptChangeRow, AttemptInsertRow, DeploymentInsertRow, DeploymentUpdateRow, TransitionSnapshotRow } from '../../entities/sql';
import { livenessOf, type AttemptChange, type AttemptStatus, type DeploymentState, type Endpoint, type Snapshot } from '../../machine';
import type { StateEvent } from './outcomes';

export interface WorkingDeployment {
  readonly id: string;
  name: string;
  state: DeploymentState;
  version: number;
  currentAttemptId: string | null;
  maxNumber: number;
  /** the version read (null: the deployment did not exist: it is inserted) */
  readonly fromVersion: number | null;
  /** applied events of this batch */
  applied: number;
  setCurrent: boolean;
  setEndpoint: boolean;
  endpoint: Endpoint | null;
  setReady: boolean;
  lastReadyAt: Date | null;
}

export interface WorkingAttempt {
  readonly id: string;
  readonly deploymentId: string;
  status: AttemptStatus;
  readonly lastHeartbeatAt: Date | null;
  startedAt: Date | null;
  /** created in this batch, with this number */
  readonly number: number | null;
  changed: boolean;
  /** values this batch set (a change's null leaves the column as it is) */
  reason: string | null;
  setStartedAt: Date | null;
  setEndedAt: Date | null;
}

/** An earlier processing of an eventId, as the snapshot read it. */
export type Processed = NonNullable<TransitionSnapshotRow['processed']>[number];

const date = (value: string | null): Date | null => (value === null ? null : new Date(value));

export class WorkingState {
  readonly deployments = new Map<string, WorkingDeployment>();
  readonly attempts = new Map<string, WorkingAttempt>();
  readonly processed: ReadonlyMap<string, Processed>;

  constructor(snapshot: TransitionSnapshotRow) {
    for (const d of snapshot.deployments ?? []) {
      this.deployments.set(d.id, {
        ...unchanged(d.id, d.name, d.version),
        state: d.state,
        currentAttemptId: d.current_attempt_id,
        maxNumber: d.max_number ?? 0,
        fromVersion: d.version,
      });
    }
    for (const a of snapshot.attempts ?? []) {
      this.attempts.set(a.id, {
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
    this.processed = new Map((snapshot.processed ?? []).map((p) => [p.event_id, p]));
  }

  /** A deployment that `deployment.create` inserts. */
  create(id: string, event: StateEvent): WorkingDeployment {
    if (event.name !== 'deployment.create') throw new Error(`only deployment.create may insert (${event.name})`);
    const d: WorkingDeployment = { ...unchanged(id, event.data.name, 0), state: 'pending', currentAttemptId: null, maxNumber: 0, fromVersion: null };
    this.deployments.set(id, d);
    return d;
  }

  /** A new attempt of `d`, numbered after its others. */
  createAttempt(d: WorkingDeployment, attemptId: string): void {
    d.maxNumber += 1;
    this.attempts.set(attemptId, {
      id: attemptId,
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

  changeAttempt(change: AttemptChange): void {
    const a = this.attempts.get(change.attemptId);
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
}

function unchanged(id: string, name: string, version: number) {
  return { id, name, version, applied: 0, setCurrent: false, setEndpoint: false, endpoint: null, setReady: false, lastReadyAt: null };
}

/** The machine's view of an event's deployment, named attempt and current attempt, as the batch has left them. */
export function machineSnapshot(state: WorkingState, d: WorkingDeployment | null, attempt: WorkingAttempt | undefined): Snapshot {
  const current = d?.currentAttemptId == null ? undefined : state.attempts.get(d.currentAttemptId);
  return {
    deployment: d === null ? null : { name: d.name, state: d.state, version: d.version, currentAttemptId: d.currentAttemptId },
    attempt: attempt === undefined ? null : { id: attempt.id, status: attempt.status, livenessAt: livenessOf(attempt), startedAt: attempt.startedAt },
    currentAttempt: current === undefined ? null : { id: current.id, status: current.status },
  };
}

/** The rows of the deployments and attempts the batch wrote, and which deployments those are. */
export function rowsOf(
  state: WorkingState,
  now: Date,
): {
  readonly updates: DeploymentUpdateRow[];
  readonly inserts: DeploymentInsertRow[];
  readonly newAttempts: AttemptInsertRow[];
  readonly changedAttempts: AttemptChangeRow[];
  readonly writes: ReadonlySet<string>;
} {
  const writes = new Set<string>();
  const updates: DeploymentUpdateRow[] = [];
  const inserts: DeploymentInsertRow[] = [];
  // every batch writes its deployment rows in id order, so two batches lock rows in the same order
  for (const d of [...state.deployments.values()].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0))) {
    if (d.applied === 0) continue;
    writes.add(d.id);
    const endpoint = { endpoint_url: d.endpoint?.url ?? null, endpoint_kind: d.endpoint?.kind ?? null };
    if (d.fromVersion === null) {
      inserts.push({
        id: d.id,
        name: d.name,
        state: d.state,
        version: d.version,
        ...endpoint,
        current_attempt_id: d.currentAttemptId,
        last_ready_at: d.lastReadyAt,
        at: now,
      });
    } else {
      updates.push({
        id: d.id,
        from_version: d.fromVersion,
        to_version: d.version,
        state: d.state,
        at: now,
        set_current: d.setCurrent,
        current_attempt_id: d.currentAttemptId,
        set_endpoint: d.setEndpoint,
        ...endpoint,
        set_ready: d.setReady,
        last_ready_at: d.lastReadyAt,
      });
    }
  }
  const newAttempts: AttemptInsertRow[] = [];
  const changedAttempts: AttemptChangeRow[] = [];
  for (const a of state.attempts.values()) {
    if (!writes.has(a.deploymentId)) continue;
    const values = {
      id: a.id,
      deployment_id: a.deploymentId,
      status: a.status,
      reason: a.reason,
      started_at: a.setStartedAt,
      ended_at: a.setEndedAt,
    };
    if (a.number !== null) newAttempts.push({ ...values, number: a.number, at: now });
    else if (a.changed) changedAttempts.push(values);
  }
  return { updates, inserts, newAttempts, changedAttempts, writes };
}
