/**
 * Test isolation for PostgreSQL: each test file gets a database of its own, migrated, dropped afterwards.
 */
import { randomBytes } from 'node:crypto';
import { Client } from 'pg';
import type { DataSource } from 'typeorm';
import { createDataSource } from '../../ormconfig';
import { migrate } from '../../src/entities/schema/migrate';
import { testEnv } from './env';

export interface TestDatabase {
  readonly url: string;
  readonly name: string;
  readonly dataSource: DataSource;
  /** closes the DataSource and drops the database */
  close(): Promise<void>;
}

export async function createDatabase(): Promise<{ url: string; name: string; drop(): Promise<void> }> {
  const adminUrl = testEnv().databaseUrl;
  const name = `test_${randomBytes(6).toString('hex')}`;
  const admin = new Client({ connectionString: adminUrl });
  await admin.connect();
  try {
    await admin.query(`CREATE DATABASE ${name}`);
  } finally {
    await admin.end();
  }
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    name,
    async drop() {
      // as the servers' admin (the superuser, with the test servers): FORCE terminates every session on the database,
      // and the fleet's role may not terminate the admin's own (a test's admin session whose backend was still exiting
      // after its client closed failed a drop once: "must be a member of the role whose process is being terminated")
      const c = new Client({ connectionString: testEnv().adminDatabaseUrl });
      await c.connect();
      try {
        await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await c.end();
      }
    },
  };
}

/** A fresh, migrated database with a DataSource open on it. */
export async function openTestDatabase(poolSize = 20): Promise<TestDatabase> {
  const db = await createDatabase();
  const dataSource = createDataSource({ url: db.url, poolSize, applicationName: 'lifecycle-fleet-test' });
  await dataSource.initialize();
  await migrate(dataSource);
  return {
    url: db.url,
    name: db.name,
    dataSource,
    async close() {
      if (dataSource.isInitialized) await dataSource.destroy();
      await db.drop();
    },
  };
}

/**
 * Makes every outbox row of earlier tests published and untraceable to a stream, so that a test's relay finds none
 * of them pending and a stream check finds none of them missing (each test has its own prefix, hence its own stream).
 */
export async function forgetOutbox(db: TestDatabase): Promise<void> {
  await db.dataSource.query(`UPDATE outbox SET published_at = COALESCE(published_at, now()), stream_id = NULL`);
}

/**
 * Makes the test database refuse writes in every session opened from now on (`default_transaction_read_only`), as a
 * server in recovery or a demoted primary does after a failover (SQLSTATE 25006), or lets it take them again.
 * Sessions already open keep what they had. Its own session is made writable first: once the database is
 * read-only, undoing it is itself a write.
 */
export async function setReadOnly(db: Pick<TestDatabase, 'url' | 'name'>, on: boolean): Promise<void> {
  const c = new Client({ connectionString: db.url });
  await c.connect();
  try {
    await c.query(`SET default_transaction_read_only = off`);
    await c.query(
      on ? `ALTER DATABASE ${db.name} SET default_transaction_read_only = on` : `ALTER DATABASE ${db.name} RESET default_transaction_read_only`,
    );
  } finally {
    await c.end();
  }
}
