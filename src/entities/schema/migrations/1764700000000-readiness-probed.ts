import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * `deployments.last_probed_at` (docs/architecture.md, "Readiness probing"): when the sweep last probed the
 * deployment's endpoint, whatever the answer. Each tick probes the readiness set least recently probed first, so
 * every endpoint gets its turn (round-robin) however many time out and however short the fleet's capacity falls.
 * Not indexed on purpose: the stamp UPDATE that sets it stays a HOT update, and the tick sorts the readiness set
 * (found through deployments_ready_node_port_idx) in memory. Null for rows never probed: probed first.
 */
export class ReadinessProbed1764700000000 implements MigrationInterface {
  name = 'ReadinessProbed1764700000000';

  async up(q: QueryRunner): Promise<void> {
    // squawk (npm run lint:migrations), annotated after release: the ALTER holds its lock for an instant
    await q.query(`
      -- squawk-ignore-file require-lock-timeout, require-statement-timeout -- released before the linter; metadata-only
      ALTER TABLE deployments ADD COLUMN last_probed_at timestamptz`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE deployments DROP COLUMN last_probed_at`);
  }
}
