import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * `state_transitions.actor` (docs/contract.md, "Tables"): who caused the transition: an API token's name, `sweep`, or a
 * producer's `actor` (default `producer`). Rows written before this migration, and by workers of the previous
 * release still running during a rolling upgrade, say `unrecorded` (the column's default: dropping it would fail
 * their inserts). `processed_events.payload_sha256`: the digest of the event's payload, so that a later event that
 * reuses an eventId with another payload is refused (`event_id_conflict`) instead of being dropped as a duplicate;
 * null for rows written before. Adding columns with a constant default rewrites nothing (PostgreSQL 11+).
 */
export class TransitionActor1764650000000 implements MigrationInterface {
  name = 'TransitionActor1764650000000';

  async up(q: QueryRunner): Promise<void> {
    // squawk (npm run lint:migrations), annotated after release: both ALTERs hold their lock for an instant
    await q.query(`
      -- squawk-ignore-file require-lock-timeout, require-statement-timeout -- released before the linter; metadata-only
      ALTER TABLE state_transitions ADD COLUMN actor varchar(100) NOT NULL DEFAULT 'unrecorded'`);
    await q.query(`ALTER TABLE processed_events ADD COLUMN payload_sha256 char(64)`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE processed_events DROP COLUMN payload_sha256`);
    await q.query(`ALTER TABLE state_transitions DROP COLUMN actor`);
  }
}
