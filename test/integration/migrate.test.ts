import { expect } from 'chai';
import { createDataSource } from '../../ormconfig';
import { Deployment, MIGRATIONS } from '../../src/entities';
import { assertSchemaSupported, migrate, migrationsApplied, migrationStatus } from '../../src/entities/schema/migrate';
import { SchemaTooNewError } from '../../src/errors';
import { createDatabase } from '../helpers/db';

describe('migrations (PostgreSQL)', () => {
  it('run exactly once when 6 processes start together, under the advisory lock', async () => {
    const db = await createDatabase();
    // separate DataSources stand in for separate processes: each has its own pool and sessions
    const sources = Array.from({ length: 6 }, () => createDataSource({ url: db.url, poolSize: 2 }));
    try {
      await Promise.all(sources.map((s) => s.initialize()));
      const first = sources[0];
      if (first === undefined) throw new Error('no data source');
      expect(await migrationsApplied(first)).to.equal(false);
      const results = await Promise.all(sources.map((s) => migrate(s)));
      const ran = results.map((r) => r.ran.length);
      expect(ran.filter((n) => n > 0)).to.deep.equal([MIGRATIONS.length]); // one process ran every migration
      expect(await migrationsApplied(first)).to.equal(true);
      const rows = await first.query<Array<{ name: string }>>(`SELECT name FROM migrations`);
      expect(rows.map((r) => r.name)).to.deep.equal(MIGRATIONS.map((m) => m.name));
      const tables = await first.query<Array<{ table_name: string }>>(
        `SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY table_name`,
      );
      expect(tables.map((t) => t.table_name)).to.deep.equal([
        'attempts',
        'deployments',
        'migrations',
        'outbox',
        'processed_events',
        'state_transitions',
      ]);
      // running again is a no-op
      expect((await migrate(first)).ran).to.deep.equal([]);
    } finally {
      await Promise.all(sources.filter((s) => s.isInitialized).map((s) => s.destroy()));
      await db.drop();
    }
  });

  it('list applied, pending and unknown migrations (fleet migrate --status), changing nothing', async () => {
    const db = await createDatabase();
    const ds = createDataSource({ url: db.url, poolSize: 2 });
    const names = MIGRATIONS.map((m) => m.name);
    try {
      await ds.initialize();
      // before the first migration there is no table to read
      expect(await migrationStatus(ds)).to.deep.equal(names.map((name) => ({ name, state: 'pending' })));
      expect(await ds.query<unknown[]>(`SELECT to_regclass('migrations') AS t`)).to.deep.equal([{ t: null }]);
      await migrate(ds);
      expect(await migrationStatus(ds)).to.deep.equal(names.map((name) => ({ name, state: 'applied' })));

      // the newest undone, and one recorded by a newer version: listed last, as unknown
      const last = names[names.length - 1] ?? '';
      await ds.query(`DELETE FROM migrations WHERE name = $1`, [last]);
      await ds.query(`INSERT INTO migrations (timestamp, name) VALUES (1799999999999, 'Future1799999999999')`);
      const before = await ds.query<unknown[]>(`SELECT * FROM migrations ORDER BY id`);
      expect(await migrationStatus(ds)).to.deep.equal([
        ...names.slice(0, -1).map((name) => ({ name, state: 'applied' })),
        { name: last, state: 'pending' },
        { name: 'Future1799999999999', state: 'unknown' },
      ]);
      expect(await ds.query<unknown[]>(`SELECT * FROM migrations ORDER BY id`)).to.deep.equal(before);
    } finally {
      if (ds.isInitialized) await ds.destroy();
      await db.drop();
    }
  });

  it('run against a newer expand-only schema, and refuse one a newer release contracted (fleet_schema_requires)', async () => {
    const db = await createDatabase();
    const ds = createDataSource({ url: db.url, poolSize: 2 });
    try {
      await ds.initialize();
      // before the migration that brings the function: nothing is required
      await assertSchemaSupported(ds);
      await migrate(ds);
      await assertSchemaSupported(ds);
      // a newer release's migration that requires nothing new of its readers: the one-release skew of an upgrade
      await ds.query(`INSERT INTO migrations (timestamp, name) VALUES (1799999999999, 'Future1799999999999')`);
      await assertSchemaSupported(ds);
      // the newer release contracts the schema: its readers must know its migration
      await ds.query(
        `CREATE OR REPLACE FUNCTION fleet_schema_requires() RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT 'Future1799999999999'::text $$`,
      );
      const err = await assertSchemaSupported(ds).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).to.be.instanceOf(SchemaTooNewError);
      expect((err as SchemaTooNewError).requires).to.equal('Future1799999999999');
      expect((err as SchemaTooNewError).newestKnown).to.equal(MIGRATIONS[MIGRATIONS.length - 1]?.name);
    } finally {
      if (ds.isInitialized) await ds.destroy();
      await db.drop();
    }
  });

  it('build the attention index concurrently, outside a transaction; after a crashed build, drop its invalid leftover and build it again', async () => {
    const db = await createDatabase();
    const ds = createDataSource({ url: db.url, poolSize: 2, statementTimeoutMs: 0 });
    const index = `SELECT indisvalid AS valid, pg_get_indexdef(indexrelid) AS def FROM pg_index WHERE indexrelid = to_regclass('deployments_attention_idx')`;
    const built = {
      valid: true,
      def: `CREATE INDEX deployments_attention_idx ON public.deployments USING btree (state_changed_at DESC, id) WHERE ((state)::text = ANY ((ARRAY['unknown'::character varying, 'failed'::character varying])::text[]))`,
    };
    try {
      await ds.initialize();
      await migrate(ds); // CREATE INDEX CONCURRENTLY refuses to run in a transaction: this ran outside one
      expect(await ds.query<unknown[]>(index)).to.deep.equal([built]);

      // a build cut off half-way (here: a unique build meeting duplicates) leaves an INVALID index of that name
      await ds.query(`DROP INDEX deployments_attention_idx`);
      await ds.query(`DELETE FROM migrations WHERE name = 'AttentionIndex1765100000000'`);
      await ds.query(
        `INSERT INTO deployments (id, name, state, version, state_changed_at) SELECT gen_random_uuid(), 'd', 'failed', 1, now() FROM generate_series(1, 2)`,
      );
      const crash = await ds.query(`CREATE UNIQUE INDEX CONCURRENTLY deployments_attention_idx ON deployments (state)`).then(
        () => 'built',
        (err: Error) => err.message,
      );
      expect(crash).to.match(/could not create unique index/);
      expect(await ds.query<Array<{ valid: boolean }>>(index)).to.have.nested.property('[0].valid', false);

      expect((await migrate(ds)).ran).to.deep.equal(['AttentionIndex1765100000000']);
      expect(await ds.query<unknown[]>(index)).to.deep.equal([built]);
      // its session timeouts were reset: both pooled connections are back to the defaults
      const runners = [ds.createQueryRunner(), ds.createQueryRunner()];
      try {
        await Promise.all(runners.map((r) => r.connect()));
        for (const r of runners) {
          expect(await r.query(`SELECT current_setting('lock_timeout') AS l, current_setting('statement_timeout') AS s`)).to.deep.equal([
            { l: '0', s: '0' },
          ]);
        }
      } finally {
        await Promise.all(runners.map((r) => r.release()));
      }
    } finally {
      if (ds.isInitialized) await ds.destroy();
      await db.drop();
    }
  });

  it("build exactly the schema the entities declare: TypeORM's schema diff against a migrated database is empty", async () => {
    const db = await createDatabase();
    const ds = createDataSource({ url: db.url, poolSize: 2, statementTimeoutMs: 0 });
    try {
      await ds.initialize();
      await migrate(ds);
      const diff = async () => (await ds.driver.createSchemaBuilder().log()).upQueries.map((q) => q.query);
      expect(await diff()).to.deep.equal([]);

      // the diff sees drift: an entity that disagrees with the migrations (a column's length, a lost index) shows
      const name = ds.getMetadata(Deployment).findColumnWithPropertyName('name');
      if (name === undefined) throw new Error('no name column');
      name.length = '64';
      const indices = ds.getMetadata(Deployment).indices;
      const readySet = indices.findIndex((i) => i.name === 'deployments_ready_node_port_idx');
      const [dropped] = indices.splice(readySet, 1);
      const drift = await diff();
      name.length = '63';
      if (dropped !== undefined) indices.push(dropped);
      expect(drift.join('\n')).to.match(/ALTER TABLE "deployments" (ALTER COLUMN "name"|DROP COLUMN "name")/);
      expect(drift.join('\n')).to.include('DROP INDEX "public"."deployments_ready_node_port_idx"');
    } finally {
      if (ds.isInitialized) await ds.destroy();
      await db.drop();
    }
  });
});
