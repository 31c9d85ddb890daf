/**
 * Heartbeat and readiness stamps: one UPDATE each, monotonic (GREATEST: a redelivered or late stamp never moves
 * the time backwards, so no processed row is needed), and a lookup that tells "not there yet" from "not stampable".
 */
import { lockedInIdOrder } from './lock-order';
import { plannedPerCall, sql } from './statement';

export const STAMP_SQL = Object.freeze({
  /** $1 attempt, $2 deployment, $3 time; only a running attempt */
  heartbeat: sql<{ id: string }>(
    `UPDATE attempts SET last_heartbeat_at = GREATEST(last_heartbeat_at, $3)
      WHERE id = $1 AND deployment_id = $2 AND status = 'running'
      RETURNING id`,
  ),
  /** $1 deployment, $2 time; only a ready deployment */
  readiness: sql<never>(`UPDATE deployments SET last_ready_at = GREATEST(last_ready_at, $2) WHERE id = $1 AND state = 'ready'`),
  /** whether the deployment ($1) and the attempt ($2, of that deployment) exist */
  exists: sql<{ d: string | null; a: string | null }>(
    `SELECT (SELECT id FROM deployments WHERE id = $1) AS d,
            (SELECT id FROM attempts WHERE id = $2 AND deployment_id = $1) AS a`,
  ),
});

/** A buffered heartbeat the batch flush did not write, as it reports it (`STAMP_BATCH_SQL.heartbeats`). */
export interface HeartbeatFlushRow {
  attempt_id: string;
  deployment_id: string;
  /** the attempt was running and its stamp is now at least the buffered time */
  stamped: boolean;
  /** the attempt exists (for this deployment); false: not created yet, or never will be */
  found: boolean;
}

/** A buffered readiness stamp the batch flush did not write (`STAMP_BATCH_SQL.readiness`). */
export interface ReadinessFlushRow {
  deployment_id: string;
  stamped: boolean;
  found: boolean;
}

/**
 * The stamp buffer's batch writes (src/services/stamps/flush.ts): one statement per kind per flush, whatever the
 * number of stamps. Each is the same monotonic UPDATE as the per-event statements above, over unnest()ed arrays,
 * and reports the input rows it did NOT stamp, each with whether what it names exists, so the buffer can tell
 * "written" (not reported: the common case costs no result rows), "not running / not ready: drop" and "not there
 * yet: keep" apart without another statement. Each locks its rows by id before it writes them (lock-order.ts): the
 * stamps come oldest first, and a flush that locked in that order deadlocked with the group-commit write and the
 * probe shards.
 * Both are planned per call (`plannedPerCall`): a cached generic plan made them quadratic.
 */
export const STAMP_BATCH_SQL = Object.freeze({
  /** $1 attempt ids, $2 their deployments, $3 times (arrays of one length; each (attempt, deployment) once) */
  heartbeats: plannedPerCall<HeartbeatFlushRow>(
    `WITH p AS (SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS p(attempt_id, deployment_id, at)),
     locked AS ${lockedInIdOrder('attempts', '$1::uuid[]', "status = 'running'")},
     u AS (UPDATE attempts AS a SET last_heartbeat_at = GREATEST(a.last_heartbeat_at, p.at)
             FROM locked JOIN p ON p.attempt_id = locked.id
            WHERE a.id = locked.id AND a.deployment_id = p.deployment_id AND a.status = 'running'
        RETURNING a.id, a.deployment_id)
     SELECT p.attempt_id, p.deployment_id, u.id IS NOT NULL AS stamped, x.id IS NOT NULL AS found
       FROM p
       LEFT JOIN u ON u.id = p.attempt_id AND u.deployment_id = p.deployment_id
       LEFT JOIN attempts AS x ON x.id = p.attempt_id AND x.deployment_id = p.deployment_id
      WHERE u.id IS NULL`,
  ),
  /** $1 deployment ids, $2 times (each deployment once) */
  readiness: plannedPerCall<ReadinessFlushRow>(
    `WITH p AS (SELECT * FROM unnest($1::uuid[], $2::timestamptz[]) AS p(deployment_id, at)),
     locked AS ${lockedInIdOrder('deployments', '$1::uuid[]', "state = 'ready'")},
     u AS (UPDATE deployments AS d SET last_ready_at = GREATEST(d.last_ready_at, p.at)
             FROM locked JOIN p ON p.deployment_id = locked.id
            WHERE d.id = locked.id AND d.state = 'ready'
        RETURNING d.id)
     SELECT p.deployment_id, u.id IS NOT NULL AS stamped, x.id IS NOT NULL AS found
       FROM p
       LEFT JOIN u ON u.id = p.deployment_id
       LEFT JOIN deployments AS x ON x.id = p.deployment_id
      WHERE u.id IS NULL`,
  ),
});
