/**
 * The one write of transitions (docs/architecture.md, "One atomic write" and "Group commit"): everything that a set
 * of decided events writes, a lone event's as a batch of one, in ONE statement of data-modifying CTEs with one fixed
 * text, prepared once per connection. The rows come as named row sets (row-sets.ts), planned by the transition
 * service's planner (src/services/transitions/batch-plan.ts).
 *
 * Atomic per deployment, independent across deployments: every deployment's row is version-checked (or inserted,
 * for a new one), and its claims, attempt rows, history rows and outbox rows are written only if its row was; a
 * deployment whose check lost writes nothing, and the others commit. The whole statement is one commit.
 */
import { transitionEntryFields, type TransitionEntryFields } from '../model/outbox-entry';
import type { AttemptStatus, DeploymentState, EndpointKind } from '../../machine';
import { lockedInIdOrder } from './lock-order';
import { RowSets } from './row-sets';
import { sql } from './statement';

/** A deployment's version-checked UPDATE: its row as the batch's events left it. `set_*`: whether to set that column. */
export interface DeploymentUpdateRow {
  readonly id: string;
  /** the version read; the row is written only if it still has it */
  readonly from_version: number;
  readonly to_version: number;
  readonly state: DeploymentState;
  readonly at: Date;
  readonly set_current: boolean;
  readonly current_attempt_id: string | null;
  readonly set_endpoint: boolean;
  readonly endpoint_url: string | null;
  readonly endpoint_kind: EndpointKind | null;
  readonly set_ready: boolean;
  readonly last_ready_at: Date | null;
}

/** A new deployment (`deployment.create`), as the batch's events left it. */
export interface DeploymentInsertRow {
  readonly id: string;
  readonly name: string;
  readonly state: DeploymentState;
  readonly version: number;
  readonly endpoint_url: string | null;
  readonly endpoint_kind: EndpointKind | null;
  readonly current_attempt_id: string | null;
  readonly last_ready_at: Date | null;
  readonly at: Date;
}

/** An applied event: its eventId's claim, its history row and its outbox row, in the batch's order. */
export interface AppliedEventRow {
  readonly event_id: string;
  readonly event_name: string;
  readonly deployment_id: string;
  readonly attempt_id: string | null;
  readonly from_state: DeploymentState | null;
  readonly to_state: DeploymentState;
  /** the deployment's version after it */
  readonly version: number;
  readonly reason: string;
  readonly actor: string;
  /** SHA-256 of the event's canonical payload (the claim's identity) */
  readonly payload_sha256: string;
  readonly at: Date;
  /** the W3C trace context of the event's `transition` span when it is traced (its entry's `traceparent`) */
  readonly traceparent: string | null;
}

/** A noop's claim of its eventId. `needs_win`: decided on top of applied events of its deployment in the batch. */
export interface NoopClaimRow {
  readonly event_id: string;
  readonly event_name: string;
  readonly deployment_id: string;
  readonly reason: string;
  readonly version: number | null;
  readonly payload_sha256: string;
  readonly at: Date;
  readonly needs_win: boolean;
}

/** A new attempt, as the batch's events left it. */
export interface AttemptInsertRow {
  readonly id: string;
  readonly deployment_id: string;
  readonly number: number;
  readonly status: AttemptStatus;
  readonly reason: string | null;
  readonly started_at: Date | null;
  readonly ended_at: Date | null;
  readonly at: Date;
}

/** A change to an existing attempt; a null leaves that column as it is. */
export interface AttemptChangeRow {
  readonly id: string;
  readonly deployment_id: string;
  readonly status: AttemptStatus;
  readonly reason: string | null;
  readonly started_at: Date | null;
  readonly ended_at: Date | null;
}

/** Everything one write writes. */
export interface TransitionWrite {
  readonly updates: readonly DeploymentUpdateRow[];
  readonly inserts: readonly DeploymentInsertRow[];
  readonly applied: readonly AppliedEventRow[];
  readonly noopClaims: readonly NoopClaimRow[];
  readonly newAttempts: readonly AttemptInsertRow[];
  readonly changedAttempts: readonly AttemptChangeRow[];
}

/** What the write reports: deployments written, history ids by eventId, noop claims that took. */
export interface TransitionWriteRow {
  won: string[] | null;
  transitions: Record<string, string> | null;
  noop_claimed: string[] | null;
  /**
   * the outbox rows it wrote, in id order, when it was asked for them and no row was waiting for the relay as of the
   * statement's snapshot (see `WRITE`); null otherwise
   */
  handoff: HandedOffRow[] | null;
}

/** An outbox row as the write hands it to the relay of its process: as the relay's own read returns it. */
export interface HandedOffRow {
  readonly id: string;
  readonly fields: Record<string, string>;
}

/** An applied event as the statement takes it: with its stream entry (all of it but `transitionId`). */
type AppliedWithEntry = Omit<AppliedEventRow, 'traceparent'> & { readonly fields: TransitionEntryFields };

const ROWS = new RowSets<Omit<TransitionWrite, 'applied'> & { readonly applied: readonly AppliedWithEntry[] }>({
  updates: {
    id: 'uuid',
    from_version: 'integer',
    to_version: 'integer',
    state: 'varchar',
    at: 'timestamptz',
    set_current: 'boolean',
    current_attempt_id: 'uuid',
    set_endpoint: 'boolean',
    endpoint_url: 'text',
    endpoint_kind: 'varchar',
    set_ready: 'boolean',
    last_ready_at: 'timestamptz',
  },
  inserts: {
    id: 'uuid',
    name: 'varchar',
    state: 'varchar',
    version: 'integer',
    endpoint_url: 'text',
    endpoint_kind: 'varchar',
    current_attempt_id: 'uuid',
    last_ready_at: 'timestamptz',
    at: 'timestamptz',
  },
  applied: {
    event_id: 'varchar',
    event_name: 'varchar',
    deployment_id: 'uuid',
    attempt_id: 'uuid',
    from_state: 'varchar',
    to_state: 'varchar',
    version: 'integer',
    reason: 'varchar',
    actor: 'varchar',
    payload_sha256: 'char(64)',
    at: 'timestamptz',
    fields: 'jsonb',
  },
  noopClaims: {
    event_id: 'varchar',
    event_name: 'varchar',
    deployment_id: 'uuid',
    reason: 'varchar',
    version: 'integer',
    payload_sha256: 'char(64)',
    at: 'timestamptz',
    needs_win: 'boolean',
  },
  newAttempts: {
    id: 'uuid',
    deployment_id: 'uuid',
    number: 'integer',
    status: 'varchar',
    reason: 'text',
    started_at: 'timestamptz',
    ended_at: 'timestamptz',
    at: 'timestamptz',
  },
  changedAttempts: {
    id: 'uuid',
    deployment_id: 'uuid',
    status: 'varchar',
    reason: 'text',
    started_at: 'timestamptz',
    ended_at: 'timestamptz',
  },
});

/** the write's own parameter, after the row sets': hand the outbox rows to the relay of this process */
const HANDOFF_PARAM = ROWS.count + 1;

/**
 * `won` is the deployments whose row was written: version-checked UPDATEs and INSERTs of new ones. The rows it
 * updates are locked by id first (lock-order.ts): the deployments, then, once every deployment is written (`won`
 * read whole), the attempts it changes; the rows' order does not decide it. New rows (deployments by id, as the
 * planner sorts them) lock nothing another writer holds. Applied claims are plain INSERTs: an eventId claimed
 * meanwhile by another delivery fails the whole statement on the claim's key, and nothing of it stays. Noop claims
 * that `needs_win` hang on their deployment's row; the others stand alone. History and outbox rows go in in the
 * batch's order, so a deployment's outbox ids follow its versions. Numbering new attempts cannot race: every
 * attempt insert comes with its deployment's version-checked write.
 *
 * Asked to (its last parameter, when the active relay runs in the writer's process), it returns the outbox rows it
 * wrote, for the relay to append without reading them back, but only when no outbox row waited for the relay as of
 * its snapshot (its own rows are not in it). Then every earlier version of each deployment it wrote is on the stream
 * already: an earlier version committed before this statement's snapshot (a version committed later fails its
 * version check, and it writes nothing for that deployment), and a row is marked published only once it is
 * appended. So what it hands over cannot overtake an earlier version of its deployment (relay-publisher.ts).
 */
const WRITE = `WITH locked AS ${lockedInIdOrder('deployments', ROWS.column('updates', 'id'))},
     upd AS (
       UPDATE deployments d SET
         state = v.state, version = v.to_version, state_changed_at = v.at, updated_at = v.at,
         current_attempt_id = CASE WHEN v.set_current THEN v.current_attempt_id ELSE d.current_attempt_id END,
         endpoint_url = CASE WHEN v.set_endpoint THEN v.endpoint_url ELSE d.endpoint_url END,
         endpoint_kind = CASE WHEN v.set_endpoint THEN v.endpoint_kind ELSE d.endpoint_kind END,
         last_ready_at = CASE WHEN v.set_ready THEN v.last_ready_at ELSE d.last_ready_at END
       FROM locked JOIN ${ROWS.from('updates', 'v')} ON v.id = locked.id
       WHERE d.id = locked.id AND d.version = v.from_version
       RETURNING d.id
     ),
     ins AS (
       INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, current_attempt_id, last_ready_at,
                                state_changed_at, created_at, updated_at)
       SELECT v.id, v.name, v.state, v.version, v.endpoint_url, v.endpoint_kind, v.current_attempt_id, v.last_ready_at,
              v.at, v.at, v.at
         FROM ${ROWS.from('inserts', 'v')}
       ON CONFLICT (id) DO NOTHING
       RETURNING id
     ),
     won AS (SELECT id FROM upd UNION ALL SELECT id FROM ins),
     av AS (SELECT * FROM ${ROWS.from('applied', 'v', 'ord')} WHERE v.deployment_id IN (SELECT id FROM won)),
     claims AS (
       INSERT INTO processed_events (event_id, event_name, deployment_id, outcome, reason, version, payload_sha256, processed_at)
       SELECT event_id, event_name, deployment_id, 'applied', reason, version, payload_sha256, at FROM av
     ),
     noop_claims AS (
       INSERT INTO processed_events (event_id, event_name, deployment_id, outcome, reason, version, payload_sha256, processed_at)
       SELECT v.event_id, v.event_name, v.deployment_id, 'noop', v.reason, v.version, v.payload_sha256, v.at
         FROM ${ROWS.from('noopClaims', 'v')}
        WHERE NOT v.needs_win OR v.deployment_id IN (SELECT id FROM won)
       ON CONFLICT (event_id) DO NOTHING
       RETURNING event_id
     ),
     new_attempts AS (
       INSERT INTO attempts (id, deployment_id, number, status, reason, started_at, ended_at, created_at)
       SELECT v.id, v.deployment_id, v.number, v.status, v.reason, v.started_at, v.ended_at, v.at
         FROM ${ROWS.from('newAttempts', 'v')}
        WHERE v.deployment_id IN (SELECT id FROM won)
     ),
     locked_attempts AS ${lockedInIdOrder('attempts', ROWS.column('changedAttempts', 'id'), 'deployment_id = ANY(ARRAY(SELECT id FROM won))')},
     changed_attempts AS (
       UPDATE attempts AS a SET status = v.status, reason = COALESCE(v.reason, a.reason),
              started_at = COALESCE(v.started_at, a.started_at), ended_at = COALESCE(v.ended_at, a.ended_at)
         FROM locked_attempts JOIN ${ROWS.from('changedAttempts', 'v')} ON v.id = locked_attempts.id
        WHERE a.id = locked_attempts.id AND v.deployment_id IN (SELECT id FROM won)
     ),
     t AS (
       INSERT INTO state_transitions (deployment_id, attempt_id, from_state, to_state, version, reason, event_id, actor, created_at)
       SELECT deployment_id, attempt_id, from_state, to_state, version, reason, event_id, actor, at FROM av ORDER BY ord
       RETURNING id, event_id
     ),
     o AS (
       INSERT INTO outbox (deployment_id, version, fields, created_at)
       SELECT av.deployment_id, av.version, av.fields || jsonb_build_object('transitionId', t.id::text), av.at
         FROM av JOIN t ON t.event_id = av.event_id
        ORDER BY av.ord
       RETURNING id, fields
     )
     SELECT (SELECT array_agg(id::text) FROM won) AS won,
            (SELECT json_object_agg(event_id, id::text) FROM t) AS transitions,
            (SELECT array_agg(event_id) FROM noop_claims) AS noop_claimed,
            CASE WHEN $${HANDOFF_PARAM}::boolean AND NOT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL)
                 THEN (SELECT json_agg(json_build_object('id', id::text, 'fields', fields) ORDER BY id) FROM o) END AS handoff`;

export const TRANSITION_WRITE = sql<TransitionWriteRow>(WRITE);

/**
 * The parameters of `TRANSITION_WRITE` for `write`: each applied event with its stream entry; `handoff`: return the
 * outbox rows for the relay of this process, when nothing waits for it.
 */
export function transitionWriteParams(write: TransitionWrite, handoff = false): unknown[] {
  const applied = write.applied.map(({ traceparent, ...row }) => ({
    ...row,
    fields: transitionEntryFields({
      deploymentId: row.deployment_id,
      attemptId: row.attempt_id,
      from: row.from_state,
      to: row.to_state,
      version: row.version,
      reason: row.reason,
      eventId: row.event_id,
      at: row.at,
      actor: row.actor,
      traceparent,
    }),
  }));
  return [...ROWS.values({ ...write, applied }), handoff];
}

/** Whether `write` writes anything at all. */
export function writesAnything(write: TransitionWrite): boolean {
  return write.updates.length + write.inserts.length + write.noopClaims.length > 0;
}
