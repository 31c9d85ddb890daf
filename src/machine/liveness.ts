/**
 * Liveness, the one rule for whether a running attempt's runner is still there (docs/architecture.md, "Orphans and
 * progress deadlines"): its liveness is its last heartbeat, else its start; it is orphaned once that is older than
 * the orphan threshold, and past its deadline once its start is older than the progress deadline, both judged as of
 * the time of a declaration (the sweep's tick). Pure: the thresholds' defaults are configuration's (`DEFAULTS` in
 * src/config.ts); PostgreSQL's form of the rule, for the sweep's scan and its index, is `ATTEMPT_LIVENESS` in
 * src/entities/sql/liveness.ts (test/integration/liveness.test.ts keeps the two, and the index, the same).
 */

/** The thresholds, in seconds: `FLEET_ORPHAN_AFTER_S` and `FLEET_PROGRESS_DEADLINE_S`. */
export interface LivenessLimits {
  /** an attempt whose liveness is older than this is orphaned */
  readonly orphanAfterS: number;
  /** an attempt that started longer ago than this is past its progress deadline */
  readonly progressDeadlineS: number;
}

/**
 * The cutoffs a declaration made at one time is judged by: an attempt whose liveness is before `deadBefore` is
 * orphaned, one that started before `startedBefore` is past its deadline.
 */
export interface LivenessCutoffs {
  readonly deadBefore: Date;
  readonly startedBefore: Date;
}

/** An attempt's liveness: its last heartbeat, else its start (null: neither, it never started). */
export function livenessOf(attempt: { readonly lastHeartbeatAt: Date | null; readonly startedAt: Date | null }): Date | null {
  return attempt.lastHeartbeatAt ?? attempt.startedAt;
}

/** The cutoffs as of `at` (a sweep's tick, or the time an `attempt.orphaned` / `attempt.expired` was declared). */
export function cutoffsAt(at: Date, limits: LivenessLimits): LivenessCutoffs {
  return {
    deadBefore: new Date(at.getTime() - limits.orphanAfterS * 1000),
    startedBefore: new Date(at.getTime() - limits.progressDeadlineS * 1000),
  };
}
