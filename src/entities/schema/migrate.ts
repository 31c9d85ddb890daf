import type { PoolClient } from 'pg';
import type { DataSource } from 'typeorm';
import { SchemaTooNewError } from '../../errors';
import { ADMIN_SQL, MIGRATION_LOCK_KEY } from '../sql/admin';
import { sessionOf } from '../sql/runner';
import { sleep } from '../../util/time';

export { MIGRATION_LOCK_KEY };

/** How often a migrator waiting for another's lock asks again. */
const LOCK_RETRY_MS = 100;

export interface MigrateResult {
  /** names of the migrations this call ran (empty when another process had already run them) */
  readonly ran: readonly string[];
}

/**
 * Runs pending migrations exactly once however many processes call this together: TypeORM has no migration lock,
 * so a session-level PostgreSQL advisory lock, held on a dedicated connection, admits one migrator at a time; the
 * others wait, then find nothing pending. Each migration runs in its own transaction, unless it says
 * `transaction = false` (a concurrent index build).
 *
 * The others wait by asking again every LOCK_RETRY_MS, not in `pg_advisory_lock`: a statement waiting there holds a
 * snapshot, and CREATE INDEX CONCURRENTLY waits for every older snapshot to go, so the build would wait for the
 * waiters, the waiters for the lock, and the lock for the build: a deadlock PostgreSQL cannot see.
 */
export async function migrate(dataSource: DataSource): Promise<MigrateResult> {
  const lock = dataSource.createQueryRunner();
  const session = sessionOf((await lock.connect()) as PoolClient);
  try {
    while ((await session.run(ADMIN_SQL.tryLockMigrations, [MIGRATION_LOCK_KEY])).rows[0]?.locked !== true) await sleep(LOCK_RETRY_MS);
    try {
      const ran = await dataSource.runMigrations({ transaction: 'each' });
      return { ran: ran.map((m) => m.name) };
    } finally {
      await session.run(ADMIN_SQL.unlockMigrations, [MIGRATION_LOCK_KEY]);
    }
  } finally {
    await lock.release();
  }
}

/** One migration as `fleet migrate --status` lists it. */
export interface MigrationState {
  readonly name: string;
  /**
   * applied: recorded in the database; pending: known to this version, not applied yet; unknown: recorded in the
   * database and not known to this version (a newer version applied it)
   */
  readonly state: 'applied' | 'pending' | 'unknown';
}

/**
 * Every migration this version knows, in order, applied or pending, and after them those the database records that
 * this version does not know (a newer version's). Reads only: takes no lock and changes nothing.
 */
export async function migrationStatus(dataSource: DataSource): Promise<MigrationState[]> {
  const runner = dataSource.createQueryRunner();
  const session = sessionOf((await runner.connect()) as PoolClient);
  try {
    const present = (await session.run(ADMIN_SQL.migrationsTableExists)).rows[0]?.present === true;
    const applied = present ? (await session.run(ADMIN_SQL.appliedMigrations)).rows.map((r) => r.name) : [];
    const known = dataSource.migrations.map((m) => m.name ?? m.constructor.name);
    const done = new Set(applied);
    return [
      ...known.map((name): MigrationState => ({ name, state: done.has(name) ? 'applied' : 'pending' })),
      ...applied.filter((name) => !known.includes(name)).map((name): MigrationState => ({ name, state: 'unknown' })),
    ];
  } finally {
    await runner.release();
  }
}

/** True when every known migration has been applied (for `/readyz` and start-up checks). */
export async function migrationsApplied(dataSource: DataSource): Promise<boolean> {
  return !(await dataSource.showMigrations());
}

/**
 * Refuses a schema newer than this version can run against (SchemaTooNewError): one whose
 * `fleet_schema_requires()` names a migration this version does not know. A schema with migrations from a newer
 * release that does not require them (expand-only: the one-release skew of a rolling upgrade) passes. Reads only.
 */
export async function assertSchemaSupported(dataSource: DataSource): Promise<void> {
  const runner = dataSource.createQueryRunner();
  const session = sessionOf((await runner.connect()) as PoolClient);
  try {
    if ((await session.run(ADMIN_SQL.schemaFloorExists)).rows[0]?.present !== true) return;
    const requires = (await session.run(ADMIN_SQL.schemaFloor)).rows[0]?.name ?? '';
    const known = dataSource.migrations.map((m) => m.name ?? m.constructor.name);
    if (!known.includes(requires)) throw new SchemaTooNewError(requires, known.at(-1) ?? '(none)');
  } finally {
    await runner.release();
  }
}
