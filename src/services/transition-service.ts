/**
 * The transition service: load a consistent snapshot, let the pure machine decide, and write the decision in ONE
 * transaction (DESIGN.md, "Optimistic locking, idempotency, the outbox"):
 *
 *   processed_events row (the eventId's claim) -> version-checked UPDATE of the deployment -> attempt rows ->
 *   state_transitions row -> outbox row
 *
 * Zero rows from the version check means a concurrent writer won: roll back, reload, decide again, with bounded
 * retries and jitter. Noops record the eventId and write nothing else; rejections write nothing at all.
 */
import type { DataSource, QueryRunner } from 'typeorm';
import { ConflictError, NotYetError, ValidationError } from '../errors';
import { parseEvent, type LifecycleEvent } from '../events/schemas';
import { decide } from '../machine';
import type {
  AttemptStatus,
  Decision,
  DeploymentState,
  MachineEvent,
  NoopReason,
  RejectionCode,
  Snapshot,
} from '../machine';
import { silentLogger, type Logger } from '../log';

/** The NOTIFY channel that wakes the outbox relay when a transaction wrote outbox rows (delivered on commit). */
export const OUTBOX_CHANNEL = 'lifecycle_fleet_outbox';

export type ApplyResult =
  | {
      readonly outcome: 'applied';
      readonly eventId: string;
      readonly deploymentId: string;
      readonly attemptId: string | null;
      readonly from: DeploymentState | null;
      readonly to: DeploymentState;
      readonly version: number;
      readonly reason: string;
      readonly transitionId: string;
    }
  | {
      readonly outcome: 'noop';
      readonly eventId: string;
      readonly deploymentId: string;
      readonly reason: NoopReason | StampNoopReason | 'duplicate_event';
      /** for `duplicate_event`: what the first delivery of this eventId did */
      readonly previous?: { readonly outcome: string; readonly reason: string; readonly version: number | null };
    }
  | {
      readonly outcome: 'rejected';
      readonly eventId: string;
      readonly deploymentId: string;
      readonly code: RejectionCode;
      readonly message: string;
    };

export interface TransitionHooks {
  /** after the snapshot was read and decided, before the version-checked write */
  readonly beforeUpdate?: (event: LifecycleEvent) => void | Promise<void>;
  /** right after the version-checked write, before anything else; throwing must roll everything back */
  readonly afterUpdate?: (event: LifecycleEvent) => void | Promise<void>;
}

/** Outcomes of heartbeat and readiness stamps, which change no state. */
export type StampNoopReason = 'stamped' | 'not_running' | 'not_ready';

export interface ApplyOptions {
  /** used as the eventId when the payload carries none (the BullMQ jobId) */
  readonly fallbackEventId?: string;
  /** when the event was produced (the job's timestamp): the time a heartbeat or readiness stamp records */
  readonly producedAt?: Date;
}

export interface TransitionServiceOptions {
  readonly dataSource: DataSource;
  /** the clock; default `() => new Date()` */
  readonly now?: () => Date;
  /** version-check losses retried in-process before giving up with `ConflictError` (default 12) */
  readonly maxConflictRetries?: number;
  readonly logger?: Logger;
  /** Test hooks, called inside the transaction around the deployment's version-checked write. */
  readonly hooks?: TransitionHooks;
}

interface SnapshotRow {
  d_name: string | null;
  d_state: DeploymentState | null;
  d_version: number | null;
  d_current_attempt_id: string | null;
  a_id: string | null;
  a_deployment_id: string | null;
  a_status: AttemptStatus | null;
  c_id: string | null;
  c_status: AttemptStatus | null;
  p_outcome: string | null;
  p_reason: string | null;
  p_version: number | null;
}

/** Events that the machine decides on (everything but the stamps). */
type StateEvent = Exclude<LifecycleEvent, { name: 'attempt.heartbeat' | 'deployment.readiness' }>;

/** Signals a lost version check inside the transaction; caught by the retry loop. */
class VersionCheckLost extends Error {}

export class TransitionService {
  private readonly ds: DataSource;
  private readonly now: () => Date;
  private readonly maxConflictRetries: number;
  private readonly log: Logger;
  private readonly hooks: TransitionHooks;

  constructor(options: TransitionServiceOptions) {
    this.ds = options.dataSource;
    this.now = options.now ?? (() => new Date());
    this.maxConflictRetries = options.maxConflictRetries ?? 12;
    this.log = options.logger ?? silentLogger;
    this.hooks = options.hooks ?? {};
  }

  /**
   * Validates and applies one lifecycle event. Returns what happened (applied, noop, rejected); throws
   * `ValidationError` for bad input (nothing written), `NotYetError` when the deployment or attempt does not exist
   * yet, `ConflictError` when every bounded retry lost the version check, and infrastructure errors as they come.
   */
  async apply(name: string, data: unknown, options: ApplyOptions = {}): Promise<ApplyResult> {
    const event = parseEvent(name, data, options.fallbackEventId);
    switch (event.name) {
      case 'attempt.heartbeat':
        return this.stampHeartbeat(event, options.producedAt);
      case 'deployment.readiness':
        return this.stampReadiness(event, options.producedAt);
      default:
        return this.transition(event);
    }
  }

  private async transition(event: StateEvent): Promise<ApplyResult> {
    const machineEvent = toMachineEvent(event);
    for (let attempt = 1; ; attempt++) {
      // Optimistic first. Once it has lost, take the deployment's row lock before reading, so a hot deployment
      // cannot starve one writer: the version check still guards, and now it cannot lose.
      const lock = attempt > 1;
      try {
        return await this.inTransaction((q) => this.decideAndWrite(q, event, machineEvent, lock));
      } catch (err) {
        if (!(err instanceof VersionCheckLost)) throw err;
        if (attempt >= this.maxConflictRetries) {
          throw new ConflictError(event.data.deploymentId, attempt);
        }
        this.log.debug({ deploymentId: event.data.deploymentId, eventId: event.eventId, attempt }, 'version conflict, retrying');
        await sleep(Math.random() * Math.min(50, 2 ** attempt));
      }
    }
  }

  private async decideAndWrite(
    q: QueryRunner,
    event: LifecycleEvent,
    machineEvent: MachineEvent,
    lock: boolean,
  ): Promise<ApplyResult> {
    const { deploymentId } = event.data;
    const attemptId = 'attemptId' in event.data ? event.data.attemptId : null;
    const base = { eventId: event.eventId, deploymentId };

    if (lock) await run(q, `SELECT 1 FROM deployments WHERE id = $1 FOR UPDATE`, [deploymentId]);
    const row = await this.readSnapshot(q, deploymentId, attemptId, event.eventId);
    if (row.p_outcome !== null) {
      return {
        ...base,
        outcome: 'noop',
        reason: 'duplicate_event',
        previous: { outcome: row.p_outcome, reason: row.p_reason ?? '', version: row.p_version },
      };
    }
    if (row.a_id !== null && row.a_deployment_id !== deploymentId) {
      return {
        ...base,
        outcome: 'rejected',
        code: 'id_conflict',
        message: `attempt ${row.a_id} belongs to another deployment`,
      };
    }

    const snapshot: Snapshot = {
      deployment:
        row.d_state === null || row.d_name === null || row.d_version === null
          ? null
          : { name: row.d_name, state: row.d_state, version: row.d_version, currentAttemptId: row.d_current_attempt_id },
      attempt: row.a_id === null || row.a_status === null ? null : { id: row.a_id, status: row.a_status },
      currentAttempt: row.c_id === null || row.c_status === null ? null : { id: row.c_id, status: row.c_status },
    };
    const now = this.now();
    const decision = decide(snapshot, machineEvent, now);

    switch (decision.kind) {
      case 'deferred':
        throw new NotYetError(decision.why, deploymentId, attemptId ?? undefined);
      case 'rejected':
        return { ...base, outcome: 'rejected', code: decision.code, message: decision.message };
      case 'noop': {
        const claimed = await this.claimEvent(q, event, 'noop', decision.why, snapshot.deployment?.version ?? null, now);
        if (!claimed) return { ...base, outcome: 'noop', reason: 'duplicate_event' };
        return { ...base, outcome: 'noop', reason: decision.why };
      }
      case 'applied':
        return this.write(q, event, attemptId, snapshot.deployment?.version ?? null, decision, now);
    }
  }

  private async write(
    q: QueryRunner,
    event: LifecycleEvent,
    attemptId: string | null,
    fromVersion: number | null,
    decision: Extract<Decision, { kind: 'applied' }>,
    now: Date,
  ): Promise<ApplyResult> {
    const { deploymentId } = event.data;
    const version = (fromVersion ?? 0) + 1;
    const { effects } = decision;

    // Claim the eventId first: a concurrent delivery of the same event waits here, then sees the claim.
    if (!(await this.claimEvent(q, event, 'applied', decision.reason, version, now))) {
      return { eventId: event.eventId, deploymentId, outcome: 'noop', reason: 'duplicate_event' };
    }

    await this.hooks.beforeUpdate?.(event);
    if (fromVersion === null) {
      if (event.name !== 'deployment.create') throw new Error(`only deployment.create may insert (${event.name})`);
      const inserted = await run(
        q,
        `INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, state_changed_at, created_at, updated_at)
         VALUES ($1, $2, $3, 1, $4, $5, $6, $6, $6)
         ON CONFLICT (id) DO NOTHING`,
        [deploymentId, event.data.name, decision.to, effects.endpoint?.url ?? null, effects.endpoint?.kind ?? null, now],
      );
      if (inserted.affected !== 1) throw new VersionCheckLost();
    } else {
      const updated = await run(
        q,
        `UPDATE deployments SET
           state = $3, version = version + 1, state_changed_at = $4, updated_at = $4,
           current_attempt_id = CASE WHEN $5::boolean THEN $6::uuid ELSE current_attempt_id END,
           endpoint_url = CASE WHEN $7::boolean THEN $8::text ELSE endpoint_url END,
           endpoint_kind = CASE WHEN $7::boolean THEN $9::varchar ELSE endpoint_kind END,
           last_ready_at = CASE WHEN $10::boolean THEN $11::timestamptz ELSE last_ready_at END
         WHERE id = $1 AND version = $2`,
        [
          deploymentId,
          fromVersion,
          decision.to,
          now,
          effects.currentAttemptId !== undefined,
          effects.currentAttemptId ?? null,
          effects.endpoint !== undefined,
          effects.endpoint?.url ?? null,
          effects.endpoint?.kind ?? null,
          effects.lastReadyAt !== undefined,
          effects.lastReadyAt ?? null,
        ],
      );
      if (updated.affected !== 1) throw new VersionCheckLost();
    }
    await this.hooks.afterUpdate?.(event);

    if (effects.createAttempt !== undefined) {
      // The UPDATE above holds the deployment's row lock, so numbering cannot race.
      await run(
        q,
        `INSERT INTO attempts (id, deployment_id, number, status, created_at)
         VALUES ($1, $2, (SELECT COALESCE(max(number), 0) + 1 FROM attempts WHERE deployment_id = $2), 'pending', $3)`,
        [effects.createAttempt.attemptId, deploymentId, now],
      );
    }
    for (const change of effects.attempts) {
      await run(
        q,
        `UPDATE attempts SET status = $2, reason = COALESCE($3, reason),
           started_at = COALESCE($4, started_at), ended_at = COALESCE($5, ended_at)
         WHERE id = $1`,
        [change.attemptId, change.status, change.reason ?? null, change.startedAt ?? null, change.endedAt ?? null],
      );
    }

    const at = now.toISOString();
    const inserted = await run<{ id: string }>(
      q,
      `WITH t AS (
         INSERT INTO state_transitions (deployment_id, attempt_id, from_state, to_state, version, reason, event_id, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         RETURNING id
       )
       INSERT INTO outbox (deployment_id, version, fields, created_at)
       SELECT $1, $5, jsonb_build_object(
           'type', 'state_transition', 'transitionId', t.id::text, 'deploymentId', $1::text,
           'attemptId', COALESCE($2::text, ''), 'from', COALESCE($3::text, ''), 'to', $4::text,
           'version', $5::text, 'reason', $6::text, 'eventId', $7::text, 'at', $9::text),
         $8
       FROM t
       RETURNING (SELECT id FROM t) AS id, pg_notify('${OUTBOX_CHANNEL}', '') AS notified`,
      [deploymentId, attemptId, decision.from, decision.to, version, decision.reason, event.eventId, now, at],
    );
    const transitionId = inserted.rows[0]?.id;
    if (transitionId === undefined) throw new Error('state_transitions insert returned no id');

    return {
      outcome: 'applied',
      eventId: event.eventId,
      deploymentId,
      attemptId,
      from: decision.from,
      to: decision.to,
      version,
      reason: decision.reason,
      transitionId,
    };
  }

  /** Inserts the eventId's processed row; false when another delivery of the same event already committed one. */
  private async claimEvent(
    q: QueryRunner,
    event: LifecycleEvent,
    outcome: 'applied' | 'noop',
    reason: string,
    version: number | null,
    now: Date,
  ): Promise<boolean> {
    const result = await run(
      q,
      `INSERT INTO processed_events (event_id, event_name, deployment_id, outcome, reason, version, processed_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7)
       ON CONFLICT (event_id) DO NOTHING`,
      [event.eventId, event.name, event.data.deploymentId, outcome, reason, version, now],
    );
    return result.affected === 1;
  }

  /**
   * One statement, so one consistent snapshot: the deployment, the attempt the event names, the current attempt
   * and any earlier processing of this eventId. Reading them in separate statements could see an attempt.create
   * commit in between and misclassify the event as stale.
   */
  private async readSnapshot(
    q: QueryRunner,
    deploymentId: string,
    attemptId: string | null,
    eventId: string,
  ): Promise<SnapshotRow> {
    const result = await run<SnapshotRow>(
      q,
      `SELECT d.name AS d_name, d.state AS d_state, d.version AS d_version, d.current_attempt_id AS d_current_attempt_id,
              a.id AS a_id, a.deployment_id AS a_deployment_id, a.status AS a_status,
              c.id AS c_id, c.status AS c_status,
              p.outcome AS p_outcome, p.reason AS p_reason, p.version AS p_version
         FROM (SELECT 1) AS one
         LEFT JOIN deployments d ON d.id = $1
         LEFT JOIN attempts a ON a.id = $2
         LEFT JOIN attempts c ON c.id = d.current_attempt_id
         LEFT JOIN processed_events p ON p.event_id = $3`,
      [deploymentId, attemptId, eventId],
    );
    const row = result.rows[0];
    if (row === undefined) throw new Error('snapshot query returned no row');
    return row;
  }

  private async stampHeartbeat(
    event: Extract<LifecycleEvent, { name: 'attempt.heartbeat' }>,
    producedAt: Date | undefined,
  ): Promise<ApplyResult> {
    const { deploymentId, attemptId } = event.data;
    const at = this.observedAt(producedAt);
    // GREATEST: a redelivered or late heartbeat never moves the stamp backwards, so no processed row is needed.
    const result = await this.withRunner((q) => run(
      q,
      `UPDATE attempts SET last_heartbeat_at = GREATEST(last_heartbeat_at, $3)
        WHERE id = $1 AND deployment_id = $2 AND status = 'running'
        RETURNING id`,
      [attemptId, deploymentId, at],
    ));
    const base = { eventId: event.eventId, deploymentId, outcome: 'noop' } as const;
    if (result.affected === 1) return { ...base, reason: 'stamped' };
    await this.requireExists(deploymentId, attemptId);
    return { ...base, reason: 'not_running' };
  }

  private async stampReadiness(
    event: Extract<LifecycleEvent, { name: 'deployment.readiness' }>,
    producedAt: Date | undefined,
  ): Promise<ApplyResult> {
    const { deploymentId } = event.data;
    const observed = event.data.observedAt === undefined ? producedAt : new Date(event.data.observedAt);
    const at = this.observedAt(observed);
    const result = await this.withRunner((q) => run(
      q,
      `UPDATE deployments SET last_ready_at = GREATEST(last_ready_at, $2) WHERE id = $1 AND state = 'ready'`,
      [deploymentId, at],
    ));
    const base = { eventId: event.eventId, deploymentId, outcome: 'noop' } as const;
    if (result.affected === 1) return { ...base, reason: 'stamped' };
    await this.requireExists(deploymentId, null);
    return { ...base, reason: 'not_ready' };
  }

  /** An observation's time: when it was produced, but never in the future of our clock. */
  private observedAt(producedAt: Date | undefined): Date {
    const now = this.now();
    return producedAt === undefined || producedAt.getTime() > now.getTime() ? now : producedAt;
  }

  private async requireExists(deploymentId: string, attemptId: string | null): Promise<void> {
    const result = await this.withRunner((q) => run<{ d: string | null; a: string | null }>(
      q,
      `SELECT (SELECT id FROM deployments WHERE id = $1) AS d,
              (SELECT id FROM attempts WHERE id = $2 AND deployment_id = $1) AS a`,
      [deploymentId, attemptId],
    ));
    const row = result.rows[0];
    if (row?.d == null) throw new NotYetError('deployment_not_found', deploymentId);
    if (attemptId !== null && row.a == null) throw new NotYetError('attempt_not_found', deploymentId, attemptId);
  }

  private async withRunner<T>(fn: (q: QueryRunner) => Promise<T>): Promise<T> {
    const q = this.ds.createQueryRunner();
    try {
      return await fn(q);
    } finally {
      await q.release();
    }
  }

  private async inTransaction<T>(fn: (q: QueryRunner) => Promise<T>): Promise<T> {
    const q = this.ds.createQueryRunner();
    await q.connect();
    try {
      await q.startTransaction('READ COMMITTED');
      try {
        const result = await fn(q);
        await q.commitTransaction();
        return result;
      } catch (err) {
        if (q.isTransactionActive) await q.rollbackTransaction().catch(() => undefined);
        throw err;
      }
    } finally {
      await q.release();
    }
  }
}

function toMachineEvent(event: StateEvent): MachineEvent {
  switch (event.name) {
    case 'deployment.create':
      return { type: event.name, name: event.data.name, endpoint: event.data.endpoint };
    case 'attempt.create':
    case 'attempt.start':
    case 'attempt.orphaned':
    case 'attempt.expired':
      return { type: event.name, attemptId: event.data.attemptId };
    case 'attempt.end':
      return {
        type: event.name,
        attemptId: event.data.attemptId,
        outcome: event.data.outcome,
        reason: event.data.reason,
        endpoint: event.data.endpoint,
      };
    case 'attempt.cancel':
      return { type: event.name, attemptId: event.data.attemptId, reason: event.data.reason };
    case 'deployment.teardown':
      return { type: event.name, force: event.data.force };
    case 'deployment.resolve':
      return { type: event.name, outcome: event.data.outcome, reason: event.data.reason };
    default: {
      const never: never = event;
      throw new ValidationError('unknown_event', [{ field: 'name', rule: `unhandled event ${JSON.stringify(never)}` }]);
    }
  }
}

/** Runs SQL and returns rows and the affected count, whatever the statement (TypeORM's structured result). */
async function run<T = unknown>(q: QueryRunner, sql: string, params: unknown[]): Promise<{ rows: T[]; affected: number }> {
  const result = await q.query(sql, params, true);
  return { rows: result.records as T[], affected: result.affected ?? 0 };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
