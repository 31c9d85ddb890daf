import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import type IORedis from 'ioredis';
import { loadConfig } from '../../src/config';
import { ValidationError } from '../../src/errors';
import { EVENT_SCHEMAS } from '../../src/events/schemas';
import { type HttpDeps } from '../../src/http/server';
import { FleetMetrics } from '../../src/metrics';
import { LIFECYCLE_QUEUE, MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { TransitionService } from '../../src/services/transitions';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';
import { testHttpServer } from '../helpers/http';

const NOW = new Date('2026-11-23T12:00:00.000Z');

describe('HTTP surface', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let prefix: string;
  let redis: IORedis;
  let producer: LifecycleProducer;
  let maintenance: Queue;
  let metrics: FleetMetrics;
  let service: TransitionService;
  let app: FastifyInstance;
  let clock: Date;

  async function build(env: Record<string, string> = {}, overrides: Partial<HttpDeps> = {}): Promise<FastifyInstance> {
    return testHttpServer(
      { prefix, dataSource: db.dataSource, producer, redis, maintenance },
      { FLEET_PUBLIC_ENDPOINT_URL: 'https://public.example.com', ...env },
      { metrics, now: () => clock, ...overrides },
    );
  }

  before(async () => {
    db = await openTestDatabase(8);
    service = new TransitionService({ dataSource: db.dataSource, now: () => clock });
  });
  after(async () => {
    await db?.close();
  });
  beforeEach(async () => {
    clock = NOW;
    prefix = uniquePrefix();
    redis = testRedis();
    producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix });
    metrics = new FleetMetrics({}, { defaultMetrics: false });
    app = await build();
  });
  afterEach(async () => {
    await app.close();
    await maintenance.close();
    await producer.close();
    redis.disconnect();
    await dropPrefix(prefix);
  });

  async function deployment(state: 'ready' | 'pending' = 'ready', endpoint?: { url: string; kind: string }): Promise<string> {
    const deploymentId = randomUUID();
    const attemptId = randomUUID();
    const e = (name: string, data: Record<string, unknown>) => service.apply(name, { deploymentId, ...data }, { fallbackEventId: randomUUID() });
    await e('deployment.create', { name: 'web' });
    await e('attempt.create', { attemptId });
    if (state === 'ready') {
      await e('attempt.start', { attemptId });
      await e('attempt.end', { attemptId, outcome: 'succeeded', ...(endpoint ? { endpoint } : {}) });
    }
    return deploymentId;
  }

  const json = (body: string) => JSON.parse(body) as Record<string, unknown>;

  describe('read API', () => {
    it('GET /api/deployments/:id: the deployment with its current attempt; 404 absent; 400 malformed', async () => {
      const id = await deployment('ready', { url: 'http://10.0.0.1:30000', kind: 'node_port' });
      const ok = await app.inject({ method: 'GET', url: `/api/deployments/${id}` });
      expect(ok.statusCode).to.equal(200);
      // stored as WHATWG URL normalises it
      expect(json(ok.body)).to.deep.include({ id, state: 'ready', version: 4, endpoint: { url: 'http://10.0.0.1:30000/', kind: 'node_port' } });
      expect(json(ok.body).currentAttempt).to.deep.include({ number: 1, status: 'succeeded' });

      const absent = await app.inject({ method: 'GET', url: `/api/deployments/${randomUUID()}` });
      expect(absent.statusCode).to.equal(404);
      expect(json(absent.body)).to.deep.nested.include({ 'error.code': 'not_found' });

      const bad = await app.inject({ method: 'GET', url: '/api/deployments/nope' });
      expect(bad.statusCode).to.equal(400);
      expect(json(bad.body)).to.deep.nested.include({ 'error.code': 'invalid_id' });
    });

    it('GET /api/deployments pages by cursor and filters by state', async () => {
      await db.dataSource.query(`TRUNCATE deployments, attempts, state_transitions, outbox, processed_events CASCADE`);
      const ready = await Promise.all(Array.from({ length: 5 }, () => deployment('ready')));
      const pending = await Promise.all(Array.from({ length: 3 }, () => deployment('pending')));
      const seen: string[] = [];
      let cursor: string | null = '';
      let pages = 0;
      while (cursor !== null) {
        const res = await app.inject({ method: 'GET', url: `/api/deployments?limit=3${cursor ? `&cursor=${cursor}` : ''}` });
        expect(res.statusCode).to.equal(200);
        const page = json(res.body) as { items: Array<{ id: string }>; nextCursor: string | null };
        seen.push(...page.items.map((d) => d.id));
        cursor = page.nextCursor;
        pages++;
      }
      expect(pages).to.equal(3);
      expect(seen).to.deep.equal([...ready, ...pending].sort());

      const onlyPending = json((await app.inject({ method: 'GET', url: '/api/deployments?state=pending' })).body) as { items: Array<{ id: string }> };
      expect(onlyPending.items.map((d) => d.id)).to.deep.equal([...pending].sort());

      for (const url of [
        '/api/deployments?state=sleeping',
        '/api/deployments?limit=0',
        '/api/deployments?limit=9999',
        '/api/deployments?cursor=xyz',
      ]) {
        const res = await app.inject({ method: 'GET', url });
        expect(res.statusCode, url).to.equal(400);
        expect(json(res.body)).to.deep.nested.include({ 'error.code': 'invalid_query' });
      }
    });

    it('GET attempts and transitions (afterVersion), 404 for an absent deployment', async () => {
      const id = await deployment('ready');
      const attempts = json((await app.inject({ method: 'GET', url: `/api/deployments/${id}/attempts` })).body) as { items: unknown[] };
      expect(attempts.items).to.have.length(1);
      const all = json((await app.inject({ method: 'GET', url: `/api/deployments/${id}/transitions` })).body) as {
        items: Array<{ version: number; to: string }>;
      };
      expect(all.items.map((t) => t.version)).to.deep.equal([1, 2, 3, 4]);
      const after2 = json((await app.inject({ method: 'GET', url: `/api/deployments/${id}/transitions?afterVersion=2&limit=1` })).body) as {
        items: Array<{ version: number; to: string }>;
        nextAfterVersion: number | null;
      };
      expect(after2.items.map((t) => [t.version, t.to])).to.deep.equal([[3, 'deploying']]);
      expect(after2.nextAfterVersion).to.equal(3);
      for (const url of [`/api/deployments/${randomUUID()}/attempts`, `/api/deployments/${randomUUID()}/transitions`]) {
        expect((await app.inject({ method: 'GET', url })).statusCode).to.equal(404);
      }
      expect((await app.inject({ method: 'GET', url: `/api/deployments/${id}/transitions?afterVersion=-1` })).statusCode).to.equal(400);
    });
  });

  describe('dispatch', () => {
    it('serves the private endpoint while the heartbeat is fresh, then the public one; counts answers', async () => {
      const id = await deployment('ready', { url: 'http://10.0.0.1:30000', kind: 'node_port' });
      const ask = async () => json((await app.inject({ method: 'GET', url: `/api/deployments/${id}/endpoint` })).body);
      expect(await ask()).to.deep.equal({ url: 'http://10.0.0.1:30000/', source: 'private', reason: 'ready_heartbeat_fresh' });
      clock = new Date(NOW.getTime() + 121_000);
      expect(await ask()).to.deep.equal({ url: 'https://public.example.com', source: 'public', reason: 'ready_heartbeat_stale' });
      expect(await metrics.text()).to.contain('fleet_dispatch_total{source="public",reason="ready_heartbeat_stale"} 1');

      await app.close();
      app = await build({ FLEET_PUBLIC_ENDPOINT_URL: '' });
      expect(await ask()).to.deep.equal({ url: null, source: 'none', reason: 'ready_heartbeat_stale' });
      expect((await app.inject({ method: 'GET', url: `/api/deployments/${randomUUID()}/endpoint` })).statusCode).to.equal(404);
    });
  });

  describe('POST /api/events', () => {
    it('validates and enqueues: 202 with the eventId, the job on the queue', async () => {
      const deploymentId = randomUUID();
      const res = await app.inject({
        method: 'POST',
        url: '/api/events',
        payload: { name: 'deployment.create', data: { deploymentId, name: 'web' } },
      });
      expect(res.statusCode).to.equal(202);
      expect(json(res.body)).to.deep.equal({
        name: 'deployment.create',
        eventId: `deployment.create.${deploymentId}`,
        jobId: `deployment.create.${deploymentId}`,
        duplicate: false,
      });
      const job = await producer.queue.getJob(`deployment.create.${deploymentId}`);
      expect(job?.data).to.deep.equal({ deploymentId, name: 'web', eventId: `deployment.create.${deploymentId}`, actor: 'anonymous' });
    });

    it('parses a payload once: the intake validates it and the producer enqueues it as validated (issue 30)', async () => {
      // every parse of a deployment.create payload goes through its schema's safeParse: count them
      const schema = EVENT_SCHEMAS['deployment.create'];
      let parses = 0;
      const safeParse = schema.safeParse.bind(schema);
      schema.safeParse = (...args) => {
        parses++;
        return safeParse(...args);
      };
      try {
        const res = await app.inject({
          method: 'POST',
          url: '/api/events',
          payload: { name: 'deployment.create', data: { deploymentId: randomUUID(), name: 'web' } },
        });
        expect(res.statusCode).to.equal(202);
        expect(parses, 'schema parses for one POST /api/events').to.equal(1);
        // the SDK still validates what it is given, once
        parses = 0;
        await producer.createDeployment({ deploymentId: randomUUID(), name: 'web' });
        expect(parses, 'schema parses for one producer.createDeployment').to.equal(1);
        const refused = await producer.enqueue('deployment.create', { deploymentId: 'x', name: 'web' }).catch((err: unknown) => err);
        expect(refused).to.be.instanceOf(ValidationError);
      } finally {
        delete (schema as { safeParse?: unknown }).safeParse; // the prototype's again
      }
    });

    const bad: Array<[string, unknown, number, string, string]> = [
      ['a bad field', { name: 'attempt.start', data: { deploymentId: 'x', attemptId: randomUUID() } }, 400, 'invalid_payload', 'deploymentId'],
      ['an unknown event', { name: 'deployment.explode', data: {} }, 400, 'unknown_event', 'name'],
      ['a missing name', { data: {} }, 400, 'invalid_body', 'name'],
      ['a missing data', { name: 'deployment.create' }, 400, 'invalid_body', 'data'],
      ['an extra field', { name: 'deployment.create', data: {}, extra: 1 }, 400, 'invalid_body', '(root)'],
      ['an array body', [1, 2], 400, 'invalid_body', '(root)'],
      [
        'an unknown payload field',
        { name: 'deployment.teardown', data: { deploymentId: randomUUID(), please: true } },
        400,
        'invalid_payload',
        '(root)',
      ],
    ];
    for (const [label, payload, status, code, field] of bad) {
      it(`refuses ${label}: ${status} ${code} naming ${field}, enqueues nothing`, async () => {
        const res = await app.inject({ method: 'POST', url: '/api/events', payload: payload as object });
        expect(res.statusCode).to.equal(status);
        const body = json(res.body) as { error: { code: string; issues?: Array<{ field: string }> } };
        expect(body.error.code).to.equal(code);
        expect(body.error.issues?.map((i) => i.field)).to.include(field);
        expect(await producer.queue.count()).to.equal(0);
      });
    }

    it('refuses prototype-pollution keys, bodies over the limit and non-JSON', async () => {
      const polluted = await app.inject({
        method: 'POST',
        url: '/api/events',
        headers: { 'content-type': 'application/json' },
        payload: '{"name":"deployment.create","data":{"__proto__":{"admin":true}}}',
      });
      expect(polluted.statusCode).to.equal(400);
      const huge = await app.inject({ method: 'POST', url: '/api/events', payload: { name: 'x', data: 'y'.repeat(100_000) } });
      expect(huge.statusCode).to.equal(413);
      const text = await app.inject({ method: 'POST', url: '/api/events', headers: { 'content-type': 'application/json' }, payload: '{nope' });
      expect(text.statusCode).to.equal(400);
      expect(json(text.body)).to.have.property('error');
      expect(({} as Record<string, unknown>).admin).to.equal(undefined);
      expect(await producer.queue.count()).to.equal(0);
    });
  });

  describe('health, readiness, metrics', () => {
    it('/healthz answers; /readyz checks Redis, PostgreSQL and migrations', async () => {
      expect(json((await app.inject({ method: 'GET', url: '/healthz' })).body)).to.deep.equal({ status: 'ok' });
      const ready = await app.inject({ method: 'GET', url: '/readyz' });
      expect(ready.statusCode).to.equal(200);
      expect(json(ready.body)).to.deep.equal({ status: 'ok', checks: { redis: 'ok', postgres: 'ok', migrations: 'ok' } });

      const deadRedis = new (await import('ioredis')).default('redis://127.0.0.1:1', {
        lazyConnect: true,
        maxRetriesPerRequest: 0,
        retryStrategy: () => null,
      });
      deadRedis.on('error', () => undefined);
      const unmigrated = await openTestDatabase(2);
      await unmigrated.dataSource.query(`DELETE FROM migrations`);
      const broken = await build({}, { redis: deadRedis, dataSource: unmigrated.dataSource });
      try {
        const res = await broken.inject({ method: 'GET', url: '/readyz' });
        expect(res.statusCode).to.equal(503);
        const body = json(res.body) as { checks: Record<string, string> };
        expect(body.checks.redis).to.equal('failing');
        expect(body.checks.migrations).to.equal('failing');
        expect(body.checks.postgres).to.equal('ok');
      } finally {
        await broken.close();
        deadRedis.disconnect();
        await unmigrated.close();
      }
    });

    it('/metrics is Prometheus text, and the transition counter matches the database after a workload', async () => {
      const counted = new FleetMetrics({
        queueCounts: async () => ({ [LIFECYCLE_QUEUE]: await producer.queue.getJobCounts('waiting', 'completed') }),
      });
      await app.close();
      app = await build({}, { metrics: counted });
      const worker = new LifecycleWorker({
        connection: testEnv().redisUrl,
        prefix,
        service: new TransitionService({ dataSource: db.dataSource }),
        onJob: (r) => counted.job(r),
      });
      try {
        const ids = Array.from({ length: 10 }, () => ({ deploymentId: randomUUID(), attemptId: randomUUID() }));
        for (const { deploymentId, attemptId } of ids) {
          await producer.createDeployment({ deploymentId, name: 'web' });
          await producer.createAttempt({ deploymentId, attemptId });
          await producer.startAttempt({ deploymentId, attemptId });
          await producer.endAttempt({ deploymentId, attemptId, outcome: 'failed' });
        }
        await waitFor('40 jobs', async () => ((await producer.queue.getJobCounts('completed')).completed === 40 ? true : undefined));
        const [row] = await db.dataSource.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM state_transitions WHERE deployment_id = ANY($1)`, [
          ids.map((i) => i.deploymentId),
        ]);
        const res = await app.inject({ method: 'GET', url: '/metrics' });
        expect(res.statusCode).to.equal(200);
        expect(res.headers['content-type']).to.match(/^text\/plain/);
        const samples = parsePrometheus(res.body);
        const transitions = samples.filter((s) => s.name === 'fleet_transitions_total').reduce((sum, s) => sum + s.value, 0);
        expect(transitions).to.equal(Number(row?.n));
        expect(samples.find((s) => s.name === 'fleet_queue_jobs' && s.labels.state === 'completed')?.value).to.equal(40);
        expect(samples.some((s) => s.name === 'fleet_process_resident_memory_bytes')).to.equal(true);
        expect(samples.filter((s) => s.name === 'fleet_job_duration_seconds_count').reduce((sum, s) => sum + s.value, 0)).to.be.at.least(40);
      } finally {
        await worker.close();
      }
    });
  });

  describe('Bull Board', () => {
    it('asks for the credentials when they are set', async () => {
      await app.close();
      app = await build({ FLEET_BOARD_USER: 'ops', FLEET_BOARD_PASSWORD: 's3cret' });
      const anonymous = await app.inject({ method: 'GET', url: '/admin/queues' });
      expect(anonymous.statusCode).to.equal(401);
      expect(anonymous.headers['www-authenticate']).to.match(/^Basic /);
      const wrong = await app.inject({
        method: 'GET',
        url: '/admin/queues',
        headers: { authorization: `Basic ${Buffer.from('ops:nope').toString('base64')}` },
      });
      expect(wrong.statusCode).to.equal(401);
      const auth = { authorization: `Basic ${Buffer.from('ops:s3cret').toString('base64')}` };
      expect((await app.inject({ method: 'GET', url: '/admin/queues', headers: auth })).statusCode).to.equal(200);
      const queues = await app.inject({ method: 'GET', url: '/admin/queues/api/queues', headers: auth });
      expect(queues.statusCode).to.equal(200);
      const names = (json(queues.body) as { queues: Array<{ name: string; readOnlyMode: boolean }> }).queues;
      expect(names.map((q) => q.name).sort()).to.deep.equal([LIFECYCLE_QUEUE, MAINTENANCE_QUEUE]);
      expect(names.every((q) => !q.readOnlyMode)).to.equal(true);
      const mutate = await app.inject({ method: 'PUT', url: `/admin/queues/api/queues/${LIFECYCLE_QUEUE}/pause` });
      expect(mutate.statusCode).to.equal(401);
    });

    it('is read-only without credentials: mutating routes are refused', async () => {
      expect((await app.inject({ method: 'GET', url: '/admin/queues' })).statusCode).to.equal(200);
      const queues = json((await app.inject({ method: 'GET', url: '/admin/queues/api/queues' })).body) as {
        queues: Array<{ readOnlyMode: boolean }>;
      };
      expect(queues.queues.every((q) => q.readOnlyMode)).to.equal(true);
      for (const [method, url] of [
        ['PUT', `/admin/queues/api/queues/${LIFECYCLE_QUEUE}/pause`],
        ['PUT', `/admin/queues/api/queues/${LIFECYCLE_QUEUE}/clean/failed`],
        ['PUT', `/admin/queues/api/queues/${LIFECYCLE_QUEUE}/obliterate`],
        ['POST', `/admin/queues/api/queues/${LIFECYCLE_QUEUE}/add`],
        ['PUT', `/admin/queues/api/queues/${MAINTENANCE_QUEUE}/job-schedulers/sweep/remove`],
        ['PATCH', `/admin/queues/api/queues/${LIFECYCLE_QUEUE}/some-job/update-data`],
      ] as const) {
        const res = await app.inject({ method, url });
        expect(res.statusCode, `${method} ${url}`).to.equal(403);
      }
      expect(await producer.queue.isPaused()).to.equal(false);
    });

    it('refuses to configure a non-loopback host without credentials', () => {
      expect(() => loadConfig({ FLEET_HTTP_HOST: '0.0.0.0' })).to.throw(/required when FLEET_HTTP_HOST is not loopback/);
    });
  });
});

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** A strict reader of the Prometheus text format: every line is a comment, blank, or a well-formed sample. */
function parsePrometheus(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('# HELP ') || line.startsWith('# TYPE ')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (-?[0-9.e+-]+|NaN|\+Inf|-Inf)( \d+)?$/.exec(line);
    if (m === null) throw new Error(`not Prometheus text: ${line}`);
    const labels: Record<string, string> = {};
    for (const pair of (m[3] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1] ?? ''] = pair[2] ?? '';
    samples.push({ name: m[1] ?? '', labels, value: Number(m[4]) });
  }
  return samples;
}
