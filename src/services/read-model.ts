/**
 * Reads for operators and other services: deployments with their current attempt, attempts, history.
 * Plain SQL over the contract's tables; returns JSON-ready objects with ISO timestamps.
 */
import type { DataSource } from 'typeorm';
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

interface AttemptRow {
  id: string;
  number: number;
  status: AttemptStatus;
  started_at: Date | null;
  ended_at: Date | null;
  last_heartbeat_at: Date | null;
  reason: string | null;
}

const iso = (d: Date | null): string | null => (d === null ? null : d.toISOString());

function attemptView(row: AttemptRow): AttemptView {
  return {
    id: row.id,
    number: row.number,
    status: row.status,
    startedAt: iso(row.started_at),
    endedAt: iso(row.ended_at),
    lastHeartbeatAt: iso(row.last_heartbeat_at),
    reason: row.reason,
  };
}

interface DeploymentRow {
  id: string;
  name: string;
  state: DeploymentState;
  version: number;
  endpoint_url: string | null;
  endpoint_kind: EndpointKind | null;
  last_ready_at: Date | null;
  state_changed_at: Date;
  created_at: Date;
  updated_at: Date;
  attempt: (Omit<AttemptRow, 'started_at' | 'ended_at' | 'last_heartbeat_at'> & Record<string, string | null>) | null;
}

const SELECT_DEPLOYMENT = `
  SELECT d.id, d.name, d.state, d.version, d.endpoint_url, d.endpoint_kind, d.last_ready_at,
         d.state_changed_at, d.created_at, d.updated_at,
         CASE WHEN a.id IS NULL THEN NULL ELSE json_build_object(
           'id', a.id, 'number', a.number, 'status', a.status, 'started_at', a.started_at, 'ended_at', a.ended_at,
           'last_heartbeat_at', a.last_heartbeat_at, 'reason', a.reason) END AS attempt
    FROM deployments d LEFT JOIN attempts a ON a.id = d.current_attempt_id`;

export async function getDeployment(ds: DataSource, id: string): Promise<DeploymentView | null> {
  const rows = await ds.query<DeploymentRow[]>(`${SELECT_DEPLOYMENT} WHERE d.id = $1`, [id]);
  const row = rows[0];
  return row === undefined ? null : deploymentView(row);
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
  const rows = await ds.query<DeploymentRow[]>(
    `${SELECT_DEPLOYMENT}
      WHERE ($1::varchar IS NULL OR d.state = $1) AND ($2::uuid IS NULL OR d.id > $2)
      ORDER BY d.id LIMIT $3`,
    [options.state ?? null, options.after ?? null, options.limit + 1],
  );
  const items = rows.slice(0, options.limit).map(deploymentView);
  return { items, nextCursor: rows.length > options.limit ? (items[items.length - 1]?.id ?? null) : null };
}

function deploymentView(row: DeploymentRow): DeploymentView {
  const a = row.attempt;
  const date = (v: string | null | undefined) => (v == null ? null : new Date(v));
  return {
    id: row.id,
    name: row.name,
    state: row.state,
    version: row.version,
    endpoint: row.endpoint_url !== null && row.endpoint_kind !== null ? { url: row.endpoint_url, kind: row.endpoint_kind } : null,
    lastReadyAt: iso(row.last_ready_at),
    stateChangedAt: row.state_changed_at.toISOString(),
    createdAt: row.created_at.toISOString(),
    updatedAt: row.updated_at.toISOString(),
    currentAttempt:
      a === null
        ? null
        : attemptView({
            id: a.id,
            number: a.number,
            status: a.status,
            reason: a.reason,
            started_at: date(a.started_at),
            ended_at: date(a.ended_at),
            last_heartbeat_at: date(a.last_heartbeat_at),
          }),
  };
}

export async function listAttempts(ds: DataSource, deploymentId: string): Promise<AttemptView[]> {
  const rows = await ds.query<AttemptRow[]>(
    `SELECT id, number, status, started_at, ended_at, last_heartbeat_at, reason
       FROM attempts WHERE deployment_id = $1 ORDER BY number DESC`,
    [deploymentId],
  );
  return rows.map(attemptView);
}

/** History after `afterVersion` in version order, at most `limit` rows. */
export async function listTransitions(
  ds: DataSource,
  deploymentId: string,
  afterVersion = 0,
  limit = 100,
): Promise<TransitionView[]> {
  const rows = await ds.query<
    Array<{
      id: string;
      attempt_id: string | null;
      from_state: DeploymentState | null;
      to_state: DeploymentState;
      version: number;
      reason: string;
      event_id: string;
      actor: string;
      created_at: Date;
    }>
  >(
    `SELECT id, attempt_id, from_state, to_state, version, reason, event_id, actor, created_at
       FROM state_transitions WHERE deployment_id = $1 AND version > $2 ORDER BY version LIMIT $3`,
    [deploymentId, afterVersion, limit],
  );
  return rows.map((r) => ({
    transitionId: r.id,
    attemptId: r.attempt_id,
    from: r.from_state,
    to: r.to_state,
    version: r.version,
    reason: r.reason,
    eventId: r.event_id,
    actor: r.actor,
    at: r.created_at.toISOString(),
  }));
}
