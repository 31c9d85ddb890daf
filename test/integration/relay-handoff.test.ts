/**
 * The write's hand-off to the relay of its process (issue 32): a write whose snapshot had no outbox row waiting for
 * the relay returns the rows it wrote, and the active relay in the same process appends them without reading them
 * back. Never ahead of an earlier version still waiting, never noted before a reconcile, never twice.
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { TransitionService, type TransitionHooks } from '../../src/services/transitions';
import { parseEntry } from '../../src/streams/consumer';
import { OutboxRelay } from '../../src/streams/outbox-relay';
import { forgetOutbox, openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

describe('the write hands its outbox rows to the relay of its process', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let redis: IORedis;
  let prefix: string;
  let streamKey: string;
  const closers: Array<() => Promise<void>> = [];

  before(async () => {
    db = await openTestDatabase(8);
    redis = testRedis();
  });
  after(async () => {
    redis.disconnect();
    await db?.close();
  });
  beforeEach(async () => {
    prefix = uniquePrefix();
    streamKey = `${prefix}:transitions`;
    // earlier tests' rows are neither pending nor traceable to this stream
    await forgetOutbox(db);
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    await dropPrefix(prefix);
  });

  /**
   * A leading relay that cycles only when woken (no polling, no mark on its own), and a service in its process that
   * wakes it directly and hands it its rows.
   */
  async function leadingRelay(hooks: TransitionHooks = {}): Promise<{ relay: OutboxRelay; service: TransitionService }> {
    const relay = new OutboxRelay({
      databaseUrl: db.url,
      redis: testEnv().redisUrl,
      streamKey,
      standbyRetryMs: 100,
      markDelayMs: 600_000,
      pollIntervalMs: 600_000,
    });
    closers.push(() => relay.close());
    relay.start();
    // its first cycle reconciles and reads: hand-offs go out once a read has found nothing
    await waitFor('the relay to lead and catch up', () => (relay.caughtUp ? true : undefined));
    return { relay, service: new TransitionService({ dataSource: db.dataSource, relay, hooks }) };
  }

  /** per deployment, the versions on the stream in stream order */
  async function versions(deploymentId: string): Promise<number[]> {
    const raw = await redis.xrange(streamKey, '-', '+');
    return raw.map(([id, fields]) => parseEntry(id, fields)).flatMap((e) => (e.deploymentId === deploymentId ? [e.version] : []));
  }

  async function unmarked(deploymentId: string): Promise<number> {
    const [row] = await db.dataSource.query<Array<{ n: string }>>(
      `SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND deployment_id = $1::uuid`,
      [deploymentId],
    );
    return Number(row?.n);
  }

  const create = (service: TransitionService, deploymentId: string) =>
    service.apply('deployment.create', { deploymentId, name: 'web' }, { fallbackEventId: randomUUID() });
  const teardown = (service: TransitionService, deploymentId: string) =>
    service.apply('deployment.teardown', { deploymentId }, { fallbackEventId: randomUUID() });

  it('appends a lone commit without reading it back; the next read carries its mark', async () => {
    const { relay, service } = await leadingRelay();
    const deploymentId = randomUUID();
    expect((await create(service, deploymentId)).outcome).to.equal('applied');
    await waitFor('its entry', async () => ((await versions(deploymentId)).length === 1 ? true : undefined));
    // the count goes up just after the append returns, a moment after the entry shows: wait for it
    await waitFor('the hand-off counted', () => (relay.handedOffCount >= 1 ? true : undefined));
    expect(relay.handedOffCount).to.equal(1);
    expect(await unmarked(deploymentId)).to.equal(1); // appended, its mark waits for a read

    // a second one: its write sees the first still unmarked, so the relay reads (and marks the first with it)
    await teardown(service, deploymentId);
    await waitFor('the second entry', async () => ((await versions(deploymentId)).length === 2 ? true : undefined));
    expect(relay.handedOffCount).to.equal(1);
    expect(await versions(deploymentId)).to.deep.equal([1, 2]);
    await relay.close();
    const entries = await redis.xrange(streamKey, '-', '+');
    const marked = await db.dataSource.query<Array<{ stream_id: string }>>(
      `SELECT stream_id FROM outbox WHERE deployment_id = $1::uuid ORDER BY id`,
      [deploymentId],
    );
    expect(marked.map((m) => m.stream_id)).to.deep.equal(entries.map(([id]) => id));
  });

  it('never hands over a version while an earlier one waits for the relay: the relay reads both, in order', async () => {
    const { relay, service } = await leadingRelay();
    // another process's commit whose wake-up is lost: its row waits for the relay's next read
    const elsewhere = new TransitionService({ dataSource: db.dataSource, relay: { isLeader: true, notifyCommitted: () => undefined } });
    const deploymentId = randomUUID();
    await create(elsewhere, deploymentId);
    expect(await unmarked(deploymentId)).to.equal(1);

    await teardown(service, deploymentId); // version 2, written while version 1 waits
    relay.notifyCommitted(); // one more cycle, whatever the first one did
    await waitFor('both entries', async () => ((await versions(deploymentId)).length >= 2 ? true : undefined));
    expect(await versions(deploymentId)).to.deep.equal([1, 2]);
    expect(relay.handedOffCount).to.equal(0);
  });

  it('after a reconcile, reads back what it unpublished before a hand-off goes out', async () => {
    let relay: OutboxRelay | null = null;
    let lose = false;
    const lock = db.dataSource.createQueryRunner();
    const hooks: TransitionHooks = {
      // committed, not handed over yet (its write saw version 1 marked): Redis loses version 1 and drops the relay's
      // connection; the relay's reconcile waits on the test's lock on version 1's row
      afterWrite: async () => {
        if (!lose || relay === null) return;
        lose = false;
        await redis.del(streamKey);
        const id = /id=(\d+) [^\n]*name=lifecycle-fleet-relay/.exec(String(await redis.client('LIST')))?.[1];
        expect(id, 'the relay connection').to.be.a('string');
        await redis.client('KILL', 'ID', id ?? '');
        await waitFor('the reconcile to wait on the lock', async () => {
          const waiting = await db.dataSource.query<unknown[]>(
            `SELECT 1 FROM pg_stat_activity WHERE application_name = 'lifecycle-fleet-relay' AND wait_event_type = 'Lock'`,
          );
          return waiting.length > 0 ? true : undefined;
        });
      },
    };
    try {
      const started = await leadingRelay(hooks);
      relay = started.relay;
      const r = relay;
      const deploymentId = randomUUID();
      await create(started.service, deploymentId);
      r.notifyCommitted(); // a read carries its mark
      await waitFor('version 1 marked', async () => ((await unmarked(deploymentId)) === 0 && r.caughtUp ? true : undefined));
      expect(r.handedOffCount).to.equal(1);

      await lock.startTransaction();
      await lock.query(`SELECT 1 FROM outbox WHERE deployment_id = $1::uuid FOR UPDATE`, [deploymentId]);
      lose = true;
      await teardown(started.service, deploymentId); // version 2, handed over while the reconcile waits
      await lock.commitTransaction();
      r.notifyCommitted(); // one more cycle, whatever the first one did
      await waitFor('both entries', async () => ((await versions(deploymentId)).length >= 2 ? true : undefined));
      expect(await versions(deploymentId)).to.deep.equal([1, 2]);
      expect(r.handedOffCount).to.equal(1);
    } finally {
      if (lock.isTransactionActive) await lock.rollbackTransaction();
      await lock.release();
    }
  });

  it('does not append twice what a read appended before the hand-off came', async () => {
    let relay: OutboxRelay | null = null;
    let first = true;
    const hooks: TransitionHooks = {
      // committed, not handed over yet: the relay reads the row and appends it
      afterWrite: async (event) => {
        if (!first || relay === null) return;
        first = false;
        relay.notifyCommitted();
        const { deploymentId } = event.data;
        await waitFor('the read to append it', async () => ((await versions(deploymentId)).length === 1 ? true : undefined));
      },
    };
    const started = await leadingRelay(hooks);
    relay = started.relay;
    const deploymentId = randomUUID();
    await create(started.service, deploymentId); // now handed over, after the read appended it
    // the read appended rows, so the next cycle reads too (to mark them), and drops what was handed over before it
    await waitFor('its mark', async () => ((await unmarked(deploymentId)) === 0 ? true : undefined));
    // the one after appends what the next write hands over: the first row is not among it again
    const other = randomUUID();
    await create(started.service, other);
    await waitFor("the other's entry", async () => ((await versions(other)).length === 1 ? true : undefined));
    await waitFor("the other's hand-off counted", () => (relay.handedOffCount >= 1 ? true : undefined));
    expect(await versions(deploymentId)).to.deep.equal([1]);
    expect(relay.handedOffCount).to.equal(1); // the other's
  });
  it('appends a hand-off only when nothing waits for its mark: the marks of the rows before it are kept', async () => {
    const { relay, service } = await leadingRelay();
    const [a, b] = [randomUUID(), randomUUID()];
    await create(service, a);
    relay.notifyCommitted(); // a read carries its mark
    await waitFor("a's mark", async () => ((await unmarked(a)) === 0 && relay.caughtUp ? true : undefined));

    // a's teardown takes its snapshot (nothing waits for the relay) and then waits on the test's lock on a's row
    const lock = db.dataSource.createQueryRunner();
    try {
      await lock.startTransaction();
      await lock.query(`SELECT 1 FROM deployments WHERE id = $1::uuid FOR UPDATE`, [a]);
      const tearing = teardown(service, a);
      await waitFor('the teardown to wait on the lock', async () => {
        const waiting = await db.dataSource.query<unknown[]>(
          `SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%UPDATE deployments%'`,
        );
        return waiting.length > 0 ? true : undefined;
      });
      // meanwhile b is handed over and appended: its mark waits
      await create(service, b);
      await waitFor("b's entry", async () => ((await versions(b)).length === 1 ? true : undefined));
      await waitFor("b's hand-off counted", () => (relay.handedOffCount >= 2 ? true : undefined));
      expect(relay.handedOffCount).to.equal(2);
      expect(await unmarked(b)).to.equal(1);
      // a's teardown commits and hands over too (its snapshot saw nothing waiting), while b's mark waits: a read
      await lock.commitTransaction();
      expect((await tearing).outcome).to.equal('applied');
    } finally {
      if (lock.isTransactionActive) await lock.rollbackTransaction();
      await lock.release();
    }
    await waitFor("a's second entry", async () => ((await versions(a)).length >= 2 ? true : undefined));
    relay.notifyCommitted(); // and one more cycle for the last mark
    await waitFor('every mark', async () => ((await unmarked(a)) + (await unmarked(b)) === 0 ? true : undefined));
    expect(await versions(a)).to.deep.equal([1, 2]);
    expect(await versions(b)).to.deep.equal([1]);
  });
});
