import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * `state_transitions.actor` (CONTRACT.md, "Tables"): who caused the transition: an API token's name, `sweep`, or a
 * producer's `actor` (default `producer`). Rows written before this migration say `unrecorded`. Adding a column with
 * a constant default rewrites nothing (PostgreSQL 11+); the default is then dropped so that every new row names its
 * actor explicitly.
 */
export class TransitionActor1764650000000 implements MigrationInterface {
  name = 'TransitionActor1764650000000';

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE state_transitions ADD COLUMN actor varchar(100) NOT NULL DEFAULT 'unrecorded'`);
    await q.query(`ALTER TABLE state_transitions ALTER COLUMN actor DROP DEFAULT`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE state_transitions DROP COLUMN actor`);
  }
}
