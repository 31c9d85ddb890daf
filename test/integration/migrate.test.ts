import { expect } from 'chai';
import { createDataSource } from '../../ormconfig';
import { MIGRATIONS } from '../../src/entities';
import { migrate, migrationsApplied } from '../../src/entities/migrate';
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
});
