/**
 * Outages as a client meets them (issue 15): the HTTP intake when Redis does not answer.
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import { loadConfig } from '../../src/config';
import { buildHttpServer } from '../../src/http/server';
import { silentLogger } from '../../src/log';
import { FleetMetrics } from '../../src/metrics';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { createRedis } from '../../src/queues/redis';
import { TransitionService } from '../../src/services/transitions';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { OwnRedis } from '../helpers/redis-server';
import { uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

describe('outages: the HTTP intake when Redis does not answer', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let own: OwnRedis;

  before(async () => {
    db = await openTestDatabase(8);
    own = await OwnRedis.start();
  });
  after(async () => {
    await own?.stop();
    await db?.close();
  });

  it('answers 503 with Retry-After and the eventId to retry with; the retry with that id applies the event exactly once', async () => {
    const prefix = uniquePrefix();
    const producer = new LifecycleProducer({ connection: own.url, prefix });
    const redis = createRedis(own.url, 'worker');
    const maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix });
    const app: FastifyInstance = await buildHttpServer({
      config: loadConfig({ FLEET_PREFIX: prefix }),
      dataSource: db.dataSource,
      producer,
      redis,
      queues: [producer.queue, maintenance],
      metrics: new FleetMetrics({}, { defaultMetrics: false }),
      logger: silentLogger,
    });
    const service = new TransitionService({ dataSource: db.dataSource });
    const deploymentId = randomUUID();
    await service.apply('deployment.create', { deploymentId, name: 'web', eventId: `c-${deploymentId}` });
    // a teardown without an eventId gets a random one: a blind retry would be another event
    const body = { name: 'deployment.teardown', data: { deploymentId } };
    let worker: LifecycleWorker | undefined;
    try {
      await producer.queue.waitUntilReady();
      own.pause();
      const first = await app.inject({ method: 'POST', url: '/api/events', payload: body });
      own.resume();
      expect(first.statusCode, first.body).to.equal(503);
      expect(first.headers['retry-after']).to.equal('5');
      const error = first.json<{ error: { code: string; message: string; eventId: string } }>().error;
      expect(error.code).to.equal('unavailable');
      expect(error.eventId).to.match(/^deployment\.teardown\.[0-9a-f-]{36}$/);
      expect(error.message).to.include(error.eventId).and.include('at most once');

      // the paused server ran the first add when it woke; the retry with the returned id is the same job
      const retry = await app.inject({ method: 'POST', url: '/api/events', payload: { ...body, data: { ...body.data, eventId: error.eventId } } });
      expect(retry.statusCode, retry.body).to.equal(202);
      expect(retry.json()).to.include({ eventId: error.eventId });

      worker = new LifecycleWorker({ connection: own.url, prefix, service });
      await waitFor('the teardown applied', async () => {
        const rows = await db.dataSource.query<Array<{ n: string }>>(
          `SELECT count(*) AS n FROM state_transitions WHERE deployment_id = $1 AND reason = 'torn_down'`,
          [deploymentId],
        );
        return Number(rows[0]?.n) > 0 ? true : undefined;
      });
      await waitFor('the queue drained', async () => ((await producer.queue.getJobCountByTypes('wait', 'active', 'delayed')) === 0 ? true : undefined));
      const teardowns = await db.dataSource.query<Array<{ event_id: string }>>(
        `SELECT event_id FROM state_transitions WHERE deployment_id = $1 AND version > 1`,
        [deploymentId],
      );
      expect(teardowns.map((t) => t.event_id)).to.deep.equal([error.eventId]); // applied once, under the returned id
    } finally {
      own.resume();
      await worker?.close();
      await app.close();
      await maintenance.close();
      await producer.close();
      redis.disconnect();
    }
  });
});
