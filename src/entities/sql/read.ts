/**
 * The read side: deployments (with their current attempt), attempts and history, as entity-typed records. Plain
 * keyset-paged SELECTs over the contract's tables; the HTTP layer turns records into its JSON views.
 */
import type { DeploymentState } from '../../machine';
import type { Session } from './runner';
import {
  toAttempt,
  toDeployment,
  toStateTransition,
  type AttemptRecord,
  type AttemptRow,
  type DeploymentRecord,
  type DeploymentRow,
  type StateTransitionRecord,
  type StateTransitionRow,
} from './rows';
import { sql } from './statement';

/** A deployment with its current attempt (null when it has none). */
export interface DeploymentWithAttempt {
  readonly deployment: DeploymentRecord;
  readonly currentAttempt: AttemptRecord | null;
}

type DeploymentJoinRow = DeploymentRow & {
  attempt:
    | (Omit<AttemptRow, 'started_at' | 'ended_at' | 'last_heartbeat_at' | 'created_at'> &
        Record<'started_at' | 'ended_at' | 'last_heartbeat_at' | 'created_at', string | null>)
    | null;
};

// Columns are listed, never `*`: a prepared `SELECT *` fails ("cached plan must not change result type") in a
// process that outlives a migration adding a column.
const DEPLOYMENT_COLUMNS = `d.id, d.name, d.state, d.version, d.current_attempt_id, d.endpoint_url, d.endpoint_kind,
         d.last_ready_at, d.state_changed_at, d.created_at, d.updated_at`;
const ATTEMPT_COLUMNS = `id, deployment_id, number, status, started_at, ended_at, last_heartbeat_at, reason, created_at`;
const TRANSITION_COLUMNS = `id, deployment_id, attempt_id, from_state, to_state, version, reason, event_id, actor, created_at`;

const SELECT_DEPLOYMENT = `
  SELECT ${DEPLOYMENT_COLUMNS},
         CASE WHEN a.id IS NULL THEN NULL ELSE json_build_object(
           'id', a.id, 'deployment_id', a.deployment_id, 'number', a.number, 'status', a.status,
           'started_at', a.started_at, 'ended_at', a.ended_at, 'last_heartbeat_at', a.last_heartbeat_at,
           'reason', a.reason, 'created_at', a.created_at) END AS attempt
    FROM deployments d LEFT JOIN attempts a ON a.id = d.current_attempt_id`;

export const READ_SQL = Object.freeze({
  deployment: sql<DeploymentJoinRow>(`${SELECT_DEPLOYMENT} WHERE d.id = $1`),
  deploymentPage: sql<DeploymentJoinRow>(`${SELECT_DEPLOYMENT}
      WHERE ($1::varchar IS NULL OR d.state = $1) AND ($2::uuid IS NULL OR d.id > $2)
      ORDER BY d.id LIMIT $3`),
  deploymentExists: sql<{ one: number }>(`SELECT 1 AS one FROM deployments WHERE id = $1`),
  attempts: sql<AttemptRow>(`SELECT ${ATTEMPT_COLUMNS} FROM attempts WHERE deployment_id = $1 ORDER BY number DESC`),
  transitions: sql<StateTransitionRow>(
    `SELECT ${TRANSITION_COLUMNS} FROM state_transitions WHERE deployment_id = $1 AND version > $2 ORDER BY version LIMIT $3`,
  ),
});

function withAttempt(row: DeploymentJoinRow): DeploymentWithAttempt {
  const { attempt: a, ...d } = row;
  const date = (v: string | null) => (v === null ? null : new Date(v));
  return {
    deployment: toDeployment(d),
    currentAttempt:
      a === null
        ? null
        : toAttempt({
            ...a,
            started_at: date(a.started_at),
            ended_at: date(a.ended_at),
            last_heartbeat_at: date(a.last_heartbeat_at),
            created_at: date(a.created_at) ?? new Date(0),
          }),
  };
}

export async function findDeployment(db: Session, id: string): Promise<DeploymentWithAttempt | null> {
  const { rows } = await db.run(READ_SQL.deployment, [id]);
  const row = rows[0];
  return row === undefined ? null : withAttempt(row);
}

/** Up to `limit + 1` deployments after `after` in id order (the extra one says another page follows). */
export async function findDeployments(
  db: Session,
  options: { state?: DeploymentState | undefined; limit: number; after?: string | undefined },
): Promise<DeploymentWithAttempt[]> {
  const { rows } = await db.run(READ_SQL.deploymentPage, [options.state ?? null, options.after ?? null, options.limit + 1]);
  return rows.map(withAttempt);
}

export async function deploymentExists(db: Session, id: string): Promise<boolean> {
  return (await db.run(READ_SQL.deploymentExists, [id])).rows.length === 1;
}

export async function findAttempts(db: Session, deploymentId: string): Promise<AttemptRecord[]> {
  return (await db.run(READ_SQL.attempts, [deploymentId])).rows.map(toAttempt);
}

export async function findTransitions(db: Session, deploymentId: string, afterVersion: number, limit: number): Promise<StateTransitionRecord[]> {
  return (await db.run(READ_SQL.transitions, [deploymentId, afterVersion, limit])).rows.map(toStateTransition);
}
