/**
 * The one DataSource definition: explicit entity and migration lists, `synchronize: false` (the schema is owned
 * by migrations, run by `fleet migrate` under an advisory lock).
 */
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { ENTITIES, MIGRATIONS } from './src/entities';

export interface DataSourceSettings {
  /** a postgres:// URL */
  readonly url: string;
  /** connection pool size (default 10); give workers at least their concurrency plus a few */
  readonly poolSize?: number;
  /** pg application_name, shown in pg_stat_activity (default `lifecycle-fleet`) */
  readonly applicationName?: string;
  /**
   * Server-side limit for one statement, and for a transaction left idle (default 30 s; 0: none, for migrations).
   * A statement stuck behind a hung server or a forgotten lock fails instead of holding a job, and a graceful stop,
   * forever; the worker retries it like any outage.
   */
  readonly statementTimeoutMs?: number;
}

export function createDataSource(settings: DataSourceSettings): DataSource {
  return new DataSource({
    type: 'postgres',
    url: settings.url,
    entities: ENTITIES,
    migrations: MIGRATIONS,
    migrationsTableName: 'migrations',
    synchronize: false,
    migrationsRun: false,
    logging: false,
    applicationName: settings.applicationName ?? 'lifecycle-fleet',
    extra: {
      max: settings.poolSize ?? 10,
      statement_timeout: settings.statementTimeoutMs ?? 30_000,
      idle_in_transaction_session_timeout: settings.statementTimeoutMs ?? 30_000,
      // Fail fast when the database is unreachable: the worker turns it into a delayed retry.
      connectionTimeoutMillis: 5000,
      idleTimeoutMillis: 30_000,
    },
  });
}
