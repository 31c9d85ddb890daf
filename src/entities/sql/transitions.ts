/**
 * The transition service's statements: the snapshot read, the row lock, the write (transition-write.ts), who holds
 * an eventId, and the relay's wake-up. This is the hot write path, hand-tuned SQL on purpose: a lone event and a
 * group-commit batch alike are two statements, one snapshot read and one write (the version-checked UPDATEs and
 * everything that hangs on them, as data-modifying CTEs), each with one fixed text (arrays, not one text per size)
 * and explicit parameter types, prepared once per connection. bench/ measured per-statement overhead to be most of
 * PostgreSQL's and the worker's CPU per transition, so an ORM's save() (one statement per row, no version check in
 * its WHERE) is not used here.
 */
import type { AttemptStatus, DeploymentState } from '../../machine';
import { sql } from './statement';
import { TRANSITION_WRITE } from './transition-write';

/** The NOTIFY channel that wakes the outbox relay after a commit that wrote outbox rows. */
export const OUTBOX_CHANNEL = 'lifecycle_fleet_outbox';

/**
 * Deployments, attempts and earlier processing, as of one snapshot (`TRANSITION_SQL.snapshot`). Timestamps arrive as
 * ISO strings (json).
 */
export interface TransitionSnapshotRow {
  deployments: Array<{
    id: string;
    name: string;
    state: DeploymentState;
    version: number;
    current_attempt_id: string | null;
    /** the highest attempt number, for deployments asked for in $4 (else null) */
    max_number: number | null;
  }> | null;
  attempts: Array<{
    id: string;
    deployment_id: string;
    status: AttemptStatus;
    last_heartbeat_at: string | null;
    started_at: string | null;
  }> | null;
  processed: Array<{
    event_id: string;
    event_name: string;
    deployment_id: string;
    payload_sha256: string | null;
    outcome: string;
    reason: string;
    version: number | null;
  }> | null;
}

export interface ClaimRow {
  event_name: string;
  deployment_id: string;
  payload_sha256: string | null;
  outcome: string;
  reason: string;
  version: number | null;
}

export const TRANSITION_SQL = Object.freeze({
  /** the deployment's row lock, taken before the snapshot once the optimistic try has lost */
  lockDeployment: sql<{ one: number }>(`SELECT 1 AS one FROM deployments WHERE id = $1 FOR UPDATE`),
  /**
   * One statement, so one consistent snapshot of everything the decisions of a set of events read (a lone event's
   * too): its deployments, the attempts its events name and their current attempts, and any earlier processing of
   * its eventIds. Reading them in separate statements could see an attempt.create commit in between and misclassify
   * an event as stale. ($1 deployment ids, $2 attempt ids the events name, $3 eventIds, $4 deployments whose highest
   * attempt number is needed.) Every part is an index lookup: the named and the current attempts are one `= ANY` of
   * one array (an `OR id IN (...)` made PostgreSQL scan the whole attempts table for every batch)
   */
  snapshot: sql<TransitionSnapshotRow>(
    `WITH d AS (SELECT id, name, state, version, current_attempt_id,
                       CASE WHEN id = ANY($4::uuid[])
                            THEN (SELECT max(number) FROM attempts n WHERE n.deployment_id = deployments.id) END AS max_number
                  FROM deployments WHERE id = ANY($1::uuid[])),
          a AS (SELECT id, deployment_id, status, last_heartbeat_at, started_at FROM attempts
                 WHERE id = ANY($2::uuid[] || ARRAY(SELECT current_attempt_id FROM d WHERE current_attempt_id IS NOT NULL))),
          p AS (SELECT event_id, event_name, deployment_id, payload_sha256, outcome, reason, version
                  FROM processed_events WHERE event_id = ANY($3::varchar[]))
     SELECT (SELECT json_agg(d) FROM d) AS deployments, (SELECT json_agg(a) FROM a) AS attempts,
            (SELECT json_agg(p) FROM p) AS processed`,
  ),
  /** the write of everything decided (transition-write.ts) */
  write: TRANSITION_WRITE,
  /** who holds an eventId, and what its processing came to */
  claimedBy: sql<ClaimRow>(`SELECT event_name, deployment_id, payload_sha256, outcome, reason, version FROM processed_events WHERE event_id = $1`),
  /**
   * Wakes the relay: a transaction that writes nothing but the notification and does not wait for its flush
   * (see the transition service's relay wake-up for why it is never sent from the transition's own transaction).
   */
  wakeRelay: sql<never>(`SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')`),
});

/** The error is the claim's primary key: another delivery of the event has claimed its eventId. */
export function isClaimConflict(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false;
  const e = err as { code?: unknown; constraint?: unknown; driverError?: { code?: unknown; constraint?: unknown } };
  const code = e.code ?? e.driverError?.code;
  const constraint = e.constraint ?? e.driverError?.constraint;
  return code === '23505' && constraint === 'processed_events_pkey';
}
