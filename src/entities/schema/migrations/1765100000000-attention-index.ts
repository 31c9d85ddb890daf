import type { MigrationInterface, QueryRunner } from 'typeorm';

const INDEX = 'deployments_attention_idx';

/**
 * `deployments_attention_idx` (docs/contract.md, "Tables"): the deployments needing a person (`unknown`, `failed`) in
 * the order the summary lists them (src/entities/sql/summary.ts), so its `ORDER BY state_changed_at DESC, id LIMIT n`
 * reads the first n entries instead of every unknown and failed row and sorting them. Measured with
 * EXPLAIN (ANALYZE, BUFFERS) on 1,000,000 deployments (5% failed over 30 days, 1% unknown), limit 100, warm cache:
 * before, a bitmap scan of deployments_state_id_idx, 60,000 heap rows and a top-N sort, 28 ms and 10,993 buffers;
 * after, an index scan of this index that stops at the 100th row, 0.19 ms and 103 buffers. Built in 0.5 s there.
 *
 * Built CONCURRENTLY, so writers are never blocked, which cannot run in a transaction: `transaction = false` makes
 * TypeORM run this migration outside one (honoured by runMigrations with `transaction: 'each'`, as `migrate()` calls
 * it). Re-runnable after a crash: an interrupted concurrent build leaves an INVALID index behind, dropped before
 * building again; a valid one left by a run cut off before it was recorded is kept (IF NOT EXISTS). down() must run
 * outside a transaction too (TypeORM's undoLastMigration wraps down() in one unless given `transaction: 'none'`).
 */
export class AttentionIndex1765100000000 implements MigrationInterface {
  name = 'AttentionIndex1765100000000';
  transaction = false;

  async up(q: QueryRunner): Promise<void> {
    await withTimeouts(q, async () => {
      const invalid = (await q.query(`SELECT 1 FROM pg_index WHERE indexrelid = to_regclass('${INDEX}') AND NOT indisvalid`)) as unknown[];
      if (invalid.length > 0) await q.query(`DROP INDEX CONCURRENTLY IF EXISTS ${INDEX}`);
      await q.query(
        `CREATE INDEX CONCURRENTLY IF NOT EXISTS ${INDEX} ON deployments (state_changed_at DESC, id) WHERE state IN ('unknown', 'failed')`,
      );
      // IF NOT EXISTS also passes over an invalid index that appeared since the check (a build of an earlier run whose
      // backend outlived its client): never record the migration over one
      const built = (await q.query(`SELECT indisvalid AS valid FROM pg_index WHERE indexrelid = to_regclass('${INDEX}')`)) as Array<{
        valid: boolean;
      }>;
      if (built[0]?.valid === false)
        throw new Error(`${INDEX} is not valid after its build (another build of it may still run): run fleet migrate again`);
    });
  }

  async down(q: QueryRunner): Promise<void> {
    await withTimeouts(q, () => q.query(`DROP INDEX CONCURRENTLY IF EXISTS ${INDEX}`));
  }
}

/**
 * Runs `body` with this session's lock and statement timeouts set, and resets them after: outside a transaction a
 * SET lasts as long as the pooled connection. The lock a concurrent build takes (SHARE UPDATE EXCLUSIVE) blocks no
 * read or write, only DDL and VACUUM, so the lock timeout bounds its waits for older transactions to end rather than
 * anyone's wait for it; a build cut off by either timeout leaves an invalid index, which the next run drops.
 */
async function withTimeouts(q: QueryRunner, body: () => Promise<unknown>): Promise<void> {
  await q.query(`SET lock_timeout = '1min'`);
  await q.query(`SET statement_timeout = '30min'`);
  const reset = async () => {
    await q.query(`RESET lock_timeout`);
    await q.query(`RESET statement_timeout`);
  };
  try {
    await body();
  } catch (err) {
    await reset().catch(() => undefined); // the connection may be broken, or its transaction aborted: show the first error
    throw err;
  }
  await reset();
}
