/**
 * The sweep's statements. Each WHERE repeats its partial index's predicate verbatim so the planner can use it
 * (test/integration/sweep.test.ts EXPLAINs exactly these texts).
 */
import { sql } from './statement';

/** One endpoint of the readiness set. */
export interface ReadyRow {
  id: string;
  endpoint_url: string;
  last_ready_at: Date | null;
}

/** A running attempt past its orphan threshold or its progress deadline. */
export interface DueAttemptRow {
  kind: 'expired' | 'orphaned';
  id: string;
  deployment_id: string;
  /** orphaned: last heartbeat, else start; expired: start */
  liveness_at: Date;
}

export const SWEEP_SQL = Object.freeze({
  /** one page of the readiness set, keyset-paginated on deployments_ready_node_port_idx ($1 after id, $2 size) */
  readyPage: sql<ReadyRow>(`SELECT id, endpoint_url, last_ready_at
  FROM deployments
 WHERE state = 'ready' AND endpoint_kind = 'node_port' AND id > $1
 ORDER BY id
 LIMIT $2`),
  /**
   * The tick's one stamp write. Only where the deployment is still ready with the URL that answered, and never
   * backwards (an overlapping slower tick cannot undo a newer stamp). `version` is untouched.
   */
  stamp: sql<never>(`UPDATE deployments AS d
   SET last_ready_at = GREATEST(d.last_ready_at, $1::timestamptz)
  FROM unnest($2::uuid[], $3::text[]) AS p(id, url)
 WHERE d.id = p.id AND d.endpoint_url = p.url AND d.state = 'ready' AND d.endpoint_kind = 'node_port'`),
  /**
   * Expired and orphaned running attempts in one statement: attempts_running_started_idx and
   * attempts_running_liveness_idx (on COALESCE(last_heartbeat_at, started_at) WHERE status = 'running').
   * ($1 orphan cutoff, $2 deadline cutoff, $3 limit per kind)
   */
  dueAttempts: sql<DueAttemptRow>(`(SELECT 'expired' AS kind, id, deployment_id, started_at AS liveness_at
   FROM attempts
  WHERE status = 'running' AND started_at < $2
  ORDER BY started_at
  LIMIT $3)
UNION ALL
(SELECT 'orphaned' AS kind, id, deployment_id, COALESCE(last_heartbeat_at, started_at) AS liveness_at
   FROM attempts
  WHERE status = 'running' AND COALESCE(last_heartbeat_at, started_at) < $1
  ORDER BY COALESCE(last_heartbeat_at, started_at)
  LIMIT $3)`),
});
