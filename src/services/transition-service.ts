/**
 * The transition service: load a consistent snapshot, let the pure machine decide, and write the decision
 * atomically (docs/architecture.md, "Optimistic locking, idempotency, the outbox") in ONE statement:
 *
 *   version-checked UPDATE of the deployment -> processed_events row (the eventId's claim) -> attempt rows ->
 *   state_transitions row -> outbox row
 *
 * A statement is atomic on its own, so the optimistic first try is two round trips: the snapshot read and the
 * write, no transaction around them (bench/ found PostgreSQL's and the worker's CPU per transition to go mostly
 * to per-statement overhead). Zero rows from the version check means a concurrent writer won, and nothing was
 * written: reload, decide again, now holding the deployment's row lock in a transaction, with bounded retries and
 * jitter. An eventId already claimed by another delivery makes the whole statement fail on the claim's primary
 * key, so nothing of it stays, and the event is a duplicate. Noops record the eventId and write nothing else;
 * rejections write nothing at all. After an applied write, the outbox relay is woken with a NOTIFY of its own
 * (see `wakeRelay`).
 */
import type { PoolClient } from 'pg';
import type { DataSource, QueryRunner } from 'typeorm';
import { ConflictError, NotYetError, ValidationError } from '../errors';
import { assertEndpointAllowed, type EndpointAllowList } from '../events/endpoint-allow';
import { DEFAULT_ACTOR, parseEvent, payloadDigest, type LifecycleEvent } from '../events/schemas';
import { decide, TIME_DEPENDENT_NOOPS } from '../machine';
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
import { sleep } from '../util';

/** The NOTIFY channel that wakes the outbox relay after a transaction wrote outbox rows (see `wakeRelay`). */
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
  /**
   * right after the write (deployment, claim, attempts, history, outbox: one statement), before the commit;
   * throwing must roll everything back. With this hook set, every try runs in a transaction (so that there is a
   * commit to come after the hook); without it, the optimistic try's write is a transaction of its own.
   */
  readonly afterUpdate?: (event: LifecycleEvent) => void | Promise<void>;
}

/** Outcomes of heartbeat and readiness stamps, which change no state. */
export type StampNoopReason = 'stamped' | 'not_running' | 'not_ready' | 'not_found';

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
  /**
   * The outbox relay of this process, if it runs one: while it is the active relay, a commit wakes it directly
   * instead of with a NOTIFY (`wakeRelay`).
   */
  readonly relay?: { readonly isLeader: boolean; notifyCommitted(): void };
  /** FLEET_ENDPOINT_ALLOW: an endpoint outside it fails the event as invalid (default: any endpoint) */
  readonly endpointAllow?: EndpointAllowList | null;
  /**
   * FLEET_ORPHAN_AFTER_S (default 90): `attempt.orphaned` applies only while the attempt's liveness is older than
   * the time the event was produced minus this (a heartbeat since makes it a noop `alive`)
   */
  readonly orphanAfterS?: number;
  /** FLEET_PROGRESS_DEADLINE_S (default 1800): likewise for `attempt.expired`, with the attempt's start (`not_due`) */
  readonly progressDeadlineS?: number;
}

interface SnapshotRow {
  d_name: string | null;
  d_state: DeploymentState | null;
  d_version: number | null;
  d_current_attempt_id: string | null;
  a_id: string | null;
  a_deployment_id: string | null;
  a_status: AttemptStatus | null;
  a_liveness_at: Date | null;
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
  private readonly relay: TransitionServiceOptions['relay'];
  private readonly endpointAllow: EndpointAllowList | null;
  private readonly orphanAfterMs: number;
  private readonly progressDeadlineMs: number;
  /** the relay wake-up in flight, if any (see `wakeRelay`) */
  private wakeup: Promise<void> | null = null;
  private wakeAgain = false;

  constructor(options: TransitionServiceOptions) {
    this.ds = options.dataSource;
    this.now = options.now ?? (() => new Date());
    this.maxConflictRetries = options.maxConflictRetries ?? 12;
    this.log = options.logger ?? silentLogger;
    this.hooks = options.hooks ?? {};
    this.relay = options.relay;
    this.endpointAllow = options.endpointAllow ?? null;
    this.orphanAfterMs = (options.orphanAfterS ?? 90) * 1000;
    this.progressDeadlineMs = (options.progressDeadlineS ?? 1800) * 1000;
  }

  /**
   * Validates and applies one lifecycle event. Returns what happened (applied, noop, rejected); throws
   * `ValidationError` for bad input (nothing written), `NotYetError` when the deployment or attempt does not exist
   * yet, `ConflictError` when every bounded retry lost the version check, and infrastructure errors as they come.
   */
  async apply(name: string, data: unknown, options: ApplyOptions = {}): Promise<ApplyResult> {
    const event = parseEvent(name, data, options.fallbackEventId);
    // producers may write jobs to Redis without the SDK: the allow-list holds here too
    assertEndpointAllowed(event.data, this.endpointAllow);
    switch (event.name) {
      case 'attempt.heartbeat':
        return this.stampHeartbeat(event, options.producedAt);
      case 'deployment.readiness':
        return this.stampReadiness(event, options.producedAt);
      default:
        return this.transition(event, options.producedAt);
    }
  }

  private async transition(event: StateEvent, producedAt: Date | undefined): Promise<ApplyResult> {
    // when the event was declared: an orphan or expiry is judged as of then (the sweep sets the job's timestamp
    // to its tick), so that heartbeats that waited behind it in a backlog still count
    const declared = (producedAt ?? this.now()).getTime();
    const machineEvent = toMachineEvent(event, {
      deadBefore: new Date(declared - this.orphanAfterMs),
      startedBefore: new Date(declared - this.progressDeadlineMs),
    });
    for (let attempt = 1; ; attempt++) {
      // Optimistic first: read, decide, write, two statements and no transaction. Once it has lost, take the
      // deployment's row lock before reading, in a transaction, so a hot deployment cannot starve one writer: the
      // version check still guards, and now it cannot lose.
      const lock = attempt > 1;
      try {
        const result =
          lock || this.hooks.afterUpdate !== undefined
            ? await this.inTransaction((q) => this.decideAndWrite(q, event, machineEvent, lock))
            : await this.withRunner((q) => this.decideAndWrite(q, event, machineEvent, false));
        if (result.outcome === 'applied') this.wakeRelay();
        return result;
      } catch (err) {
        if (isClaimConflict(err)) {
          // another delivery of this event (or another event with its id) claimed it between our read and our
          // write; ours wrote nothing
          return await this.withRunner((q) => this.claimedElsewhere(q, event));
        }
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
    if (row.p_event_name !== null && !sameEvent(event, row.p_event_name, row.p_deployment_id, row.p_payload_sha256)) {
      return eventIdConflict(event, row.p_event_name, row.p_deployment_id);
    }
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
      attempt:
        row.a_id === null || row.a_status === null
          ? null
          : { id: row.a_id, status: row.a_status, livenessAt: row.a_liveness_at, startedAt: row.a_started_at },
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
        // a noop that only says "not yet" is no decision about the event: it stays free to apply later
        if (TIME_DEPENDENT_NOOPS.has(decision.why)) return { ...base, outcome: 'noop', reason: decision.why };
        const claimed = await this.claimEvent(q, event, 'noop', decision.why, snapshot.deployment?.version ?? null, now);
        if (!claimed) return this.claimedElsewhere(q, event);
        return { ...base, outcome: 'noop', reason: decision.why };
      }
      case 'applied':
        return this.write(q, event, attemptId, snapshot.deployment?.version ?? null, decision, now);
    }
  }

  /**
   * Writes an applied decision in ONE statement (data-modifying CTEs): the version-checked UPDATE (or the INSERT
   * of a new deployment); then, only if the deployment row was written, the eventId's claim, the attempt rows,
   * the history row and the outbox row. The claim is a plain INSERT: if another delivery of the event has claimed
   * it (committed), the statement fails on the primary key and leaves nothing; if that delivery has not committed
   * yet, this one waits for it. The claim comes after the deployment's row lock, so two writers of one deployment
   * always take their locks in the same order.
   */
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
    const params: unknown[] = [];
    const param = (value: unknown, type: string): string => {
      params.push(value);
      return `$${params.length}::${type}`;
    };
    const id = param(deploymentId, 'uuid');
    const at = param(now, 'timestamptz');
    const newVersion = param(version, 'integer');
    const reason = param(decision.reason, 'varchar');
    const eventId = param(event.eventId, 'varchar');
    const to = param(decision.to, 'varchar');
    const actor = param(event.data.actor ?? DEFAULT_ACTOR, 'varchar');

    const ctes: string[] = [];
    if (fromVersion === null) {
      if (event.name !== 'deployment.create') throw new Error(`only deployment.create may insert (${event.name})`);
      ctes.push(`dep AS (
         INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, state_changed_at, created_at, updated_at)
         SELECT ${id}, ${param(event.data.name, 'varchar')}, ${to}, 1, ${param(effects.endpoint?.url ?? null, 'text')},
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
         SELECT ${eventId}, ${param(event.name, 'varchar')}, dep.id, 'applied', ${reason}, ${newVersion},
                ${param(payloadDigest(event.data), 'char(64)')}, ${at} FROM dep
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
      ctes.push(`changed_attempts AS (
         UPDATE attempts AS a SET status = v.status, reason = COALESCE(v.reason, a.reason),
                started_at = COALESCE(v.started_at, a.started_at), ended_at = COALESCE(v.ended_at, a.ended_at)
           FROM unnest(${param(changes.map((c) => c.attemptId), 'uuid[]')}, ${param(changes.map((c) => c.status), 'varchar[]')},
                       ${param(changes.map((c) => c.reason ?? null), 'text[]')},
                       ${param(changes.map((c) => c.startedAt ?? null), 'timestamptz[]')},
                       ${param(changes.map((c) => c.endedAt ?? null), 'timestamptz[]')})
                AS v(id, status, reason, started_at, ended_at)
          WHERE a.id = v.id AND EXISTS (SELECT 1 FROM dep)
       )`);
    }
    const attempt = param(attemptId, 'uuid');
    const from = param(decision.from, 'varchar');
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
             'at', ${param(now.toISOString(), 'text')}, 'actor', ${actor}::text),
           ${at}
         FROM t
       )`,
    );

    await this.hooks.beforeUpdate?.(event);
    const result = await run<{ written: number; transition_id: string | null }>(
      q,
      `WITH ${ctes.join(',\n')}
       SELECT (SELECT count(*) FROM dep)::int AS written, (SELECT id FROM t)::text AS transition_id`,
      params,
    );
    const row = result.rows[0];
    if (row === undefined) throw new Error('transition write returned no row');
    if (row.written !== 1) throw new VersionCheckLost(); // and nothing was written: everything hangs on `dep`
    await this.hooks.afterUpdate?.(event);
    const transitionId = row.transition_id;
    if (transitionId === null) throw new Error('state_transitions insert returned no id');

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

  /** The eventId was claimed by a delivery that committed first: a duplicate, or a different event's id. */
  private async claimedElsewhere(q: QueryRunner, event: LifecycleEvent): Promise<ApplyResult> {
    const { rows } = await run<{ event_name: string; deployment_id: string; payload_sha256: string | null }>(
      q,
      `SELECT event_name, deployment_id, payload_sha256 FROM processed_events WHERE event_id = $1`,
      [event.eventId],
    );
    const held = rows[0];
    if (held !== undefined && !sameEvent(event, held.event_name, held.deployment_id, held.payload_sha256)) {
      return eventIdConflict(event, held.event_name, held.deployment_id);
    }
    return { eventId: event.eventId, deploymentId: event.data.deploymentId, outcome: 'noop', reason: 'duplicate_event' };
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
      `INSERT INTO processed_events (event_id, event_name, deployment_id, outcome, reason, version, payload_sha256, processed_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
       ON CONFLICT (event_id) DO NOTHING`,
      [event.eventId, event.name, event.data.deploymentId, outcome, reason, version, payloadDigest(event.data), now],
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
              COALESCE(a.last_heartbeat_at, a.started_at) AS a_liveness_at, a.started_at AS a_started_at,
              c.id AS c_id, c.status AS c_status,
              p.event_name AS p_event_name, p.deployment_id AS p_deployment_id, p.payload_sha256 AS p_payload_sha256, p.outcome AS p_outcome, p.reason AS p_reason, p.version AS p_version
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

  /**
   * Runs `fn` in a READ COMMITTED transaction on a connection of its own. The isolation level is set by the BEGIN
   * itself (one round trip; TypeORM's startTransaction(level) spends two), and is explicit so that a server whose
   * default_transaction_isolation differs does not change how the version check behaves.
   */
  private async inTransaction<T>(fn: (q: QueryRunner) => Promise<T>): Promise<T> {
    const q = this.ds.createQueryRunner();
    await q.connect();
    try {
      await q.query('BEGIN ISOLATION LEVEL READ COMMITTED');
      try {
        const result = await fn(q);
        await q.query('COMMIT');
        return result;
      } catch (err) {
        await q.query('ROLLBACK').catch(() => undefined);
        throw err;
      }
    } finally {
      await q.release();
    }
  }

  /**
   * Wakes the outbox relay after a commit that wrote an outbox row, with a NOTIFY of its own, never from inside
   * the transition's transaction: PostgreSQL serializes the commits of all transactions that NOTIFY on one
   * database-wide lock held across the commit's WAL flush, so a NOTIFY in every transition capped the whole fleet
   * at one transition per fsync (measured in bench/, scenario 1). This NOTIFY's transaction writes nothing but the
   * notification and does not wait for its flush (`synchronous_commit = off`): a lost wake-up costs at most the
   * relay's polling interval, never a transition. Wake-ups are coalesced: at most one in flight per service, and
   * one more after it when commits happened meanwhile. Errors are only logged (the relay polls as a fallback).
   * When the active relay runs in this process, it is woken directly, without a round trip.
   */
  private wakeRelay(): void {
    if (this.relay?.isLeader === true) {
      this.relay.notifyCommitted();
      return;
    }
    if (this.wakeup !== null) {
      this.wakeAgain = true;
      return;
    }
    this.wakeup = this.sendWakeups();
  }

  private async sendWakeups(): Promise<void> {
    try {
      do {
        this.wakeAgain = false;
        await this.ds.query(`SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')`, [OUTBOX_CHANNEL]);
      } while (this.wakeAgain);
    } catch (err) {
      this.log.debug({ err }, 'could not wake the outbox relay; it will find the rows when it polls');
    } finally {
      this.wakeup = null;
    }
  }

}

/** A processed row is this event when name, deployment and payload agree (rows from before the digest: name and
 * deployment). */
function sameEvent(event: LifecycleEvent, name: string, deploymentId: string | null, digest: string | null): boolean {
  return name === event.name && deploymentId === event.data.deploymentId && (digest === null || digest === payloadDigest(event.data));
}

/**
 * The eventId was processed before as another event: another name, another deployment, or another payload. Not a
 * duplicate (that would drop this event silently): refused, so the producer learns to send it with an id of its own.
 */
function eventIdConflict(event: LifecycleEvent, claimedBy: string, claimedFor: string | null): ApplyResult {
  const other =
    claimedBy !== event.name
      ? `a ${claimedBy} event`
      : claimedFor !== event.data.deploymentId
        ? `a ${claimedBy} event of deployment ${claimedFor ?? '?'}`
        : `a ${claimedBy} event with another payload`;
  return {
    outcome: 'rejected',
    eventId: event.eventId,
    deploymentId: event.data.deploymentId,
    code: 'event_id_conflict',
    message: `eventId "${event.eventId}" was already used by ${other}; send this event with an eventId of its own`,
  };
}

function toMachineEvent(event: StateEvent, cutoffs: { deadBefore: Date; startedBefore: Date }): MachineEvent {
  switch (event.name) {
    case 'deployment.create':
      return { type: event.name, name: event.data.name, endpoint: event.data.endpoint };
    case 'attempt.create':
    case 'attempt.start':
      return { type: event.name, attemptId: event.data.attemptId };
    case 'attempt.orphaned':
      return { type: event.name, attemptId: event.data.attemptId, deadBefore: cutoffs.deadBefore };
    case 'attempt.expired':
      return { type: event.name, attemptId: event.data.attemptId, startedBefore: cutoffs.startedBefore };
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

/** The write failed on the processed_events primary key: another delivery of the event has claimed it. */
function isClaimConflict(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false;
  const e = err as { code?: unknown; constraint?: unknown; driverError?: { code?: unknown; constraint?: unknown } };
  const code = e.code ?? e.driverError?.code;
  const constraint = e.constraint ?? e.driverError?.constraint;
  return code === '23505' && constraint === 'processed_events_pkey';
}

/**
 * Prepared-statement names by SQL text. The service's statements are a handful of fixed texts (the write has one
 * text per shape of effects), so the map stays small; each is parsed and planned once per connection instead of
 * on every call, which bench/ measured to be about 40% of PostgreSQL's CPU per transition.
 */
const statementNames = new Map<string, string>();

/**
 * Runs SQL as a named prepared statement on the query runner's connection and returns rows and the affected
 * count, whatever the statement. (TypeORM's `query` has no prepared statements; the runner's connection is the
 * pool's pg client.)
 */
async function run<T = unknown>(q: QueryRunner, sql: string, params: unknown[]): Promise<{ rows: T[]; affected: number }> {
  const client = (await q.connect()) as PoolClient;
  let name = statementNames.get(sql);
  if (name === undefined) {
    name = `lifecycle_fleet_${statementNames.size + 1}`;
    statementNames.set(sql, name);
  }
  const result = await client.query({ name, text: sql, values: params });
  return { rows: result.rows as T[], affected: result.rowCount ?? 0 };
}
