/**
 * The front door over real Redis and PostgreSQL (issue 12): scoped tokens on every route, the board, limits, the
 * actor, and each abuse reproduced in the issue, now failing safely.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type { FastifyInstance, InjectOptions } from 'fastify';
import type IORedis from 'ioredis';
import { EventIdConflictError } from '../../src/errors';
import { AuthThrottle } from '../../src/http/auth';
import { type HttpDeps } from '../../src/http/server';
import { createToken, TokenStore } from '../../src/http/tokens';
import { LIFECYCLE_QUEUE, MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { Sweeper } from '../../src/services/sweep/sweeper';
import { TransitionService } from '../../src/services/transitions';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { parseEndpointAllowList } from '../../src/events/endpoint-allow';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { ReadyServer } from '../helpers/ready-server';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';
import { testHttpServer } from '../helpers/http';
import { createLogger } from '../../src/log';

const NOW = new Date('2026-11-23T12:00:00.000Z');

describe('front door: tokens, scopes, limits, actor', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let prefix: string;
  let redis: IORedis;
  let producer: LifecycleProducer;
  let maintenance: Queue;
  let service: TransitionService;
  let app: FastifyInstance;
  let dir: string;
  let tokensFile: string;
  const tokens = {
    reader: createToken('reader', ['read']),
    writer: createToken('writer', ['read', 'events:write']),
    admin: createToken('ops-admin', ['read', 'events:admin']),
    boarder: createToken('boarder', ['board']),
    pusher: createToken('pusher', ['events:write']),
  };
  const bearer = (t: keyof typeof tokens) => ({ authorization: `Bearer ${tokens[t].token}` });
  const WRONG = { authorization: `Bearer ${createToken('nobody', ['read']).token}` };

  async function build(env: Record<string, string> = {}, overrides: Partial<HttpDeps> = {}): Promise<FastifyInstance> {
    return testHttpServer(
      { prefix, dataSource: db.dataSource, producer, redis, maintenance },
      { FLEET_API_TOKENS_FILE: tokensFile, FLEET_BOARD_USER: 'ops', FLEET_BOARD_PASSWORD: 'board-password-1', ...env },
      // the matrix sends many wrong tokens from one address: the throttle has its own test
      { now: () => NOW, authThrottle: new AuthThrottle(10_000), ...overrides },
    );
  }

  before(async () => {
    db = await openTestDatabase(8);
    service = new TransitionService({ dataSource: db.dataSource, now: () => NOW });
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'front-door-'));
    tokensFile = path.join(dir, 'tokens.json');
    fs.writeFileSync(tokensFile, JSON.stringify(Object.values(tokens).map((t) => t.entry)), { mode: 0o600 });
  });
  after(async () => {
    await db?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    prefix = uniquePrefix();
    redis = testRedis();
    producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix });
    app = await build();
  });
  afterEach(async () => {
    await app.close();
    await maintenance.close();
    await producer.close();
    redis.disconnect();
    await dropPrefix(prefix);
  });

  async function readyDeployment(endpointUrl = 'http://10.0.0.1:30000'): Promise<{ deploymentId: string; attemptId: string }> {
    const deploymentId = randomUUID();
    const attemptId = randomUUID();
    const e = (name: string, data: Record<string, unknown>) => service.apply(name, { deploymentId, ...data }, { fallbackEventId: randomUUID() });
    await e('deployment.create', { name: 'web' });
    await e('attempt.create', { attemptId });
    await e('attempt.start', { attemptId });
    await e('attempt.end', { attemptId, outcome: 'succeeded', endpoint: { url: endpointUrl, kind: 'node_port' } });
    return { deploymentId, attemptId };
  }

  const json = (body: string) =>
    JSON.parse(body) as { error?: { code: string; message: string; existing?: unknown; issues?: Array<{ field: string }> } } & Record<
      string,
      unknown
    >;
  const post = (name: string, data: Record<string, unknown>, headers: Record<string, string>) =>
    app.inject({ method: 'POST', url: '/api/events', headers, payload: { name, data } });

  describe('every route x {no token, wrong token, token without the scope, token with it}', () => {
    type Row = { route: string; request: () => Promise<InjectOptions>; scope: string; lacking: keyof typeof tokens; having: keyof typeof tokens };
    const deploymentRoute = (suffix: string) => async (): Promise<InjectOptions> => ({
      method: 'GET',
      url: `/api/deployments/${(await readyDeployment()).deploymentId}${suffix}`,
    });
    const event =
      (name: string, data: (ids: { deploymentId: string; attemptId: string }) => Record<string, unknown>) => async (): Promise<InjectOptions> => {
        const ids = await readyDeployment();
        return { method: 'POST', url: '/api/events', payload: { name, data: { deploymentId: ids.deploymentId, ...data(ids) } } };
      };
    const rows: Row[] = [
      { route: 'GET /api/deployments/:id', request: deploymentRoute(''), scope: 'read', lacking: 'boarder', having: 'reader' },
      {
        route: 'GET /api/deployments',
        request: async () => ({ method: 'GET', url: '/api/deployments?limit=1' }),
        scope: 'read',
        lacking: 'boarder',
        having: 'reader',
      },
      { route: 'GET /api/deployments/:id/attempts', request: deploymentRoute('/attempts'), scope: 'read', lacking: 'boarder', having: 'reader' },
      {
        route: 'GET /api/deployments/:id/transitions',
        request: deploymentRoute('/transitions'),
        scope: 'read',
        lacking: 'boarder',
        having: 'reader',
      },
      { route: 'GET /api/deployments/:id/endpoint', request: deploymentRoute('/endpoint'), scope: 'read', lacking: 'boarder', having: 'reader' },
      {
        // a stream that ends by itself with the token: a Last-Event-ID that is no cursor is answered with a resync
        route: 'GET /api/watch',
        request: async () => ({ method: 'GET', url: '/api/watch', headers: { 'last-event-id': 'not-a-cursor' } }),
        scope: 'read',
        lacking: 'boarder',
        having: 'reader',
      },
      {
        route: 'GET /api/nowhere (no probing of routes)',
        request: async () => ({ method: 'GET', url: '/api/nowhere' }),
        scope: 'read',
        lacking: 'boarder',
        having: 'reader',
      },
      {
        route: 'POST /api/events attempt.heartbeat',
        request: event('attempt.heartbeat', (i) => ({ attemptId: i.attemptId })),
        scope: 'events:write',
        lacking: 'reader',
        having: 'writer',
      },
      {
        route: 'POST /api/events deployment.teardown',
        request: event('deployment.teardown', () => ({})),
        scope: 'events:write',
        lacking: 'reader',
        having: 'writer',
      },
      {
        route: 'POST /api/events deployment.teardown force',
        request: event('deployment.teardown', () => ({ force: true })),
        scope: 'events:admin',
        lacking: 'writer',
        having: 'admin',
      },
      {
        route: 'POST /api/events deployment.resolve',
        request: event('deployment.resolve', () => ({ outcome: 'ready' })),
        scope: 'events:admin',
        lacking: 'writer',
        having: 'admin',
      },
      {
        route: 'POST /api/events attempt.orphaned',
        request: event('attempt.orphaned', (i) => ({ attemptId: i.attemptId })),
        scope: 'events:admin',
        lacking: 'writer',
        having: 'admin',
      },
      {
        route: 'POST /api/events attempt.expired',
        request: event('attempt.expired', (i) => ({ attemptId: i.attemptId })),
        scope: 'events:admin',
        lacking: 'writer',
        having: 'admin',
      },
      {
        route: 'GET /metrics (FLEET_METRICS_AUTH=read)',
        request: async () => ({ method: 'GET', url: '/metrics' }),
        scope: 'read',
        lacking: 'pusher',
        having: 'reader',
      },
      {
        route: 'GET /admin/queues (board, read)',
        request: async () => ({ method: 'GET', url: '/admin/queues/api/queues' }),
        scope: 'read',
        lacking: 'pusher',
        having: 'reader',
      },
      {
        route: 'PUT /admin/queues/.../pause (board write)',
        request: async () => ({ method: 'PUT', url: `/admin/queues/api/queues/${LIFECYCLE_QUEUE}/pause` }),
        scope: 'board',
        lacking: 'reader',
        having: 'boarder',
      },
    ];
    for (const row of rows) {
      it(row.route, async () => {
        await app.close();
        app = await build({ FLEET_METRICS_AUTH: 'read' });
        const base = await row.request();
        const send = (headers: Record<string, string>) =>
          app.inject({ ...base, headers: { ...(base.headers as Record<string, string>), ...headers } });
        const jobsBefore = await producer.queue.count();

        const none = await send({});
        expect(none.statusCode, 'no token').to.equal(401);
        expect(json(none.body).error?.code).to.equal('unauthorized');
        expect(none.headers['www-authenticate']).to.match(row.route.includes('/admin/') ? /^Basic / : /^Bearer /);
        const wrong = await send(WRONG);
        expect(wrong.statusCode, 'wrong token').to.equal(401);
        const lacking = await send(bearer(row.lacking));
        expect(lacking.statusCode, `a token without ${row.scope}`).to.equal(403);
        expect(json(lacking.body).error).to.deep.include({ code: 'forbidden' });
        expect(json(lacking.body).error?.message).to.contain(row.scope);
        // nothing was enqueued, paused or changed by the refused requests
        expect(await producer.queue.count()).to.equal(jobsBefore);
        expect(await producer.queue.isPaused()).to.equal(false);

        const having = await send(bearer(row.having));
        expect(having.statusCode, `a token with ${row.scope}: ${having.body.slice(0, 200)}`).to.be.oneOf(
          row.route.includes('nowhere') ? [404] : [200, 202],
        );
        if (row.route.startsWith('POST')) expect(await producer.queue.count()).to.equal(jobsBefore + 1);
        if (row.route.includes('pause')) expect(await producer.queue.isPaused()).to.equal(true);
      });
    }

    it('decides by the route that matched, not the URL text: encoded, absolute-form and odd targets need a token too', async () => {
      await app.close();
      app = await build({ FLEET_METRICS_AUTH: 'read' });
      await app.listen({ host: '127.0.0.1', port: 0 });
      const { port } = app.server.address() as { port: number };
      const { deploymentId } = await readyDeployment();
      // raw HTTP/1.1, so that the request target reaches the server exactly as written
      const raw = (target: string, method = 'GET', body = '') =>
        new Promise<number>((resolve, reject) => {
          const socket = net.connect(port, '127.0.0.1', () => {
            socket.write(
              `${method} ${target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
            );
          });
          let text = '';
          socket.on('data', (c: Buffer) => (text += c.toString()));
          socket.on('end', () => resolve(Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1] ?? 0)));
          socket.on('error', reject);
        });
      const resolve = JSON.stringify({ name: 'deployment.resolve', data: { deploymentId, outcome: 'failed' } });
      for (const [method, target, body] of [
        ['POST', '/%61pi/events', resolve],
        ['POST', '/ap%69/events', resolve],
        ['POST', 'http://x/api/events', resolve],
        ['GET', `/%61pi/deployments/${deploymentId}`, ''],
        ['GET', 'http://x/api/deployments', ''],
        ['GET', '*api/deployments', ''],
        ['GET', '/%6detrics', ''],
        ['GET', '/api/deployments/', ''],
        ['GET', '/api/deployments?x=/healthz', ''],
        ['GET', '/%61pi/nowhere', ''],
      ] as const) {
        const status = await raw(target, method, body);
        expect([401, 400, 404], `${method} ${target} -> ${status}`).to.include(status);
      }
      expect(await producer.queue.count()).to.equal(0);
    });

    it('/healthz and /readyz stay open; /metrics is open unless FLEET_METRICS_AUTH=read', async () => {
      for (const url of ['/healthz', '/readyz', '/metrics']) expect((await app.inject({ method: 'GET', url })).statusCode, url).to.equal(200);
    });
  });

  describe('Bull Board', () => {
    it('takes its basic-auth pair, or a token as bearer or as the basic password; a read token sees it read-only', async () => {
      const basic = (pair: string) => ({ authorization: `bAsIc ${Buffer.from(pair).toString('base64')}` });
      const pairQueues = await app.inject({ method: 'GET', url: '/admin/queues/api/queues', headers: basic('ops:board-password-1') });
      expect(pairQueues.statusCode).to.equal(200);
      const readOnly = (body: string) => (JSON.parse(body) as { queues: Array<{ readOnlyMode: boolean }> }).queues.map((q) => q.readOnlyMode);
      expect(readOnly(pairQueues.body)).to.deep.equal([false, false]);
      const viaToken = await app.inject({ method: 'GET', url: '/admin/queues/api/queues', headers: basic(`x:${tokens.reader.token}`) });
      expect(viaToken.statusCode).to.equal(200);
      expect(readOnly(viaToken.body)).to.deep.equal([true, true]);
      expect(readOnly((await app.inject({ method: 'GET', url: '/admin/queues/api/queues', headers: bearer('boarder') })).body)).to.deep.equal([
        false,
        false,
      ]);
      // anti-framing on every board response
      const page = await app.inject({ method: 'GET', url: '/admin/queues', headers: bearer('reader') });
      expect(page.statusCode).to.equal(200);
      expect(page.headers['x-frame-options']).to.equal('DENY');
      expect(page.headers['content-security-policy']).to.equal("frame-ancestors 'none'");
      // the pair has no API access
      expect((await app.inject({ method: 'GET', url: '/api/deployments', headers: basic('ops:board-password-1') })).statusCode).to.equal(403);
      // the pair may act on the board
      expect(
        (await app.inject({ method: 'PUT', url: `/admin/queues/api/queues/${LIFECYCLE_QUEUE}/pause`, headers: basic('ops:board-password-1') }))
          .statusCode,
      ).to.equal(200);
      expect(await producer.queue.isPaused()).to.equal(true);
    });
  });

  describe('limits', () => {
    it('throttles failed authentications per client address: 429 with Retry-After (a valid bearer token still passes), then lets it in', async () => {
      await app.close();
      let now = 0;
      app = await build({}, { authThrottle: new AuthThrottle(3, 60_000, () => now) });
      const basicWrong = { authorization: `Basic ${Buffer.from('ops:guess').toString('base64')}` };
      expect((await app.inject({ method: 'GET', url: '/api/deployments', headers: WRONG })).statusCode).to.equal(401);
      expect((await app.inject({ method: 'GET', url: '/admin/queues', headers: basicWrong })).statusCode).to.equal(401);
      expect((await app.inject({ method: 'GET', url: '/admin/queues', headers: basicWrong })).statusCode).to.equal(401);
      const basicRight = { authorization: `Basic ${Buffer.from('ops:board-password-1').toString('base64')}` };
      for (const [url, headers] of [
        ['/api/deployments', WRONG],
        ['/admin/queues', basicWrong],
        ['/admin/queues', basicRight],
      ] as const) {
        const res = await app.inject({ method: 'GET', url, headers });
        expect(res.statusCode, url).to.equal(429);
        expect(res.headers['retry-after']).to.equal('60');
        expect(json(res.body).error?.code).to.equal('too_many_failed_authentications');
      }
      // a valid bearer token is never locked out by others' failures at its address (a proxy, a NAT)
      expect((await app.inject({ method: 'GET', url: '/api/deployments', headers: bearer('reader') })).statusCode).to.equal(200);
      // another address is not affected
      expect((await app.inject({ method: 'GET', url: '/admin/queues', headers: basicRight, remoteAddress: '10.9.9.9' })).statusCode).to.equal(200);
      now += 60_000;
      expect((await app.inject({ method: 'GET', url: '/admin/queues', headers: basicRight })).statusCode).to.equal(200);
    });

    it('rate-limits POST /api/events per token (429 with Retry-After), fleet-wide through Redis; other tokens go on', async () => {
      await app.close();
      const counters = testRedis();
      app = await build({ FLEET_EVENTS_RATE_LIMIT: '5' }, { rateLimitRedis: counters });
      try {
        // 30 at once against a limit of 5 a second: however slow the machine, some are refused
        const results = await Promise.all(
          Array.from({ length: 30 }, () => post('deployment.create', { deploymentId: randomUUID(), name: 'web' }, bearer('writer'))),
        );
        const refused = results.filter((r) => r.statusCode === 429);
        const accepted = results.filter((r) => r.statusCode === 202);
        expect(refused.length + accepted.length).to.equal(30);
        expect(refused.length).to.be.at.least(1);
        expect(refused[0]?.headers['retry-after']).to.match(/^\d+$/);
        expect(json(refused[0]?.body ?? '{}').error?.code).to.equal('rate_limited');
        // every accepted event is on the queue, and nothing of a refused one
        expect(await producer.queue.count()).to.equal(accepted.length);
        expect(await counters.keys(`${prefix}:ratelimit:*`)).to.not.have.length(0);
        const other = await post('deployment.create', { deploymentId: randomUUID(), name: 'web' }, bearer('admin'));
        expect(other.statusCode).to.equal(202);
      } finally {
        counters.disconnect();
      }
    });

    it('drops heartbeats and readiness for what does not exist after a short budget, not ten minutes of retries', async () => {
      const worker = new LifecycleWorker({ connection: testEnv().redisUrl, prefix, service, stampRetryBudgetMs: 800, concurrency: 32 });
      try {
        const ghosts = Array.from({ length: 300 }, (_, i) =>
          i % 2 === 0
            ? producer.heartbeat({ deploymentId: randomUUID(), attemptId: randomUUID() })
            : producer.readiness({ deploymentId: randomUUID() }),
        );
        await Promise.all(ghosts);
        await waitFor(
          '300 ghost stamps completed',
          async () => ((await producer.queue.getJobCounts('completed')).completed === 300 ? true : undefined),
          40_000,
        );
        const counts = await producer.queue.getJobCounts('delayed', 'waiting', 'active', 'failed');
        expect(counts).to.deep.equal({ delayed: 0, waiting: 0, active: 0, failed: 0 });
        const done = await producer.queue.getJobs(['completed'], 0, 299);
        expect(new Set(done.map((j) => (j.returnvalue as { reason: string }).reason))).to.deep.equal(new Set(['not_found']));
        // retried within the budget first: a create that arrives in time still lets its heartbeat stamp
        expect(Math.max(...done.map((j) => j.attemptsStarted))).to.be.at.least(2);
      } finally {
        await worker.close();
      }
    });
  });

  it('answers 503 with Retry-After when Redis does not answer, and nothing else changes', async () => {
    const deadProducer = new LifecycleProducer({ connection: 'redis://127.0.0.1:1', prefix });
    await app.close();
    app = await build({}, { producer: deadProducer });
    try {
      const res = await post('deployment.create', { deploymentId: randomUUID(), name: 'web' }, bearer('writer'));
      expect(res.statusCode).to.equal(503);
      expect(res.headers['retry-after']).to.equal('5');
      expect(json(res.body).error?.code).to.equal('unavailable');
      expect(json(res.body).error?.message).to.contain('retry with the same eventId');
    } finally {
      await deadProducer.close();
    }
  });

  describe('the actor', () => {
    it('records the token name on the transition, in history, the transitions API and the stream entry', async () => {
      const { deploymentId } = await readyDeployment();
      const res = await post('deployment.teardown', { deploymentId, force: true }, bearer('admin'));
      expect(res.statusCode).to.equal(202);
      const job = await producer.queue.getJob(json(res.body).jobId as string);
      expect(job?.data).to.deep.include({ actor: 'ops-admin', force: true });
      const applied = await service.apply(job?.name ?? '', job?.data, { fallbackEventId: job?.id });
      expect(applied).to.deep.include({ outcome: 'applied', to: 'pending' });
      const [row] = await db.dataSource.query<Array<{ actor: string }>>(
        `SELECT actor FROM state_transitions WHERE deployment_id = $1 AND version = 5`,
        [deploymentId],
      );
      expect(row?.actor).to.equal('ops-admin');
      const api = JSON.parse(
        (await app.inject({ method: 'GET', url: `/api/deployments/${deploymentId}/transitions`, headers: bearer('reader') })).body,
      ) as {
        items: Array<{ version: number; actor: string }>;
      };
      expect(api.items.map((t) => [t.version, t.actor])).to.deep.equal([
        [1, 'producer'],
        [2, 'producer'],
        [3, 'producer'],
        [4, 'producer'],
        [5, 'ops-admin'],
      ]);
      // the outbox row is what the relay appends to the stream, field for field
      const [outbox] = await db.dataSource.query<Array<{ fields: Record<string, string> }>>(
        `SELECT fields FROM outbox WHERE deployment_id = $1 AND version = 5`,
        [deploymentId],
      );
      expect(outbox?.fields).to.deep.include({ actor: 'ops-admin', reason: 'torn_down', version: '5' });
    });

    it('refuses an actor in the payload that is not the caller; a producer may name its own', async () => {
      const deploymentId = randomUUID();
      const res = await post('deployment.create', { deploymentId, name: 'web', actor: 'sweep' }, bearer('writer'));
      expect(res.statusCode).to.equal(400);
      expect(json(res.body).error?.issues?.map((i) => i.field)).to.deep.equal(['actor']);
      expect(await producer.queue.count()).to.equal(0);
      expect((await post('deployment.create', { deploymentId, name: 'web', actor: 'writer' }, bearer('writer'))).statusCode).to.equal(202);
      const viaSdk = await service.apply(
        'deployment.create',
        { deploymentId: randomUUID(), name: 'web', actor: 'pipeline-7' },
        { fallbackEventId: randomUUID() },
      );
      const [row] = await db.dataSource.query<Array<{ actor: string }>>(`SELECT actor FROM state_transitions WHERE deployment_id = $1`, [
        viaSdk.deploymentId,
      ]);
      expect(row?.actor).to.equal('pipeline-7');
    });
  });

  describe('the reproductions of the issue, failing safely', () => {
    const attackerUrl = 'https://attacker.example/';

    it('endpoint hijack: an endpoint outside FLEET_ENDPOINT_ALLOW is refused at the intake and by the worker', async () => {
      await app.close();
      const allow = '.nodes.example.com,10.0.0.0/8';
      app = await build({ FLEET_ENDPOINT_ALLOW: allow });
      const { deploymentId, attemptId } = await readyDeployment();
      const before = await db.dataSource.query<Array<{ endpoint_url: string }>>(`SELECT endpoint_url FROM deployments WHERE id = $1`, [deploymentId]);
      const hijack = await post(
        'attempt.end',
        { deploymentId, attemptId, outcome: 'succeeded', endpoint: { url: attackerUrl, kind: 'cluster_dns' } },
        bearer('writer'),
      );
      expect(hijack.statusCode).to.equal(400);
      expect(json(hijack.body).error?.issues).to.deep.equal([
        { field: 'endpoint.url', rule: 'host "attacker.example" is not allowed by FLEET_ENDPOINT_ALLOW' },
      ]);
      expect(await producer.queue.count()).to.equal(0);
      // a job written to Redis without the SDK meets the same list in the worker
      const guarded = new TransitionService({ dataSource: db.dataSource, endpointAllow: parseEndpointAllowList(allow).list });
      const other = randomUUID();
      let refused: unknown;
      try {
        await guarded.apply(
          'deployment.create',
          { deploymentId: other, name: 'x', endpoint: { url: attackerUrl, kind: 'cluster_dns' } },
          { fallbackEventId: randomUUID() },
        );
      } catch (err) {
        refused = err;
      }
      expect((refused as Error).message).to.contain('endpoint.url: host "attacker.example" is not allowed');
      expect(await db.dataSource.query(`SELECT 1 FROM deployments WHERE id = $1`, [other])).to.have.length(0);
      const after = await db.dataSource.query<Array<{ endpoint_url: string }>>(`SELECT endpoint_url FROM deployments WHERE id = $1`, [deploymentId]);
      expect(after).to.deep.equal(before);
      const allowed = await post(
        'deployment.create',
        { deploymentId: randomUUID(), name: 'web', endpoint: { url: 'http://n1.nodes.example.com:30000', kind: 'node_port' } },
        bearer('writer'),
      );
      expect(allowed.statusCode).to.equal(202);
    });

    it('SSRF: a probe URL with a query is refused, and the sweep never probes a stored endpoint outside the list', async () => {
      const ssrf = await post(
        'attempt.end',
        {
          deploymentId: randomUUID(),
          attemptId: randomUUID(),
          outcome: 'succeeded',
          endpoint: { url: 'http://127.0.0.1:18999/internal-admin?x=', kind: 'node_port' },
        },
        bearer('writer'),
      );
      expect(ssrf.statusCode).to.equal(400);
      expect(json(ssrf.body).error?.issues?.map((i) => i.field)).to.deep.equal(['endpoint.url']);

      // a row stored before the list existed, pointing at an internal server
      const internal = new ReadyServer('ok');
      const url = await internal.listen();
      try {
        await db.dataSource.query(`UPDATE deployments SET endpoint_url = NULL, endpoint_kind = NULL WHERE state = 'ready'`);
        const { deploymentId } = await readyDeployment(url);
        const sweep = (list: string | null) =>
          new Sweeper({
            dataSource: db.dataSource,
            producer,
            now: () => NOW,
            endpointAllow: list === null ? null : parseEndpointAllowList(list).list,
          }).sweep();
        const refused = await sweep('.nodes.example.com');
        expect(refused).to.deep.include({ probed: 1, stamped: 0, failed: 1, probeFailures: { not_allowed: 1 } });
        expect(internal.requests).to.have.length(0);
        const allowed = await sweep('127.0.0.1');
        expect(allowed).to.deep.include({ stamped: 1 });
        expect(internal.requests).to.have.length(1);
        expect(deploymentId).to.be.a('string');
      } finally {
        await internal.close();
      }
    });

    it('squatted event ids: another kind\'s prefix is refused; an id held by another event is 409, never "accepted"; the real event applies', async () => {
      const { deploymentId, attemptId } = await readyDeployment();
      await db.dataSource.query(`UPDATE deployments SET state = 'deploying', current_attempt_id = $2 WHERE id = $1`, [deploymentId, attemptId]);
      await db.dataSource.query(`UPDATE attempts SET status = 'running' WHERE id = $1`, [attemptId]);
      // the issue's squat: a heartbeat carrying the end's derived id; and a readiness carrying a create's
      const squat = await post('attempt.heartbeat', { deploymentId, attemptId, eventId: `attempt.end.${attemptId}` }, bearer('writer'));
      expect(squat.statusCode).to.equal(400);
      expect(json(squat.body).error?.issues?.map((i) => i.field)).to.deep.equal(['eventId']);
      const squatCreate = await post('deployment.readiness', { deploymentId, eventId: `deployment.create.${randomUUID()}` }, bearer('writer'));
      expect(squatCreate.statusCode).to.equal(400);
      // a free-form id taken first by a heartbeat: the end with the same id is told so
      expect((await post('attempt.heartbeat', { deploymentId, attemptId, eventId: 'ev-42' }, bearer('writer'))).statusCode).to.equal(202);
      const taken = await post('attempt.end', { deploymentId, attemptId, outcome: 'succeeded', eventId: 'ev-42' }, bearer('writer'));
      expect(taken.statusCode).to.equal(409);
      expect(json(taken.body).error).to.deep.include({ code: 'event_id_conflict', existing: { name: 'attempt.heartbeat', state: 'waiting' } });
      // the same name with another payload is another event too
      expect((await post('attempt.cancel', { deploymentId, attemptId, reason: 'first', eventId: 'ev-43' }, bearer('writer'))).statusCode).to.equal(
        202,
      );
      const changed = await post('attempt.cancel', { deploymentId, attemptId, reason: 'second', eventId: 'ev-43' }, bearer('writer'));
      expect(changed.statusCode).to.equal(409);
      expect(json(changed.body).error?.message).to.contain('with a different payload');
      await (await producer.queue.getJob('ev-43'))?.remove();
      // the same event again is a duplicate, not a conflict
      const again = await post('attempt.heartbeat', { deploymentId, attemptId, eventId: 'ev-42' }, bearer('admin'));
      expect(again.statusCode).to.equal(202);
      expect(json(again.body)).to.deep.include({ duplicate: true });
      // the SDK says the same
      let sdkError: unknown;
      await producer.endAttempt({ deploymentId, attemptId, outcome: 'succeeded', eventId: 'ev-42' }).catch((err: unknown) => (sdkError = err));
      expect(sdkError).to.be.instanceOf(EventIdConflictError);
      // the real end, with its derived id, is accepted and applied
      const real = await post('attempt.end', { deploymentId, attemptId, outcome: 'succeeded' }, bearer('writer'));
      expect(real.statusCode).to.equal(202);
      expect(json(real.body)).to.deep.include({ eventId: `attempt.end.${attemptId}`, duplicate: false });
      const worker = new LifecycleWorker({ connection: testEnv().redisUrl, prefix, service });
      try {
        await waitFor('the end applied', async () => {
          const [d] = await db.dataSource.query<Array<{ state: string }>>(`SELECT state FROM deployments WHERE id = $1`, [deploymentId]);
          return d?.state === 'ready' ? true : undefined;
        });
      } finally {
        await worker.close();
      }
    });

    it('an eventId processed before as another event is refused by the worker (event_id_conflict), never a silent duplicate', async () => {
      const { deploymentId, attemptId } = await readyDeployment();
      const first = await service.apply('attempt.start', { deploymentId, attemptId, eventId: 'shared-id' });
      expect(first).to.deep.include({ outcome: 'noop' });
      const second = await service.apply('attempt.cancel', { deploymentId, attemptId, eventId: 'shared-id' });
      expect(second).to.deep.include({ outcome: 'rejected', code: 'event_id_conflict' });
      // the same name for another deployment is another event too
      const other = await readyDeployment();
      const third = await service.apply('attempt.start', { deploymentId: other.deploymentId, attemptId: other.attemptId, eventId: 'shared-id' });
      expect(third).to.deep.include({ outcome: 'rejected', code: 'event_id_conflict' });
      expect((third as { message: string }).message).to.contain(`deployment ${deploymentId}`);
      // the same name and deployment with another payload (another attempt) is another event too
      const next = randomUUID();
      await service.apply('attempt.create', { deploymentId, attemptId: next }, { fallbackEventId: randomUUID() });
      const cancelled = await service.apply('attempt.cancel', { deploymentId, attemptId: next, eventId: 'cancel-shared' });
      expect(cancelled).to.deep.include({ outcome: 'applied' });
      const real = await service.apply('attempt.cancel', { deploymentId, attemptId, eventId: 'cancel-shared', reason: 'x' });
      expect(real).to.deep.include({ outcome: 'rejected', code: 'event_id_conflict' });
      expect((real as { message: string }).message).to.contain('with another payload');
      // (another attempt's derived id is refused before it gets that far: issue 28, front-door-input.test.ts)
      // and a true redelivery is still a duplicate
      expect(await service.apply('attempt.start', { deploymentId, attemptId, eventId: 'shared-id' })).to.deep.include({
        outcome: 'noop',
        reason: 'duplicate_event',
      });
    });

    it('normalises UUID case: an upper-case attemptId gets the same derived eventId, so a retry is a duplicate', async () => {
      const deploymentId = randomUUID();
      const first = await post('deployment.create', { deploymentId: deploymentId.toUpperCase(), name: 'web' }, bearer('writer'));
      const second = await post('deployment.create', { deploymentId, name: 'web' }, bearer('writer'));
      expect(json(first.body)).to.deep.include({ eventId: `deployment.create.${deploymentId}`, duplicate: false });
      expect(json(second.body)).to.deep.include({ eventId: `deployment.create.${deploymentId}`, duplicate: true });
      expect(await producer.queue.count()).to.equal(1);
    });
  });

  it('reloads the tokens file through the store it was given (SIGHUP calls reload)', async () => {
    const store = new TokenStore(tokensFile);
    await app.close();
    app = await build({}, { tokens: store });
    const late = createToken('late', ['read']);
    expect((await app.inject({ method: 'GET', url: '/api/deployments', headers: { authorization: `Bearer ${late.token}` } })).statusCode).to.equal(
      401,
    );
    const file = path.join(dir, 'tokens-2.json');
    fs.writeFileSync(file, JSON.stringify([...Object.values(tokens).map((t) => t.entry), late.entry]), { mode: 0o600 });
    fs.renameSync(file, tokensFile);
    try {
      store.reload();
      expect((await app.inject({ method: 'GET', url: '/api/deployments', headers: { authorization: `Bearer ${late.token}` } })).statusCode).to.equal(
        200,
      );
    } finally {
      fs.writeFileSync(tokensFile, JSON.stringify(Object.values(tokens).map((t) => t.entry)));
    }
  });

  it('says at load, naming the file and its mode, that others can read the tokens file', async () => {
    let logged = '';
    await app.close();
    fs.chmodSync(tokensFile, 0o644);
    app = await build({}, { logger: createLogger('info', { write: (line: string) => void (logged += line) }) });
    const lines = logged
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => JSON.parse(l) as { level: number; msg: string; file?: string; mode?: string });
    expect(lines.filter((l) => l.level === 40).map(({ msg, file, mode }) => ({ msg, file, mode }))).to.deep.equal([
      {
        msg: `API tokens file ${tokensFile} is readable by others (mode 0644): make it private (chmod 600 ${tokensFile})`,
        file: tokensFile,
        mode: '0644',
      },
    ]);
  });
});
