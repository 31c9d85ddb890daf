/** Statements about the database itself: the migration lock and the health check. */
import { sql } from './statement';

/** The advisory lock key that serializes migrations across every process of the fleet. */
export const MIGRATION_LOCK_KEY = 'lifecycle-fleet:migrate';

export const ADMIN_SQL = Object.freeze({
  /** takes the migration lock if free (a session lock: held on one connection); never waits */
  tryLockMigrations: sql<{ locked: boolean }>(`SELECT pg_try_advisory_lock(hashtext($1)) AS locked`),
  unlockMigrations: sql<never>(`SELECT pg_advisory_unlock(hashtext($1))`),
  ping: sql<{ one: number }>(`SELECT 1 AS one`),
  /** whether the server takes no writes: in recovery (a standby), or read-only (`default_transaction_read_only`) */
  readOnly: sql<{ read_only: boolean }>(`SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on' AS read_only`),
  /** whether TypeORM's migrations table exists (not before the first migration) */
  migrationsTableExists: sql<{ present: boolean }>(`SELECT to_regclass('migrations') IS NOT NULL AS present`),
  /** the migrations recorded as applied, oldest first (only once the table exists) */
  appliedMigrations: sql<{ name: string }>(`SELECT name FROM migrations ORDER BY id`),
  /** whether the schema says which migration its readers must know (from migration 1765000000000 on) */
  schemaFloorExists: sql<{ present: boolean }>(`SELECT to_regprocedure('fleet_schema_requires()') IS NOT NULL AS present`),
  /** the migration every process running against this schema must know (only once the function exists) */
  schemaFloor: sql<{ name: string }>(`SELECT fleet_schema_requires() AS name`),
});
