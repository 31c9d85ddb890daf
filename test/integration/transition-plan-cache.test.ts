/**
 * The transition statements' plans (src/entities/sql/row-sets.ts, transitions.ts): the snapshot's keys and the
 * write's row sets come as jsonb, whose length the planner cannot see, so a connection keeps one generic plan of
 * each instead of planning every lone event's statements afresh (arrays of one were costed below a generic plan, and
 * each call was planned again).
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import type { DataSource } from 'typeorm';
import { createDataSource } from '../../ormconfig';
import { TRANSITION_SQL } from '../../src/entities/sql';
import { TransitionService } from '../../src/services/transitions';
import { openTestDatabase, type TestDatabase } from '../helpers/db';

describe('transition statements: one generic plan per connection (PostgreSQL)', () => {
  let db: TestDatabase;
  let one: DataSource;

  before(async () => {
    db = await openTestDatabase(2);
    // one connection, so every statement below runs on the session whose prepared statements are read
    one = createDataSource({ url: db.url, poolSize: 1, applicationName: 'lifecycle-fleet-test' });
    await one.initialize();
  });
  after(async () => {
    if (one?.isInitialized) await one.destroy();
    await db?.close();
  });

  it('keeps a generic plan of the snapshot read and of the write after 20 lone events, one text each', async () => {
    const clock = new Date('2026-12-02T12:00:00.000Z');
    const service = new TransitionService({ dataSource: one, now: () => clock });
    // PostgreSQL tries a generic plan from a prepared statement's sixth run on a connection; each lone event here
    // reads one snapshot and writes once, with row sets of every shape (inserts, updates, new and changed attempts)
    for (let d = 0; d < 5; d++) {
      const deploymentId = randomUUID();
      const attemptId = randomUUID();
      const results = [
        await service.apply('deployment.create', { deploymentId, name: `web-${d}`, eventId: `c-${d}` }),
        await service.apply('attempt.create', { deploymentId, attemptId, eventId: `a-${d}` }),
        await service.apply('attempt.start', { deploymentId, attemptId, eventId: `s-${d}` }),
        await service.apply('attempt.end', { deploymentId, attemptId, outcome: 'succeeded', eventId: `e-${d}` }),
      ];
      expect(results.map((r) => r.outcome)).to.deep.equal(['applied', 'applied', 'applied', 'applied']);
    }

    const prepared = await one.query<Array<{ name: string; statement: string; generic_plans: string; custom_plans: string }>>(
      `SELECT name, statement, generic_plans, custom_plans FROM pg_prepared_statements`,
    );
    const plans = (text: string) =>
      prepared
        .filter((p) => p.statement.includes(text))
        .map((p) => ({ name: p.name, generic: Number(p.generic_plans), custom: Number(p.custom_plans) }));
    const snapshot = plans('FROM processed_events WHERE event_id = k.event_id');
    const write = plans('INSERT INTO outbox');
    expect(snapshot, 'the snapshot read: one prepared statement').to.have.length(1);
    expect(write, 'the write: one prepared statement (one fixed text)').to.have.length(1);
    expect(snapshot[0]?.name).to.equal(TRANSITION_SQL.snapshot.name);
    expect(write[0]?.name).to.equal(TRANSITION_SQL.write.name);
    expect(snapshot[0]?.generic, `the snapshot read's generic plans (${JSON.stringify(snapshot)})`).to.be.above(0);
    expect(write[0]?.generic, `the write's generic plans (${JSON.stringify(write)})`).to.be.above(0);
  });
});
