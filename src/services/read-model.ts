/**
 * Reads for operators and other services: deployments with their current attempt, attempts, history. The
 * statements and the entity-typed records they return are in src/entities/sql/read.ts; this turns records into
 * the API's JSON views (ISO timestamps, the endpoint as one object, history in the stream's field names).
 */
import type { DataSource } from 'typeorm';
import {
  Database,
  findAttempts,
  findDeployment,
  findDeployments,
  findTransitions,
  type AttemptRecord,
  type DeploymentWithAttempt,
  type StateTransitionRecord,
} from '../entities/sql';
import type { AttemptStatus, DeploymentState, EndpointKind } from '../machine';

export interface AttemptView {
  readonly id: string;
  readonly number: number;
  readonly status: AttemptStatus;
  readonly startedAt: string | null;
  readonly endedAt: string | null;
  readonly lastHeartbeatAt: string | null;
  readonly reason: string | null;
}

export interface DeploymentView {
  readonly id: string;
  readonly name: string;
  readonly state: DeploymentState;
  readonly version: number;
  readonly endpoint: { readonly url: string; readonly kind: EndpointKind } | null;
  readonly lastReadyAt: string | null;
  readonly stateChangedAt: string;
  readonly createdAt: string;
  readonly updatedAt: string;
  readonly currentAttempt: AttemptView | null;
}

export interface TransitionView {
  readonly transitionId: string;
  readonly attemptId: string | null;
  readonly from: DeploymentState | null;
  readonly to: DeploymentState;
  readonly version: number;
  readonly reason: string;
  readonly eventId: string;
  /** who caused it: an API token's name, `sweep`, or the producer's `actor` */
  readonly actor: string;
  readonly at: string;
}

const iso = (d: Date | null): string | null => (d === null ? null : d.toISOString());

function attemptView(a: AttemptRecord): AttemptView {
  return {
    id: a.id,
    number: a.number,
    status: a.status,
    startedAt: iso(a.startedAt),
    endedAt: iso(a.endedAt),
    lastHeartbeatAt: iso(a.lastHeartbeatAt),
    reason: a.reason,
  };
}

function deploymentView({ deployment: d, currentAttempt }: DeploymentWithAttempt): DeploymentView {
  return {
    id: d.id,
    name: d.name,
    state: d.state,
    version: d.version,
    endpoint: d.endpointUrl !== null && d.endpointKind !== null ? { url: d.endpointUrl, kind: d.endpointKind } : null,
    lastReadyAt: iso(d.lastReadyAt),
    stateChangedAt: d.stateChangedAt.toISOString(),
    createdAt: d.createdAt.toISOString(),
    updatedAt: d.updatedAt.toISOString(),
    currentAttempt: currentAttempt === null ? null : attemptView(currentAttempt),
  };
}

function transitionView(t: StateTransitionRecord): TransitionView {
  return {
    transitionId: t.id,
    attemptId: t.attemptId,
    from: t.fromState,
    to: t.toState,
    version: t.version,
    reason: t.reason,
    eventId: t.eventId,
    actor: t.actor,
    at: t.createdAt.toISOString(),
  };
}

export async function getDeployment(ds: DataSource, id: string): Promise<DeploymentView | null> {
  const found = await findDeployment(new Database(ds), id);
  return found === null ? null : deploymentView(found);
}

export interface DeploymentPage {
  readonly items: readonly DeploymentView[];
  /** pass as `cursor` for the next page; null on the last page */
  readonly nextCursor: string | null;
}

/** A page of deployments in id order (keyset paging: stable under concurrent inserts), optionally by state. */
export async function listDeployments(
  ds: DataSource,
  options: { state?: DeploymentState | undefined; limit: number; after?: string | undefined },
): Promise<DeploymentPage> {
  const found = await findDeployments(new Database(ds), options);
  const items = found.slice(0, options.limit).map(deploymentView);
  return { items, nextCursor: found.length > options.limit ? (items[items.length - 1]?.id ?? null) : null };
}

export async function listAttempts(ds: DataSource, deploymentId: string): Promise<AttemptView[]> {
  return (await findAttempts(new Database(ds), deploymentId)).map(attemptView);
}

/** History after `afterVersion` in version order, at most `limit` rows. */
export async function listTransitions(
  ds: DataSource,
  deploymentId: string,
  afterVersion = 0,
  limit = 100,
): Promise<TransitionView[]> {
  return (await findTransitions(new Database(ds), deploymentId, afterVersion, limit)).map(transitionView);
}
