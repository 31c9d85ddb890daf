/**
 * PostgreSQL's form of an attempt's liveness (src/machine/liveness.ts, `livenessOf`: its last heartbeat, else its
 * start), over the `attempts` table's columns. The sweep's orphan scan selects, filters and orders by it, and it is
 * the expression of the partial index `attempts_running_liveness_idx` (migration 1763900000000), so that scan is an
 * index range scan: test/integration/liveness.test.ts checks that the index's expression is this text, that the
 * scan uses the index, and that this and `livenessOf` agree.
 */
export const ATTEMPT_LIVENESS = 'COALESCE(last_heartbeat_at, started_at)';
