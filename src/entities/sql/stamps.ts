/**
 * Heartbeat and readiness stamps: one UPDATE each, monotonic (GREATEST: a redelivered or late stamp never moves
 * the time backwards, so no processed row is needed), and a lookup that tells "not there yet" from "not stampable".
 */
import { sql } from './statement';

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
