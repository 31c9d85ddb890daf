/**
 * The vocabulary of the deployment lifecycle: states, events and decisions.
 * Pure types; nothing here performs I/O or reads a clock.
 */

export const DEPLOYMENT_STATES = ['pending', 'deploying', 'ready', 'failed', 'unknown'] as const;
export type DeploymentState = (typeof DEPLOYMENT_STATES)[number];

export const ATTEMPT_STATUSES = ['pending', 'running', 'succeeded', 'failed', 'cancelled', 'abandoned', 'superseded'] as const;
export type AttemptStatus = (typeof ATTEMPT_STATUSES)[number];

export const ENDPOINT_KINDS = ['node_port', 'cluster_dns'] as const;
export type EndpointKind = (typeof ENDPOINT_KINDS)[number];

export interface Endpoint {
  readonly url: string;
  readonly kind: EndpointKind;
}

/** Events that the machine decides on. Heartbeat and readiness stamps change no state and are not here. */
export type MachineEvent =
  | { readonly type: 'deployment.create'; readonly name: string; readonly endpoint?: Endpoint | undefined }
  | { readonly type: 'attempt.create'; readonly attemptId: string }
  | { readonly type: 'attempt.start'; readonly attemptId: string }
  | {
      readonly type: 'attempt.end';
      readonly attemptId: string;
      readonly outcome: 'succeeded' | 'failed';
      readonly reason?: string | undefined;
      readonly endpoint?: Endpoint | undefined;
    }
  | { readonly type: 'attempt.cancel'; readonly attemptId: string; readonly reason?: string | undefined }
  | {
      readonly type: 'attempt.orphaned';
      readonly attemptId: string;
      /**
       * The attempt counts as orphaned only while its liveness (last heartbeat, else start) is older than this: the
       * time the orphan was declared minus FLEET_ORPHAN_AFTER_S. A heartbeat produced after it (one that waited in a
       * backlog, say) proves the runner alive: a noop `alive`. Unset: no re-check.
       */
      readonly deadBefore?: Date | undefined;
    }
  | {
      readonly type: 'attempt.expired';
      readonly attemptId: string;
      /** expired only if the attempt started before this (declared minus FLEET_PROGRESS_DEADLINE_S); else `not_due` */
      readonly startedBefore?: Date | undefined;
    }
  | { readonly type: 'deployment.teardown'; readonly force?: boolean | undefined }
  | { readonly type: 'deployment.resolve'; readonly outcome: 'ready' | 'failed'; readonly reason?: string | undefined };

export type MachineEventType = MachineEvent['type'];

export interface DeploymentSnapshot {
  readonly name: string;
  readonly state: DeploymentState;
  readonly version: number;
  readonly currentAttemptId: string | null;
}

export interface AttemptSnapshot {
  readonly id: string;
  readonly status: AttemptStatus;
  /** last heartbeat, else start (null: neither); read for the orphan re-check */
  readonly livenessAt?: Date | null | undefined;
  readonly startedAt?: Date | null | undefined;
}

/**
 * What the machine needs to know, read from one consistent snapshot.
 * `attempt` is the attempt the event names (null when the event names none, or the deployment never had it);
 * `currentAttempt` is the deployment's current attempt (null when it has none).
 */
export interface Snapshot {
  readonly deployment: DeploymentSnapshot | null;
  readonly attempt: AttemptSnapshot | null;
  readonly currentAttempt: AttemptSnapshot | null;
}

/** Reasons recorded on applied transitions (the stream's `reason` field). */
export type TransitionReason =
  | 'created'
  | 'attempt_created'
  | 'attempt_started'
  | 'attempt_succeeded'
  | 'attempt_failed'
  | 'cancelled'
  | 'orphaned'
  | 'progress_deadline_exceeded'
  | 'torn_down'
  | 'resolved';

/** Why an event changed nothing. */
export type NoopReason =
  | 'duplicate'
  | 'stale_attempt'
  | 'already_ended'
  | 'first_outcome_wins'
  | 'not_running'
  /** an orphan declared for an attempt that has sent a heartbeat since: it is alive */
  | 'alive'
  /** an expiry declared for an attempt that started after the deadline's cutoff (clocks or settings disagree) */
  | 'not_due';

/**
 * Noops that depend on time, not on the events seen: they are not recorded as the eventId's outcome, so that the
 * same eventId can still apply when its time comes.
 */
export const TIME_DEPENDENT_NOOPS: ReadonlySet<NoopReason> = new Set<NoopReason>(['alive', 'not_due']);

/**
 * Why an event was refused; the job fails without retries. `event_id_conflict` (the eventId was already used by a
 * different event) is decided by the transition service, not the machine.
 */
export type RejectionCode = 'id_conflict' | 'attempt_in_progress' | 'unknown_state' | 'not_unknown' | 'event_id_conflict';

/** Why an event cannot be decided yet: what it names may still be in flight. Retried with backoff. */
export type DeferReason = 'deployment_not_found' | 'attempt_not_found';

/** A change to an attempt row that goes with an applied transition. */
export interface AttemptChange {
  readonly attemptId: string;
  readonly status: AttemptStatus;
  readonly reason?: string | undefined;
  readonly startedAt?: Date | undefined;
  readonly endedAt?: Date | undefined;
}

/** Everything an applied transition writes besides `state`, `version` and the history/outbox rows. */
export interface Effects {
  /** create this attempt row (attempt.create) */
  readonly createAttempt?: { readonly attemptId: string } | undefined;
  /** attempt rows to update */
  readonly attempts: readonly AttemptChange[];
  /** new current attempt; undefined leaves it as it is, null clears it */
  readonly currentAttemptId?: string | null | undefined;
  /** new endpoint; undefined leaves it as it is, null clears it */
  readonly endpoint?: Endpoint | null | undefined;
  /** set `last_ready_at`: a Date stamps it, null clears it, undefined leaves it */
  readonly lastReadyAt?: Date | null | undefined;
}

export type Decision =
  | {
      readonly kind: 'applied';
      readonly from: DeploymentState | null;
      readonly to: DeploymentState;
      readonly reason: TransitionReason;
      readonly effects: Effects;
    }
  | { readonly kind: 'noop'; readonly why: NoopReason }
  | { readonly kind: 'rejected'; readonly code: RejectionCode; readonly message: string }
  | { readonly kind: 'deferred'; readonly why: DeferReason };
