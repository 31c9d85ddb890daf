import type { PoolClient } from 'pg';
import type { DataSource } from 'typeorm';
import { ADMIN_SQL, MIGRATION_LOCK_KEY } from '../sql/admin';
import { sessionOf } from '../sql/runner';

export { MIGRATION_LOCK_KEY };

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
  const session = sessionOf((await lock.connect()) as PoolClient);
  try {
    await session.run(ADMIN_SQL.lockMigrations, [MIGRATION_LOCK_KEY]);
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

/** True when every known migration has been applied (for `/readyz` and start-up checks). */
export async function migrationsApplied(dataSource: DataSource): Promise<boolean> {
  return !(await dataSource.showMigrations());
}
