/**
 * The one DataSource definition: explicit entity and migration lists, `synchronize: false` (the schema is owned
 * by migrations, run by `fleet migrate` under an advisory lock).
 */
import 'reflect-metadata';
import { Client, type ClientConfig } from 'pg';
import { DataSource } from 'typeorm';
import { ENTITIES, MIGRATIONS } from '../index';

/**
 * A pool client that can never crash the process with an unhandled 'error' event. When a backend is terminated
 * (`pg_terminate_backend`, a restart) just as a new pool connection finishes its start-up, the FATAL message can
 * arrive in the same read as the start-up's end: pg emits 'error' synchronously, before TypeORM has attached its
 * listener to the connection it was just handed (it does so a microtask later), and the process dies. Errors still
 * reach every other listener and fail the queries in flight; this listener only keeps the process alive.
 */
export class GuardedClient extends Client {
  constructor(config?: string | ClientConfig) {
    super(config);
    this.on('error', () => undefined);
  }
}

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
  /**
   * Server-side limit for a transaction left idle (default 5 s; 0 with `statementTimeoutMs` 0). Ours never wait
   * between statements, so a transaction idle that long belongs to a client that is gone or cut off (a partitioned
   * host): PostgreSQL ends it and frees its row locks, so the job's re-run elsewhere is not held up behind them.
   */
  readonly idleInTransactionTimeoutMs?: number;
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
      Client: GuardedClient,
      max: settings.poolSize ?? 10,
      statement_timeout: settings.statementTimeoutMs ?? 30_000,
      idle_in_transaction_session_timeout: settings.idleInTransactionTimeoutMs ?? (settings.statementTimeoutMs === 0 ? 0 : 5000),
      // Fail fast when the database is unreachable: the worker turns it into a delayed retry.
      connectionTimeoutMillis: 5000,
      idleTimeoutMillis: 30_000,
    },
  });
}
