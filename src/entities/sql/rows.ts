/**
 * The rows the product's statements return, and their mapping onto the entity classes: the read side hands out
 * entity-typed records (`DeploymentRecord`, ...), never ad-hoc row shapes. A record is the entity without its
 * relations (the fleet never loads relations; they exist to declare the foreign keys).
 */
import type { Attempt } from '../model/attempt';
import type { Deployment } from '../model/deployment';
import type { StateTransition } from '../model/state-transition';

/** (`lastProbedAt` is the sweep's own bookkeeping, its round-robin order: not part of what a deployment reads as) */
export type DeploymentRecord = Omit<Deployment, 'currentAttempt' | 'lastProbedAt'>;
export type AttemptRecord = Omit<Attempt, 'deployment'>;
export type StateTransitionRecord = Omit<StateTransition, 'deployment'>;

/** `deployments` as selected by `d.*` (snake_case, as PostgreSQL names the columns). */
export interface DeploymentRow {
  id: string;
  name: string;
  state: Deployment['state'];
  version: number;
  current_attempt_id: string | null;
  endpoint_url: string | null;
  endpoint_kind: Deployment['endpointKind'];
  last_ready_at: Date | null;
  state_changed_at: Date;
  created_at: Date;
  updated_at: Date;
}

export interface AttemptRow {
  id: string;
  deployment_id: string;
  number: number;
  status: Attempt['status'];
  started_at: Date | null;
  ended_at: Date | null;
  last_heartbeat_at: Date | null;
  reason: string | null;
  created_at: Date;
}

export interface StateTransitionRow {
  id: string;
  deployment_id: string;
  attempt_id: string | null;
  from_state: StateTransition['fromState'];
  to_state: StateTransition['toState'];
  version: number;
  reason: string;
  event_id: string;
  actor: string;
  created_at: Date;
}

export function toDeployment(r: DeploymentRow): DeploymentRecord {
  return {
    id: r.id,
    name: r.name,
    state: r.state,
    version: r.version,
    currentAttemptId: r.current_attempt_id,
    endpointUrl: r.endpoint_url,
    endpointKind: r.endpoint_kind,
    lastReadyAt: r.last_ready_at,
    stateChangedAt: r.state_changed_at,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
  };
}

export function toAttempt(r: AttemptRow): AttemptRecord {
  return {
    id: r.id,
    deploymentId: r.deployment_id,
    number: r.number,
    status: r.status,
    startedAt: r.started_at,
    endedAt: r.ended_at,
    lastHeartbeatAt: r.last_heartbeat_at,
    reason: r.reason,
    createdAt: r.created_at,
  };
}

export function toStateTransition(r: StateTransitionRow): StateTransitionRecord {
  return {
    id: r.id,
    deploymentId: r.deployment_id,
    attemptId: r.attempt_id,
    fromState: r.from_state,
    toState: r.to_state,
    version: r.version,
    reason: r.reason,
    eventId: r.event_id,
    actor: r.actor,
    createdAt: r.created_at,
  };
}
