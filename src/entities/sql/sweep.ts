/**
 * The sweep's statements. Each WHERE repeats its partial index's predicate verbatim so the planner can use it
 * (test/integration/sweep.test.ts EXPLAINs exactly these texts).
 */
import { ATTEMPT_LIVENESS } from './liveness';
import { lockedInIdOrder } from './lock-order';
import { sql } from './statement';

/** One endpoint of the readiness set, as the tick plans it. */
export interface ReadySetRow {
  id: string;
  last_probed_at: Date | null;
  state_changed_at: Date;
}

/** One endpoint of a probe shard. */
export interface ShardRow {
  id: string;
  endpoint_url: string;
  last_ready_at: Date | null;
}

/** A row the shard's stamp touched: whether its readiness was stamped or only its probe time. */
export interface ShardStampRow {
  id: string;
  stamped: boolean;
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
  /**
   * The whole readiness set, least recently probed first (never probed first; ties by id): the order of the tick's
   * shards. Found on deployments_ready_node_port_idx, sorted in memory (100 000 rows: a few tens of ms).
   */
  readySet: sql<ReadySetRow>(`SELECT id, last_probed_at, state_changed_at
  FROM deployments
 WHERE state = 'ready' AND endpoint_kind = 'node_port'
 ORDER BY last_probed_at NULLS FIRST, id`),
  /** One shard's endpoints ($1 ids), where they are still ready node_port ones. */
  shardRows: sql<ShardRow>(`SELECT id, endpoint_url, last_ready_at
  FROM deployments
 WHERE id = ANY($1::uuid[]) AND state = 'ready' AND endpoint_kind = 'node_port'`),
  /**
   * A shard's one write. Every probed row gets its probe time (`last_probed_at`, whatever the answer: the
   * round-robin order); the ones that answered 2xx also get `last_ready_at`, only where the deployment is still
   * ready with the URL that answered. Both only ever move forward (a slower shard of an earlier tick cannot undo a
   * newer stamp). `version` is untouched. The rows are locked by id first (lock-order.ts), not in the order the
   * probes finished. ($1 ids, $2 URLs probed, $3 probe start times, $4 answered 2xx)
   */
  stamp: sql<ShardStampRow>(`WITH locked AS ${lockedInIdOrder('deployments', '$1::uuid[]', "state = 'ready' AND endpoint_kind = 'node_port'")}
UPDATE deployments AS d
   SET last_probed_at = GREATEST(d.last_probed_at, p.at),
       last_ready_at = CASE WHEN p.ok AND d.endpoint_url = p.url THEN GREATEST(d.last_ready_at, p.at) ELSE d.last_ready_at END
  FROM locked JOIN unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::boolean[]) AS p(id, url, at, ok) ON p.id = locked.id
 WHERE d.id = locked.id AND d.state = 'ready' AND d.endpoint_kind = 'node_port'
RETURNING d.id, (p.ok AND d.endpoint_url = p.url) AS stamped`),
  /**
   * Expired and orphaned running attempts in one statement: attempts_running_started_idx and
   * attempts_running_liveness_idx (on `ATTEMPT_LIVENESS` WHERE status = 'running').
   * ($1 orphan cutoff, $2 deadline cutoff, $3 limit per kind)
   */
  dueAttempts: sql<DueAttemptRow>(`(SELECT 'expired' AS kind, id, deployment_id, started_at AS liveness_at
   FROM attempts
  WHERE status = 'running' AND started_at < $2
  ORDER BY started_at
  LIMIT $3)
UNION ALL
(SELECT 'orphaned' AS kind, id, deployment_id, ${ATTEMPT_LIVENESS} AS liveness_at
   FROM attempts
  WHERE status = 'running' AND ${ATTEMPT_LIVENESS} < $1
  ORDER BY ${ATTEMPT_LIVENESS}
  LIMIT $3)`),
});
