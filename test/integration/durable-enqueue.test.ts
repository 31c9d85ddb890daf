/**
 * Durable enqueue (docs/contract.md, "Durable enqueue"): with `durable`, an enqueue returns only once the job is on
 * a Redis replica (WAIT); when the replica does not answer in time it fails with `not_durable`, the job still on the
 * master, and a retry with the same eventId succeeds once the replica catches up. The HTTP intake answers 503.
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import IORedis from 'ioredis';
import { DurabilityError } from '../../src/errors';
import { LIFECYCLE_QUEUE, MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { OutboxRelay } from '../../src/streams/outbox-relay';
import { SWEEP_JOB_NAME, SweepWorker } from '../../src/workers/sweep-worker';
import { Sweeper, type ShardJobData } from '../../src/services/sweep/sweeper';
import { TransitionService } from '../../src/services/transitions';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testHttpServer } from '../helpers/http';
import { OwnRedis } from '../helpers/redis-server';
import { waitFor } from '../helpers/wait';

describe('durable enqueue: acknowledged only once a replica has the job', function () {
  this.timeout(30_000);
  let master: OwnRedis;
  let replica: OwnRedis;
  let admin: IORedis;
  let db: TestDatabase;
  const prefix = `durable${Date.now()}`;

  before(async () => {
    master = await OwnRedis.start();
    replica = await OwnRedis.start(['--replicaof', '127.0.0.1', String(master.port)]);
    admin = new IORedis(master.url, { maxRetriesPerRequest: null });
    await waitFor('the replica to be in sync', async () => ((await admin.info('replication')).includes('state=online') ? true : undefined));
    db = await openTestDatabase(4);
  });
  after(async () => {
    admin?.disconnect();
    await replica?.stop();
    await master?.stop();
    await db?.close();
  });

  const jobKey = (eventId: string) => `${prefix}:${LIFECYCLE_QUEUE}:${eventId}`;

  it('returns once the replica has the job; fails with not_durable (job on the master) while the replica is stuck; a retry succeeds after', async () => {
    const producer = new LifecycleProducer({ connection: master.url, prefix, durable: { replicas: 1, timeoutMs: 300 } });
    const onReplica = new IORedis(replica.url, { maxRetriesPerRequest: null });
    try {
      const first = await producer.createDeployment({ deploymentId: randomUUID(), name: 'web' });
      expect(await onReplica.exists(jobKey(first.jobId)), 'on the replica when acknowledged').to.equal(1);

      replica.pause(); // a replica that stopped answering: the write cannot reach it
      const deploymentId = randomUUID();
      const eventId = `deployment.create.${deploymentId}`;
      const err: unknown = await producer.createDeployment({ deploymentId, name: 'api', eventId }).then(
        () => expect.fail('acknowledged without a replica'),
        (e: unknown) => e,
      );
      expect(err).to.be.instanceOf(DurabilityError);
      expect(err).to.deep.include({ code: 'not_durable', eventId, replicas: 1, acknowledged: 0, timeoutMs: 300 });
      expect((err as Error).message).to.match(/retry with the same eventId/);
      expect(await admin.exists(jobKey(eventId)), 'the job is on the master').to.equal(1);

      replica.resume();
      const retried = await producer.createDeployment({ deploymentId, name: 'api', eventId });
      expect(retried).to.deep.include({ eventId, duplicate: true });
      expect(await onReplica.exists(jobKey(eventId))).to.equal(1);
    } finally {
      replica.resume();
      onReplica.disconnect();
      await producer.close();
    }
  });

  it('refuses a durable timeout the connection would cut short (its command timeout), naming the field', () => {
    expect(() => new LifecycleProducer({ connection: master.url, prefix, durable: { replicas: 1, timeoutMs: 4500 } })).to.throw(
      RangeError,
      /durable\.timeoutMs: .*commandTimeout \(5000 ms\)/,
    );
  });

  it('without durable, an enqueue does not wait for replicas (acknowledged while the replica is stuck)', async () => {
    const producer = new LifecycleProducer({ connection: master.url, prefix });
    replica.pause();
    try {
      const result = await producer.createDeployment({ deploymentId: randomUUID(), name: 'web' });
      expect(await admin.exists(jobKey(result.jobId))).to.equal(1);
    } finally {
      replica.resume();
      await producer.close();
    }
  });

  it('the HTTP intake answers 503 not_durable with the eventId to retry with', async () => {
    const producer = new LifecycleProducer({ connection: master.url, prefix, durable: { replicas: 1, timeoutMs: 300 } });
    const redis = new IORedis(master.url, { maxRetriesPerRequest: null });
    const maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix });
    const app = await testHttpServer({ prefix, dataSource: db.dataSource, producer, redis, maintenance });
    replica.pause();
    try {
      const deploymentId = randomUUID();
      const res = await app.inject({
        method: 'POST',
        url: '/api/events',
        payload: { name: 'deployment.create', data: { deploymentId, name: 'web' } },
      });
      expect(res.statusCode).to.equal(503);
      expect(res.headers['retry-after']).to.equal('1');
      const body = res.json<{ error: { code: string; eventId: string; replicas: number; acknowledged: number } }>();
      expect(body.error).to.deep.include({ code: 'not_durable', eventId: `deployment.create.${deploymentId}`, replicas: 1, acknowledged: 0 });
      replica.resume();
      const again = await app.inject({
        method: 'POST',
        url: '/api/events',
        payload: { name: 'deployment.create', data: { deploymentId, name: 'web', eventId: body.error.eventId } },
      });
      expect(again.statusCode).to.equal(202);
    } finally {
      replica.resume();
      await app.close();
      await maintenance.close();
      redis.disconnect();
      await producer.close();
    }
  });

  it('the relay marks rows published only once their stream entries are on the replica, and appends nothing more until then', async () => {
    const streamKey = `${prefix}:transitions`;
    const relay = new OutboxRelay({
      databaseUrl: db.url,
      redis: master.url,
      streamKey,
      durable: { replicas: 1, timeoutMs: 200 },
      pollIntervalMs: 50,
    });
    const service = new TransitionService({ dataSource: db.dataSource });
    const unpublished = async () =>
      Number((await db.dataSource.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM outbox WHERE published_at IS NULL`))[0]?.n);
    relay.start();
    try {
      await waitFor('the relay to lead', () => (relay.isLeader ? true : undefined));
      replica.pause();
      const first = randomUUID();
      await service.apply('deployment.create', { deploymentId: first, name: 'web', eventId: `deployment.create.${first}` });
      await waitFor('the entry on the master', async () => ((await admin.xlen(streamKey)) === 1 ? true : undefined));
      const second = randomUUID();
      await service.apply('deployment.create', { deploymentId: second, name: 'api', eventId: `deployment.create.${second}` });
      // several cycles go by: the first row stays unmarked and the second is not appended
      const waits = async () => Number((await admin.info('commandstats')).match(/cmdstat_wait:calls=(\d+)/)?.[1] ?? 0);
      const before = await waits();
      await waitFor('the relay to wait for the replica three more times', async () => ((await waits()) >= before + 3 ? true : undefined));
      expect(await unpublished()).to.equal(2);
      expect(await admin.xlen(streamKey)).to.equal(1);
      replica.resume();
      await waitFor('both rows published', async () => ((await unpublished()) === 0 ? true : undefined));
      const entries = await admin.xrange(streamKey, '-', '+');
      expect(entries.map(([, fields]) => fields[fields.indexOf('deploymentId') + 1])).to.deep.equal([first, second]);
    } finally {
      replica.resume();
      await relay.close();
    }
  });

  it('durable claims: a sweep tick whose claim does not reach the replica does not run (a failover could lose the claim and run it twice); once it does, it runs', async () => {
    const claimsPrefix = `${prefix}c`;
    const producer = new LifecycleProducer({ connection: master.url, prefix: claimsPrefix });
    const real = new Sweeper({ dataSource: db.dataSource, producer });
    const calls: string[] = [];
    const sweeper = {
      sweep: (tick?: string) => {
        calls.push(tick ?? '');
        return real.sweep(tick);
      },
      runShard: (data: ShardJobData) => real.runShard(data),
    };
    const worker = new SweepWorker({
      connection: master.url,
      prefix: claimsPrefix,
      sweeper,
      everyS: 3600,
      recheckEveryMs: 0,
      durable: { replicas: 1, timeoutMs: 300 },
    });
    const queue = new Queue(MAINTENANCE_QUEUE, { connection: admin, prefix: claimsPrefix });
    try {
      worker.worker.run().catch(() => undefined);
      replica.pause();
      const stuck = await queue.add(SWEEP_JOB_NAME, {}, { jobId: 'repeat:sweep:1000' });
      const first = await waitFor(
        'the tick with the replica stuck',
        async () => ((await queue.getJob(stuck.id ?? ''))?.returnvalue as { ran?: string } | undefined) ?? undefined,
      );
      expect(first).to.deep.equal({ tick: '1000', ran: 'unconfirmed' });
      expect(calls, 'the sweep did not run').to.deep.equal([]);

      replica.resume();
      const next = await queue.add(SWEEP_JOB_NAME, {}, { jobId: 'repeat:sweep:2000' });
      await waitFor('the tick with the replica back', async () => ((await queue.getJob(next.id ?? ''))?.finishedOn === undefined ? undefined : true));
      expect(calls).to.deep.equal(['2000']);
    } finally {
      replica.resume();
      await worker.close(1000);
      await queue.close();
      await producer.close();
    }
  });
});
