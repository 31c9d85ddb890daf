/**
 * The group-commit statements (docs/architecture.md, "Group commit"): one snapshot read for a batch of events and
 * one write of everything the batch decided, each a single statement with a fixed text (arrays, not one text per
 * batch size), so each is parsed and planned once per connection like the one-event statements in transitions.ts.
 *
 * The write is atomic per deployment and independent across deployments: every deployment's row is version-checked
 * (or inserted, for a new one), and its claims, attempt rows, history rows and outbox rows are written only if its
 * row was; a deployment whose check lost writes nothing, and the others commit. The whole batch is one commit.
 */
import type { AttemptStatus, DeploymentState } from '../../machine';
import { lockedInIdOrder } from './lock-order';
import { sql } from './statement';

/** Deployments, attempts and earlier processing, as of one snapshot. Timestamps arrive as ISO strings (json). */
export interface BatchSnapshotRow {
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

/** What the batch write reports: deployments written, history ids by eventId, noop claims that took. */
export interface BatchWriteRow {
  won: string[] | null;
  transitions: Record<string, string> | null;
  noop_claimed: string[] | null;
}

/** The column arrays of `BATCH_SQL.write`, in parameter order (see the statement for each one's meaning). */
export interface BatchWriteParams {
  readonly updates: {
    id: string[]; fromVersion: number[]; toVersion: number[]; state: string[]; at: Date[];
    setCurrent: boolean[]; currentAttemptId: Array<string | null>;
    setEndpoint: boolean[]; endpointUrl: Array<string | null>; endpointKind: Array<string | null>;
    setReady: boolean[]; lastReadyAt: Array<Date | null>;
  };
  readonly inserts: {
    id: string[]; name: string[]; state: string[]; version: number[]; endpointUrl: Array<string | null>;
    endpointKind: Array<string | null>; currentAttemptId: Array<string | null>; lastReadyAt: Array<Date | null>; at: Date[];
  };
  readonly claims: {
    eventId: string[]; eventName: string[]; deploymentId: string[]; reason: string[]; version: number[]; sha: string[]; at: Date[];
  };
  readonly noopClaims: {
    eventId: string[]; eventName: string[]; deploymentId: string[]; reason: string[]; version: Array<number | null>;
    sha: string[]; at: Date[]; needsWin: boolean[];
  };
  readonly newAttempts: {
    id: string[]; deploymentId: string[]; number: number[]; status: string[]; reason: Array<string | null>;
    startedAt: Array<Date | null>; endedAt: Array<Date | null>; at: Date[];
  };
  readonly changedAttempts: {
    id: string[]; deploymentId: string[]; status: string[]; reason: Array<string | null>;
    startedAt: Array<Date | null>; endedAt: Array<Date | null>;
  };
  readonly transitions: {
    deploymentId: string[]; attemptId: Array<string | null>; from: Array<string | null>; to: string[]; version: number[];
    reason: string[]; eventId: string[]; actor: string[]; at: Date[]; atText: string[];
    /** the W3C trace context of the event's `transition` span, when it is traced: the entry's `traceparent` */
    traceparent: Array<string | null>;
  };
}

export function batchWriteParams(p: BatchWriteParams): unknown[] {
  const { updates: u, inserts: i, claims: c, noopClaims: n, newAttempts: a, changedAttempts: x, transitions: t } = p;
  return [
    u.id, u.fromVersion, u.toVersion, u.state, u.at, u.setCurrent, u.currentAttemptId, u.setEndpoint, u.endpointUrl,
    u.endpointKind, u.setReady, u.lastReadyAt, // 1-12
    i.id, i.name, i.state, i.version, i.endpointUrl, i.endpointKind, i.currentAttemptId, i.lastReadyAt, i.at, // 13-21
    c.eventId, c.eventName, c.deploymentId, c.reason, c.version, c.sha, c.at, // 22-28
    n.eventId, n.eventName, n.deploymentId, n.reason, n.version, n.sha, n.at, n.needsWin, // 29-36
    a.id, a.deploymentId, a.number, a.status, a.reason, a.startedAt, a.endedAt, a.at, // 37-44
    x.id, x.deploymentId, x.status, x.reason, x.startedAt, x.endedAt, // 45-50
    t.deploymentId, t.attemptId, t.from, t.to, t.version, t.reason, t.eventId, t.actor, t.at, t.atText, // 51-60
    t.traceparent, // 61
  ];
}

export const BATCH_SQL = Object.freeze({
  /**
   * One statement, so one consistent snapshot of everything the batch's decisions read. ($1 deployment ids, $2
   * attempt ids the events name, $3 eventIds, $4 deployments whose highest attempt number is needed.) Every part is
   * an index lookup: the named and the current attempts are one `= ANY` of one array (an `OR id IN (...)` made
   * PostgreSQL scan the whole attempts table for every batch)
   */
  snapshot: sql<BatchSnapshotRow>(
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
  /**
   * Everything a batch decided, in one statement (data-modifying CTEs). `won` is the deployments whose row was
   * written: version-checked UPDATEs and INSERTs of new ones. The rows it updates are locked by id first
   * (lock-order.ts): the deployments, then, once every deployment is written (`won` read whole), the attempts it
   * changes; the arrays' order does not decide it. New rows (deployments by id, as planBatch sorts them) lock nothing
   * another writer holds.
   * Applied claims are plain INSERTs, as in the one-event write: an eventId claimed meanwhile by another delivery
   * fails the whole statement, and nothing of it stays. Noop claims of a deployment with applied events before them
   * in the batch (`needs_win`) hang on its row too; the others stand alone, as a one-event noop's claim does.
   * History and outbox rows go in in the batch's order, so a deployment's outbox ids follow its versions. An
   * event traced (docs/architecture.md, "Tracing") has its `traceparent` in its outbox row's fields; others none.
   */
  write: sql<BatchWriteRow>(
    `WITH locked AS ${lockedInIdOrder('deployments', '$1::uuid[]')},
     upd AS (
       UPDATE deployments d SET
         state = v.state, version = v.to_version, state_changed_at = v.at, updated_at = v.at,
         current_attempt_id = CASE WHEN v.set_current THEN v.current_attempt_id ELSE d.current_attempt_id END,
         endpoint_url = CASE WHEN v.set_endpoint THEN v.endpoint_url ELSE d.endpoint_url END,
         endpoint_kind = CASE WHEN v.set_endpoint THEN v.endpoint_kind ELSE d.endpoint_kind END,
         last_ready_at = CASE WHEN v.set_ready THEN v.last_ready_at ELSE d.last_ready_at END
       FROM locked JOIN unnest($1::uuid[], $2::integer[], $3::integer[], $4::varchar[], $5::timestamptz[], $6::boolean[], $7::uuid[],
                   $8::boolean[], $9::text[], $10::varchar[], $11::boolean[], $12::timestamptz[])
            AS v(id, from_version, to_version, state, at, set_current, current_attempt_id, set_endpoint, endpoint_url,
                 endpoint_kind, set_ready, last_ready_at) ON v.id = locked.id
       WHERE d.id = locked.id AND d.version = v.from_version
       RETURNING d.id
     ),
     ins AS (
       INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, current_attempt_id, last_ready_at,
                                state_changed_at, created_at, updated_at)
       SELECT v.id, v.name, v.state, v.version, v.endpoint_url, v.endpoint_kind, v.current_attempt_id, v.last_ready_at,
              v.at, v.at, v.at
         FROM unnest($13::uuid[], $14::varchar[], $15::varchar[], $16::integer[], $17::text[], $18::varchar[], $19::uuid[],
                     $20::timestamptz[], $21::timestamptz[])
              AS v(id, name, state, version, endpoint_url, endpoint_kind, current_attempt_id, last_ready_at, at)
       ON CONFLICT (id) DO NOTHING
       RETURNING id
     ),
     won AS (SELECT id FROM upd UNION ALL SELECT id FROM ins),
     claims AS (
       INSERT INTO processed_events (event_id, event_name, deployment_id, outcome, reason, version, payload_sha256, processed_at)
       SELECT v.event_id, v.event_name, v.deployment_id, 'applied', v.reason, v.version, v.sha, v.at
         FROM unnest($22::varchar[], $23::varchar[], $24::uuid[], $25::varchar[], $26::integer[], $27::char(64)[],
                     $28::timestamptz[]) AS v(event_id, event_name, deployment_id, reason, version, sha, at)
        WHERE v.deployment_id IN (SELECT id FROM won)
     ),
     noop_claims AS (
       INSERT INTO processed_events (event_id, event_name, deployment_id, outcome, reason, version, payload_sha256, processed_at)
       SELECT v.event_id, v.event_name, v.deployment_id, 'noop', v.reason, v.version, v.sha, v.at
         FROM unnest($29::varchar[], $30::varchar[], $31::uuid[], $32::varchar[], $33::integer[], $34::char(64)[],
                     $35::timestamptz[], $36::boolean[]) AS v(event_id, event_name, deployment_id, reason, version, sha, at, needs_win)
        WHERE NOT v.needs_win OR v.deployment_id IN (SELECT id FROM won)
       ON CONFLICT (event_id) DO NOTHING
       RETURNING event_id
     ),
     new_attempts AS (
       INSERT INTO attempts (id, deployment_id, number, status, reason, started_at, ended_at, created_at)
       SELECT v.id, v.deployment_id, v.number, v.status, v.reason, v.started_at, v.ended_at, v.at
         FROM unnest($37::uuid[], $38::uuid[], $39::integer[], $40::varchar[], $41::text[], $42::timestamptz[],
                     $43::timestamptz[], $44::timestamptz[]) AS v(id, deployment_id, number, status, reason, started_at, ended_at, at)
        WHERE v.deployment_id IN (SELECT id FROM won)
     ),
     locked_attempts AS ${lockedInIdOrder('attempts', '$45::uuid[]', 'deployment_id = ANY(ARRAY(SELECT id FROM won))')},
     changed_attempts AS (
       UPDATE attempts AS a SET status = v.status, reason = COALESCE(v.reason, a.reason),
              started_at = COALESCE(v.started_at, a.started_at), ended_at = COALESCE(v.ended_at, a.ended_at)
         FROM locked_attempts JOIN unnest($45::uuid[], $46::uuid[], $47::varchar[], $48::text[], $49::timestamptz[], $50::timestamptz[])
              AS v(id, deployment_id, status, reason, started_at, ended_at) ON v.id = locked_attempts.id
        WHERE a.id = locked_attempts.id AND v.deployment_id IN (SELECT id FROM won)
     ),
     tv AS (
       SELECT * FROM unnest($51::uuid[], $52::uuid[], $53::varchar[], $54::varchar[], $55::integer[], $56::varchar[],
                            $57::varchar[], $58::varchar[], $59::timestamptz[], $60::text[], $61::text[]) WITH ORDINALITY
              AS v(deployment_id, attempt_id, from_state, to_state, version, reason, event_id, actor, at, at_text, traceparent, ord)
        WHERE v.deployment_id IN (SELECT id FROM won)
     ),
     t AS (
       INSERT INTO state_transitions (deployment_id, attempt_id, from_state, to_state, version, reason, event_id, actor, created_at)
       SELECT deployment_id, attempt_id, from_state, to_state, version, reason, event_id, actor, at FROM tv ORDER BY ord
       RETURNING id, event_id
     ),
     o AS (
       INSERT INTO outbox (deployment_id, version, fields, created_at)
       SELECT tv.deployment_id, tv.version, jsonb_build_object(
           'type', 'state_transition', 'transitionId', t.id::text, 'deploymentId', tv.deployment_id::text,
           'attemptId', COALESCE(tv.attempt_id::text, ''), 'from', COALESCE(tv.from_state::text, ''), 'to', tv.to_state::text,
           'version', tv.version::text, 'reason', tv.reason::text, 'eventId', tv.event_id::text,
           'at', tv.at_text, 'actor', tv.actor::text)
           || CASE WHEN tv.traceparent IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('traceparent', tv.traceparent) END,
         tv.at
         FROM tv JOIN t ON t.event_id = tv.event_id
        ORDER BY tv.ord
     )
     SELECT (SELECT array_agg(id::text) FROM won) AS won,
            (SELECT json_object_agg(event_id, id::text) FROM t) AS transitions,
            (SELECT array_agg(event_id) FROM noop_claims) AS noop_claimed`,
  ),
});
