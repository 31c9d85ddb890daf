import type { MigrationInterface, QueryRunner } from 'typeorm';

/**
 * `fleet_schema_requires()` (docs/architecture.md, "Upgrades"): the name of a migration that every process running
 * against this schema must know. A process meets a schema newer than itself (migrations it does not know, recorded by
 * a newer release) at every rolling upgrade, and that is supported for one release: expand-only migrations (new
 * tables, columns with constant or no defaults, indexes built concurrently) leave the previous release's code
 * working. A later migration that contracts the schema (drops or renames what older code reads or writes) replaces
 * this function so that it names a migration that code does not know, and from then on that code refuses to start
 * (exit code 6) instead of failing on its first write.
 *
 * STABLE, not IMMUTABLE: a later migration replaces it, so its value is constant only within a statement.
 * A function rather than a table: EXECUTE on a new function is granted to PUBLIC, so the fleet's least-privileged
 * role reads it with no new grant, and replacing it is atomic with the migration that contracts. It names the newest
 * migration of release 0.1.0: 0.1.0's code runs against this schema (it has only expand-only changes since).
 */
export class SchemaFloor1765000000000 implements MigrationInterface {
  name = 'SchemaFloor1765000000000';

  async up(q: QueryRunner): Promise<void> {
    // catalog only, but bounded like every migration: it gives up rather than queue the fleet behind a lock it waits for
    await q.query(`SET LOCAL lock_timeout = '5s'`);
    await q.query(`SET LOCAL statement_timeout = '30s'`);
    await q.query(
      `CREATE FUNCTION fleet_schema_requires() RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT 'ReadinessProbed1764700000000'::text $$`,
    );
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`DROP FUNCTION fleet_schema_requires()`);
  }
}
