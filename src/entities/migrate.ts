import type { DataSource } from 'typeorm';

/** The advisory lock key that serializes migrations across every process of the fleet. */
export const MIGRATION_LOCK_KEY = 'lifecycle-fleet:migrate';

export interface MigrateResult {
  /** names of the migrations this call ran (empty when another process had already run them) */
  readonly ran: readonly string[];
}

/**
 * Runs pending migrations exactly once however many processes call this together: TypeORM has no migration lock,
 * so a session-level PostgreSQL advisory lock, held on a dedicated connection, admits one migrator at a time; the
 * others wait, then find nothing pending. Each migration runs in its own transaction.
 */
export async function migrate(dataSource: DataSource): Promise<MigrateResult> {
  const lock = dataSource.createQueryRunner();
  await lock.connect();
  try {
    await lock.query('SELECT pg_advisory_lock(hashtext($1))', [MIGRATION_LOCK_KEY]);
    try {
      const ran = await dataSource.runMigrations({ transaction: 'each' });
      return { ran: ran.map((m) => m.name) };
    } finally {
      await lock.query('SELECT pg_advisory_unlock(hashtext($1))', [MIGRATION_LOCK_KEY]);
    }
  } finally {
    await lock.release();
  }
}

/** True when every known migration has been applied (for `/readyz` and start-up checks). */
export async function migrationsApplied(dataSource: DataSource): Promise<boolean> {
  return !(await dataSource.showMigrations());
}
