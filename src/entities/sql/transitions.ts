/**
 * The transition service's statements: the snapshot read, the row lock, the eventId's claim, and the write of an
 * applied decision. This is the hot write path, hand-tuned SQL on purpose: one statement per decision (the version-
 * checked UPDATE and everything that hangs on it, as data-modifying CTEs), explicit parameter types, prepared per
 * connection. bench/ measured per-statement overhead to be most of PostgreSQL's and the worker's CPU per
 * transition, so an ORM's save() (one statement per row, no version check in its WHERE) is not used here.
 */
import type { AttemptStatus, Decision, DeploymentState } from '../../machine';
import { lockedInIdOrder } from './lock-order';
import { sql, type Statement } from './statement';

/** The NOTIFY channel that wakes the outbox relay after a commit that wrote outbox rows. */
export const OUTBOX_CHANNEL = 'lifecycle_fleet_outbox';

/** One consistent read of everything a decision needs (`TRANSITION_SQL.snapshot`). */
export interface SnapshotRow {
  d_name: string | null;
  d_state: DeploymentState | null;
  d_version: number | null;
  d_current_attempt_id: string | null;
  a_id: string | null;
  a_deployment_id: string | null;
  a_status: AttemptStatus | null;
  a_last_heartbeat_at: Date | null;
  a_started_at: Date | null;
  c_id: string | null;
  c_status: AttemptStatus | null;
  p_event_name: string | null;
  p_deployment_id: string | null;
  p_payload_sha256: string | null;
  p_outcome: string | null;
  p_reason: string | null;
  p_version: number | null;
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
   * One statement, so one consistent snapshot: the deployment, the attempt the event names, the current attempt
   * and any earlier processing of this eventId. Reading them in separate statements could see an attempt.create
   * commit in between and misclassify the event as stale. ($1 deployment, $2 attempt or null, $3 eventId)
   */
  snapshot: sql<SnapshotRow>(
    `SELECT d.name AS d_name, d.state AS d_state, d.version AS d_version, d.current_attempt_id AS d_current_attempt_id,
            a.id AS a_id, a.deployment_id AS a_deployment_id, a.status AS a_status,
            a.last_heartbeat_at AS a_last_heartbeat_at, a.started_at AS a_started_at,
            c.id AS c_id, c.status AS c_status,
            p.event_name AS p_event_name, p.deployment_id AS p_deployment_id, p.payload_sha256 AS p_payload_sha256,
            p.outcome AS p_outcome, p.reason AS p_reason, p.version AS p_version
       FROM (SELECT 1) AS one
       LEFT JOIN deployments d ON d.id = $1
       LEFT JOIN attempts a ON a.id = $2
       LEFT JOIN attempts c ON c.id = d.current_attempt_id
       LEFT JOIN processed_events p ON p.event_id = $3`,
  ),
  /** a noop's claim of its eventId; affects 0 rows when another delivery of the event already claimed it */
  claimNoop: sql<never>(
    `INSERT INTO processed_events (event_id, event_name, deployment_id, outcome, reason, version, payload_sha256, processed_at)
     VALUES ($1, $2, $3, 'noop', $4, $5, $6, $7)
     ON CONFLICT (event_id) DO NOTHING`,
  ),
  /** who holds an eventId, and what its processing came to */
  claimedBy: sql<ClaimRow>(`SELECT event_name, deployment_id, payload_sha256, outcome, reason, version FROM processed_events WHERE event_id = $1`),
  /**
   * Wakes the relay: a transaction that writes nothing but the notification and does not wait for its flush
   * (see the transition service's relay wake-up for why it is never sent from the transition's own transaction).
   */
  wakeRelay: sql<never>(`SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')`),
});

/** What `transitionWrite` writes: an applied decision, and what the statement records with it. */
export interface TransitionWriteInput {
  readonly deploymentId: string;
  /** the event that caused it */
  readonly eventId: string;
  readonly eventName: string;
  /** the new deployment's name (`deployment.create` only) */
  readonly deploymentName?: string;
  readonly attemptId: string | null;
  readonly actor: string;
  /** SHA-256 of the event's canonical payload (the claim's identity) */
  readonly payloadSha256: string;
  /** the version the decision was made on; null for a new deployment (an INSERT) */
  readonly fromVersion: number | null;
  readonly decision: Extract<Decision, { kind: 'applied' }>;
  readonly now: Date;
  /** the W3C trace context of the event's `transition` span when it is traced (the entry's `traceparent`), else null */
  readonly traceparent: string | null;
}

/** The write's one row: whether the deployment row was written (1) or the version check lost (0). */
export interface TransitionWriteRow {
  written: number;
  transition_id: string | null;
}

/**
 * The write of an applied decision in ONE statement (data-modifying CTEs): the version-checked UPDATE (or the
 * INSERT of a new deployment); then, only if the deployment row was written, the eventId's claim, the attempt rows,
 * the history row and the outbox row. The claim is a plain INSERT: if another delivery of the event has claimed it
 * (committed), the statement fails on the primary key and leaves nothing; if that delivery has not committed yet,
 * this one waits for it. The claim comes after the deployment's row lock, so two writers of one deployment always
 * take their locks in the same order; the attempts it changes are locked by id after the deployment's row
 * (lock-order.ts). There is one text per shape of effects, so the set of prepared texts is small.
 */
export function transitionWrite(input: TransitionWriteInput): { statement: Statement<TransitionWriteRow>; params: unknown[] } {
  const { decision, fromVersion } = input;
  const { effects } = decision;
  const params: unknown[] = [];
  const param = (value: unknown, type: string): string => {
    params.push(value);
    return `$${params.length}::${type}`;
  };
  const id = param(input.deploymentId, 'uuid');
  const at = param(input.now, 'timestamptz');
  const newVersion = param((fromVersion ?? 0) + 1, 'integer');
  const reason = param(decision.reason, 'varchar');
  const eventId = param(input.eventId, 'varchar');
  const to = param(decision.to, 'varchar');
  const actor = param(input.actor, 'varchar');

  const ctes: string[] = [];
  if (fromVersion === null) {
    if (input.deploymentName === undefined) throw new Error(`only deployment.create may insert (${input.eventName})`);
    ctes.push(`dep AS (
       INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, state_changed_at, created_at, updated_at)
       SELECT ${id}, ${param(input.deploymentName, 'varchar')}, ${to}, 1, ${param(effects.endpoint?.url ?? null, 'text')},
              ${param(effects.endpoint?.kind ?? null, 'varchar')}, ${at}, ${at}, ${at}
       ON CONFLICT (id) DO NOTHING
       RETURNING id
     )`);
  } else {
    ctes.push(`dep AS (
       UPDATE deployments SET
         state = ${to}, version = version + 1, state_changed_at = ${at}, updated_at = ${at},
         current_attempt_id = CASE WHEN ${param(effects.currentAttemptId !== undefined, 'boolean')}
                                   THEN ${param(effects.currentAttemptId ?? null, 'uuid')} ELSE current_attempt_id END,
         endpoint_url = CASE WHEN ${param(effects.endpoint !== undefined, 'boolean')}
                             THEN ${param(effects.endpoint?.url ?? null, 'text')} ELSE endpoint_url END,
         endpoint_kind = CASE WHEN ${param(effects.endpoint !== undefined, 'boolean')}
                              THEN ${param(effects.endpoint?.kind ?? null, 'varchar')} ELSE endpoint_kind END,
         last_ready_at = CASE WHEN ${param(effects.lastReadyAt !== undefined, 'boolean')}
                              THEN ${param(effects.lastReadyAt ?? null, 'timestamptz')} ELSE last_ready_at END
       WHERE id = ${id} AND version = ${param(fromVersion, 'integer')}
       RETURNING id
     )`);
  }
  ctes.push(`claim AS (
       INSERT INTO processed_events (event_id, event_name, deployment_id, outcome, reason, version, payload_sha256, processed_at)
       SELECT ${eventId}, ${param(input.eventName, 'varchar')}, dep.id, 'applied', ${reason}, ${newVersion},
              ${param(input.payloadSha256, 'char(64)')}, ${at} FROM dep
       RETURNING 1
     )`);
  if (effects.createAttempt !== undefined) {
    // Numbering cannot race: every attempt insert comes with a version-checked write of the deployment row, so
    // when this one's check passes, no attempt was added since the statement's snapshot.
    ctes.push(`new_attempt AS (
       INSERT INTO attempts (id, deployment_id, number, status, created_at)
       SELECT ${param(effects.createAttempt.attemptId, 'uuid')}, dep.id,
              (SELECT COALESCE(max(number), 0) + 1 FROM attempts WHERE deployment_id = ${id}), 'pending', ${at}
         FROM dep
     )`);
  }
  if (effects.attempts.length > 0) {
    const changes = effects.attempts;
    const changed = param(changes.map((c) => c.attemptId), 'uuid[]');
    ctes.push(`locked_attempts AS ${lockedInIdOrder('attempts', changed, 'EXISTS (SELECT 1 FROM dep)')}`);
    ctes.push(`changed_attempts AS (
       UPDATE attempts AS a SET status = v.status, reason = COALESCE(v.reason, a.reason),
              started_at = COALESCE(v.started_at, a.started_at), ended_at = COALESCE(v.ended_at, a.ended_at)
         FROM locked_attempts JOIN unnest(${changed}, ${param(changes.map((c) => c.status), 'varchar[]')},
                     ${param(changes.map((c) => c.reason ?? null), 'text[]')},
                     ${param(changes.map((c) => c.startedAt ?? null), 'timestamptz[]')},
                     ${param(changes.map((c) => c.endedAt ?? null), 'timestamptz[]')})
              AS v(id, status, reason, started_at, ended_at) ON v.id = locked_attempts.id
        WHERE a.id = locked_attempts.id
     )`);
  }
  const attempt = param(input.attemptId, 'uuid');
  const from = param(decision.from, 'varchar');
  const traceparent = param(input.traceparent, 'text');
  ctes.push(
    `t AS (
       INSERT INTO state_transitions (deployment_id, attempt_id, from_state, to_state, version, reason, event_id, actor, created_at)
       SELECT dep.id, ${attempt}, ${from}, ${to}, ${newVersion}, ${reason}, ${eventId}, ${actor}, ${at} FROM dep
       RETURNING id
     )`,
    `o AS (
       INSERT INTO outbox (deployment_id, version, fields, created_at)
       SELECT ${id}, ${newVersion}, jsonb_build_object(
           'type', 'state_transition', 'transitionId', t.id::text, 'deploymentId', ${id}::text,
           'attemptId', COALESCE(${attempt}::text, ''), 'from', COALESCE(${from}::text, ''), 'to', ${to}::text,
           'version', ${newVersion}::text, 'reason', ${reason}::text, 'eventId', ${eventId}::text,
           'at', ${param(input.now.toISOString(), 'text')}, 'actor', ${actor}::text)
           || CASE WHEN ${traceparent} IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('traceparent', ${traceparent}) END,
         ${at}
       FROM t
     )`,
  );
  const statement = sql<TransitionWriteRow>(
    `WITH ${ctes.join(',\n')}
     SELECT (SELECT count(*) FROM dep)::int AS written, (SELECT id FROM t)::text AS transition_id`,
  );
  return { statement, params };
}

/** The error is the claim's primary key: another delivery of the event has claimed its eventId. */
export function isClaimConflict(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false;
  const e = err as { code?: unknown; constraint?: unknown; driverError?: { code?: unknown; constraint?: unknown } };
  const code = e.code ?? e.driverError?.code;
  const constraint = e.constraint ?? e.driverError?.constraint;
  return code === '23505' && constraint === 'processed_events_pkey';
}
