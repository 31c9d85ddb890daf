/**
 * Liveness has one rule (src/machine/liveness.ts) and one SQL form of it (src/entities/sql/liveness.ts), and the
 * sweep's orphan scan finds attempts through an index the migration built on that form. These tests keep the three
 * together: the index's expression is the fragment's text, the scan uses the index, and the fragment computes what
 * `livenessOf` computes.
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Client } from 'pg';
import { ATTEMPT_LIVENESS, SWEEP_SQL } from '../../src/entities/sql';
import { livenessOf } from '../../src/machine';
import { openTestDatabase, type TestDatabase } from '../helpers/db';

/** Every index an EXPLAIN (FORMAT JSON) plan names. */
function indexesOf(plan: unknown): string[] {
  if (Array.isArray(plan)) return plan.flatMap(indexesOf);
  if (typeof plan !== 'object' || plan === null) return [];
  const record = plan as Record<string, unknown>;
  const own = typeof record['Index Name'] === 'string' ? [record['Index Name']] : [];
  return [...own, ...Object.values(record).flatMap(indexesOf)];
}

describe('liveness: the rule, its SQL fragment and the orphan index agree', function () {
  this.timeout(30_000);
  let db: TestDatabase;
  let client: Client;

  before(async () => {
    db = await openTestDatabase(2);
    client = new Client({ connectionString: db.url });
    await client.connect();
  });

  after(async () => {
    await client?.end();
    await db?.close();
  });

  it("the migration's orphan index is on exactly ATTEMPT_LIVENESS, over running attempts", async () => {
    const { rows } = await client.query<{ expr: string; pred: string }>(
      `SELECT pg_get_expr(indexprs, indrelid) AS expr, pg_get_expr(indpred, indrelid) AS pred
         FROM pg_index WHERE indexrelid = 'attempts_running_liveness_idx'::regclass`,
    );
    expect(rows).to.deep.equal([{ expr: ATTEMPT_LIVENESS, pred: "((status)::text = 'running'::text)" }]);
  });

  it("the sweep's orphan scan is an index scan on it", async () => {
    // with sequential scans priced out, the planner still cannot use an expression index unless the statement's
    // expression is the index's
    await client.query('BEGIN');
    try {
      await client.query('SET LOCAL enable_seqscan = off');
      const now = Date.now();
      const { rows } = await client.query<{ 'QUERY PLAN': unknown }>(`EXPLAIN (FORMAT JSON) ${SWEEP_SQL.dueAttempts.text}`, [
        new Date(now - 90_000),
        new Date(now - 1_800_000),
        5000,
      ]);
      expect(indexesOf(rows[0]?.['QUERY PLAN'])).to.include('attempts_running_liveness_idx');
    } finally {
      await client.query('ROLLBACK');
    }
  });

  it('ATTEMPT_LIVENESS and livenessOf give the same time for every mix of heartbeat and start', async () => {
    const deploymentId = randomUUID();
    const [heartbeat, start] = [new Date('2026-03-01T10:00:05.000Z'), new Date('2026-03-01T10:00:00.000Z')];
    await client.query(`INSERT INTO deployments (id, name, state, version, state_changed_at) VALUES ($1, 'liveness', 'deploying', 1, now())`, [
      deploymentId,
    ]);
    const cases: Array<{ lastHeartbeatAt: Date | null; startedAt: Date | null }> = [
      { lastHeartbeatAt: null, startedAt: null },
      { lastHeartbeatAt: null, startedAt: start },
      { lastHeartbeatAt: heartbeat, startedAt: null },
      { lastHeartbeatAt: heartbeat, startedAt: start },
    ];
    const ids = cases.map(() => randomUUID());
    await client.query(
      `INSERT INTO attempts (id, deployment_id, number, status, last_heartbeat_at, started_at)
       SELECT v.id, $1, v.n, 'running', v.hb, v.st
         FROM unnest($2::uuid[], $3::int[], $4::timestamptz[], $5::timestamptz[]) AS v(id, n, hb, st)`,
      [deploymentId, ids, cases.map((_, i) => i + 1), cases.map((c) => c.lastHeartbeatAt), cases.map((c) => c.startedAt)],
    );
    const { rows } = await client.query<{ id: string; liveness: Date | null }>(
      `SELECT id, ${ATTEMPT_LIVENESS} AS liveness FROM attempts WHERE id = ANY($1::uuid[])`,
      [ids],
    );
    const fromSql = new Map(rows.map((r) => [r.id, r.liveness?.toISOString() ?? null]));
    expect(ids.map((id) => fromSql.get(id))).to.deep.equal(cases.map((c) => livenessOf(c)?.toISOString() ?? null));
  });
});
