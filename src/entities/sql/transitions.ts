/**
 * The transition service's statements: the snapshot read, the row lock, the write (transition-write.ts), who holds
 * an eventId, and the relay's wake-up. This is the hot write path, hand-tuned SQL on purpose: a lone event and a
 * group-commit batch alike are two statements, one snapshot read and one write (the version-checked UPDATEs and
 * everything that hangs on them, as data-modifying CTEs), each with one fixed text for any number of events (its
 * keys and row sets are jsonb parameters, row-sets.ts) and explicit parameter types, prepared once per connection,
 * which keeps one generic plan of each (test/integration/transition-plan-cache.test.ts). bench/ measured
 * per-statement overhead to be most of PostgreSQL's and the worker's CPU per transition, so an ORM's save() (one
 * statement per row, no version check in its WHERE) is not used here.
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

/** What `TRANSITION_SQL.snapshot` reads, by key. */
export interface TransitionSnapshotKeys {
  readonly deployments: readonly string[];
  /** the attempts the events name (their deployments' current attempts come along) */
  readonly attempts: readonly string[];
  readonly eventIds: readonly string[];
  /** deployments whose highest attempt number is needed (an attempt.create's) */
  readonly numbering: readonly string[];
}

/** The parameters of `TRANSITION_SQL.snapshot`: each key list as a JSON array. */
export function transitionSnapshotParams(keys: TransitionSnapshotKeys): string[] {
  return [keys.deployments, keys.attempts, keys.eventIds, keys.numbering].map((list) => JSON.stringify(list));
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
   * attempt number is needed: each a JSON array of strings.)
   *
   * Every row is found by one primary-key probe per key (LATERAL ... LIMIT 1, which the planner cannot turn into a
   * join that scans a table), and the keys come as jsonb, whose length the planner cannot see: so it costs a lone
   * event's read as a batch's and keeps one generic plan per connection instead of planning every call, and that
   * plan stays a probe per key even when it was made while the tables were nearly empty (an `= ANY(array)` plan made
   * then scanned all of processed_events for every read until the next ANALYZE).
   */
  snapshot: sql<TransitionSnapshotRow>(
    `WITH d AS (SELECT x.*, CASE WHEN x.id IN (SELECT n.value::uuid FROM jsonb_array_elements_text($4::jsonb) n)
                                 THEN (SELECT max(number) FROM attempts n WHERE n.deployment_id = x.id) END AS max_number
                  FROM (SELECT DISTINCT k.value::uuid AS id FROM jsonb_array_elements_text($1::jsonb) k) k
                 CROSS JOIN LATERAL (SELECT id, name, state, version, current_attempt_id FROM deployments
                                      WHERE id = k.id LIMIT 1) x),
          a AS (SELECT x.*
                  FROM (SELECT k.value::uuid AS id FROM jsonb_array_elements_text($2::jsonb) k
                        UNION SELECT current_attempt_id FROM d WHERE current_attempt_id IS NOT NULL) k
                 CROSS JOIN LATERAL (SELECT id, deployment_id, status, last_heartbeat_at, started_at FROM attempts
                                      WHERE id = k.id LIMIT 1) x),
          p AS (SELECT x.*
                  FROM (SELECT DISTINCT k.value AS event_id FROM jsonb_array_elements_text($3::jsonb) k) k
                 CROSS JOIN LATERAL (SELECT event_id, event_name, deployment_id, payload_sha256, outcome, reason, version
                                       FROM processed_events WHERE event_id = k.event_id LIMIT 1) x)
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
