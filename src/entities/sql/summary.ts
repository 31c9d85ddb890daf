/**
 * The fleet at a glance (`GET /api/summary`, the page at /ui): how many deployments are in each state, and the ones
 * that need a person, in one statement.
 *
 * Each count is its own index-only range of `deployments_state_id_idx` (a scalar subquery per state, so the planner
 * cannot fold them into one scan of the table); the attention list reads `deployments_attention_idx` (the unknown and
 * failed ones, newest first) in order and stops at `limit`. test/integration/summary-ui.test.ts EXPLAINs exactly this
 * text.
 */
import { DEPLOYMENT_STATES, type DeploymentState } from '../../machine';
import type { Session } from './runner';
import { sql } from './statement';

/** The states that need a person: `unknown` always, `failed` when it failed recently. */
const STUCK = 'unknown' satisfies DeploymentState;
const FAILED = 'failed' satisfies DeploymentState;

/** A deployment that needs a person, since it entered its state. */
export interface AttentionRecord {
  readonly deploymentId: string;
  readonly name: string;
  readonly state: typeof STUCK | typeof FAILED;
  readonly since: Date;
}

export interface SummaryRecord {
  /** every state, zero included */
  readonly counts: Readonly<Record<DeploymentState, number>>;
  /** newest first */
  readonly attention: readonly AttentionRecord[];
}

interface SummaryRow {
  counts: Record<string, number>;
  attention: Array<{ id: string; name: string; state: typeof STUCK | typeof FAILED; since: string }>;
}

const STATE_VALUES = DEPLOYMENT_STATES.map((s) => `('${s}'::varchar)`).join(', ');

export const SUMMARY_SQL = Object.freeze({
  summary: sql<SummaryRow>(`
    SELECT
      (SELECT json_object_agg(s.state, (SELECT count(*) FROM deployments d WHERE d.state = s.state))
         FROM (VALUES ${STATE_VALUES}) AS s(state)) AS counts,
      (SELECT coalesce(json_agg(json_build_object('id', a.id, 'name', a.name, 'state', a.state, 'since', a.state_changed_at)
                                ORDER BY a.state_changed_at DESC, a.id), '[]'::json)
         FROM (SELECT id, name, state, state_changed_at FROM deployments
                WHERE state = '${STUCK}' OR (state = '${FAILED}' AND state_changed_at >= $1)
                ORDER BY state_changed_at DESC, id LIMIT $2) AS a) AS attention`),
});

/**
 * Counts per state, and at most `limit` deployments needing a person, newest first: every `unknown` one, and the
 * `failed` ones that failed at or after `failedSince`.
 */
export async function findSummary(db: Session, options: { failedSince: Date; limit: number }): Promise<SummaryRecord> {
  const { rows } = await db.run(SUMMARY_SQL.summary, [options.failedSince, options.limit]);
  const row = rows[0];
  const counts = Object.fromEntries(DEPLOYMENT_STATES.map((s) => [s, Number(row?.counts[s] ?? 0)])) as Record<DeploymentState, number>;
  const attention = (row?.attention ?? []).map((a) => ({ deploymentId: a.id, name: a.name, state: a.state, since: new Date(a.since) }));
  return { counts, attention };
}
