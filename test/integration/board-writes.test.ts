/**
 * Bull Board inside the scopes (issue 28) over real Redis and PostgreSQL: what the board adds to the lifecycle queue
 * goes through the intake (scope, validation, allow-list, actor), job data is never replaced, every write route of
 * the board has its decision, nested JSON is refused like at the intake, and the failed-login throttle lets valid
 * tokens through.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import type IORedis from 'ioredis';
import { AuthThrottle } from '../../src/http/auth';
import { BOARD_WRITES } from '../../src/http/board';
import { BOARD_PATH, type HttpDeps } from '../../src/http/server';
import { createToken } from '../../src/http/tokens';
import { LIFECYCLE_QUEUE, MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { TransitionService } from '../../src/services/transitions';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { routesOf, testHttpServer } from '../helpers/http';

const NOW = new Date('2026-11-23T12:00:00.000Z');
const ADD = (queue: string) => `${BOARD_PATH}/api/queues/${queue}/add`;

interface ErrorBody {
  error: { code: string; message: string; issues?: Array<{ field: string; rule: string }> };
}

describe('Bull Board writes: inside the scopes, through the intake', function () {
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
    boarder: createToken('boarder', ['board']),
    boardWriter: createToken('board-writer', ['board', 'events:write']),
    boardAdmin: createToken('board-admin', ['board', 'events:admin']),
    reader: createToken('reader', ['read']),
  };
  const bearer = (t: keyof typeof tokens) => ({ authorization: `Bearer ${tokens[t].token}` });
  const basic = (pair: string) => ({ authorization: `Basic ${Buffer.from(pair).toString('base64')}` });
  const PAIR = basic('ops:board-password-1');

  async function build(env: Record<string, string> = {}, overrides: Partial<HttpDeps> = {}): Promise<FastifyInstance> {
    return testHttpServer(
      { prefix, dataSource: db.dataSource, producer, redis, maintenance },
      { FLEET_API_TOKENS_FILE: tokensFile, FLEET_BOARD_USER: 'ops', FLEET_BOARD_PASSWORD: 'board-password-1', ...env },
      { now: () => NOW, authThrottle: new AuthThrottle(10_000), ...overrides },
    );
  }

  before(async () => {
    db = await openTestDatabase(4);
    service = new TransitionService({ dataSource: db.dataSource, now: () => NOW });
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'board-writes-'));
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

  async function readyDeployment(): Promise<string> {
    const deploymentId = randomUUID();
    const attemptId = randomUUID();
    const e = (name: string, data: Record<string, unknown>) => service.apply(name, { deploymentId, ...data }, { fallbackEventId: randomUUID() });
    await e('deployment.create', { name: 'web' });
    await e('attempt.create', { attemptId });
    await e('attempt.start', { attemptId });
    await e('attempt.end', { attemptId, outcome: 'succeeded', endpoint: { url: 'http://10.0.0.1:30000', kind: 'node_port' } });
    return deploymentId;
  }

  const add = (queue: string, body: unknown, headers: Record<string, string>) =>
    app.inject({ method: 'POST', url: ADD(queue), headers, payload: body as object });
  const errorOf = (body: string) => (JSON.parse(body) as ErrorBody).error;

  describe('adding a job', () => {
    it("the issue's reproduction: a `board` token adds no forced teardown as actor=sweep, nor a deployment.resolve", async () => {
      const deploymentId = await readyDeployment();
      const teardown = { name: 'deployment.teardown', data: { deploymentId, force: true, actor: 'sweep' }, options: {} };
      const resolve = { name: 'deployment.resolve', data: { deploymentId, outcome: 'ready' }, options: {} };
      for (const [who, headers] of [
        ['a board token', bearer('boarder')],
        ['the basic-auth pair', PAIR],
      ] as const) {
        for (const body of [teardown, resolve]) {
          const res = await add(LIFECYCLE_QUEUE, body, headers);
          expect(res.statusCode, `${who} adds ${body.name}: ${res.body.slice(0, 200)}`).to.equal(403);
          expect(errorOf(res.body)).to.include({ code: 'forbidden' });
          expect(errorOf(res.body).message).to.contain('"events:admin"');
        }
      }
      // `board` and `events:write` are not `events:admin` either
      const writer = await add(LIFECYCLE_QUEUE, { name: 'deployment.teardown', data: { deploymentId, force: true } }, bearer('boardWriter'));
      expect(writer.statusCode).to.equal(403);
      expect(errorOf(writer.body).message).to.equal('deployment.teardown with force needs the "events:admin" scope');
      // nor is an ordinary event open to a token that may not send events at all
      const create = await add(LIFECYCLE_QUEUE, { name: 'deployment.create', data: { deploymentId: randomUUID(), name: 'web' } }, bearer('boarder'));
      expect(create.statusCode).to.equal(403);
      expect(errorOf(create.body).message).to.contain('"events:write"');
      expect(await producer.queue.count()).to.equal(0);
    });

    it("a token with `board` and the event's scope adds through the intake: the actor is the token, recorded as such", async () => {
      const deploymentId = await readyDeployment();
      // the board's modal sends `options: {}`
      const res = await add(LIFECYCLE_QUEUE, { name: 'deployment.teardown', data: { deploymentId, force: true }, options: {} }, bearer('boardAdmin'));
      expect(res.statusCode, res.body).to.equal(202);
      const result = res.json<{ name: string; eventId: string; jobId: string; duplicate: boolean }>();
      expect(result).to.deep.include({ name: 'deployment.teardown', duplicate: false });
      const job = await producer.queue.getJob(result.jobId);
      expect(job?.data).to.deep.include({ deploymentId, force: true, actor: 'board-admin', eventId: result.eventId });
      expect(await service.apply(job?.name ?? '', job?.data, { fallbackEventId: job?.id })).to.deep.include({ outcome: 'applied', to: 'pending' });
      const [row] = await db.dataSource.query<Array<{ actor: string; reason: string }>>(
        `SELECT actor, reason FROM state_transitions WHERE deployment_id = $1 ORDER BY version DESC LIMIT 1`,
        [deploymentId],
      );
      expect(row).to.deep.equal({ actor: 'board-admin', reason: 'torn_down' });
      // `board` and `events:write` add an ordinary event, without job options at all; the same again is the intake's
      // duplicate, not a second job
      const created = { name: 'deployment.create', data: { deploymentId: randomUUID(), name: 'web' } };
      const create = await add(LIFECYCLE_QUEUE, created, bearer('boardWriter'));
      expect(create.statusCode, create.body).to.equal(202);
      expect((await producer.queue.getJob(create.json<{ jobId: string }>().jobId))?.data).to.deep.include({ actor: 'board-writer' });
      expect((await add(LIFECYCLE_QUEUE, created, bearer('boardWriter'))).json()).to.deep.include({ duplicate: true });
      expect(await producer.queue.count()).to.equal(2);
    });

    it('refuses what the intake refuses, naming the field: another actor, a bad payload, an endpoint off the allow-list, job options, other fields', async () => {
      await app.close();
      app = await build({ FLEET_ENDPOINT_ALLOW: '10.0.0.0/8' });
      const deploymentId = randomUUID();
      const cases: Array<[string, unknown, number, string, string[]]> = [
        [
          'a client-chosen actor',
          { name: 'deployment.create', data: { deploymentId, name: 'web', actor: 'sweep' } },
          400,
          'invalid_payload',
          ['actor'],
        ],
        ['a bad payload', { name: 'deployment.create', data: { deploymentId: 'nope', name: 'web' } }, 400, 'invalid_payload', ['deploymentId']],
        [
          'an endpoint off the allow-list',
          { name: 'deployment.create', data: { deploymentId, name: 'web', endpoint: { url: 'http://attacker.example/', kind: 'cluster_dns' } } },
          400,
          'invalid_payload',
          ['endpoint.url'],
        ],
        [
          'job options (the job id is the eventId)',
          { name: 'deployment.create', data: { deploymentId, name: 'web' }, options: { jobId: 'mine' } },
          400,
          'invalid_body',
          ['options'],
        ],
        [
          'a field the intake does not take',
          { name: 'deployment.create', data: { deploymentId, name: 'web' }, extra: 1 },
          400,
          'invalid_body',
          ['(root)'],
        ],
        ["the board's default job name", { name: '__default__', data: {} }, 400, 'unknown_event', ['name']],
      ];
      for (const [label, body, status, code, fields] of cases) {
        const res = await add(LIFECYCLE_QUEUE, body, bearer('boardAdmin'));
        expect(res.statusCode, `${label}: ${res.body.slice(0, 300)}`).to.equal(status);
        expect(errorOf(res.body).code, label).to.equal(code);
        expect(
          errorOf(res.body).issues?.map((i) => i.field),
          label,
        ).to.deep.equal(fields);
      }
      expect(await producer.queue.count()).to.equal(0);
    });

    it('the maintenance queue takes no added job, and no job has its data replaced: 403, nothing changes', async () => {
      const sweep = await add(MAINTENANCE_QUEUE, { name: 'sweep', data: { anything: true }, options: {} }, bearer('boardAdmin'));
      expect(sweep.statusCode, sweep.body).to.equal(403);
      expect(errorOf(sweep.body)).to.deep.include({ code: 'forbidden' });
      expect(errorOf(sweep.body).message).to.contain('maintenance');
      expect(await maintenance.count()).to.equal(0);

      const deploymentId = randomUUID();
      const added = await app.inject({
        method: 'POST',
        url: '/api/events',
        headers: bearer('boardAdmin'),
        payload: { name: 'deployment.create', data: { deploymentId, name: 'web' } },
      });
      expect(added.statusCode).to.equal(202);
      const { jobId } = added.json<{ jobId: string }>();
      const before = (await producer.queue.getJob(jobId))?.data as unknown;
      for (const headers of [bearer('boardAdmin'), PAIR]) {
        const res = await app.inject({
          method: 'PATCH',
          url: `${BOARD_PATH}/api/queues/${LIFECYCLE_QUEUE}/${jobId}/update-data`,
          headers,
          payload: { jobData: { deploymentId, name: 'web', actor: 'sweep' } },
        });
        expect(res.statusCode, res.body).to.equal(403);
        expect(errorOf(res.body).message).to.contain('POST /api/events');
      }
      expect((await producer.queue.getJob(jobId))?.data).to.deep.equal(before);
    });
  });

  describe('the per-token event budget', () => {
    const create = () => ({ name: 'deployment.create', data: { deploymentId: randomUUID(), name: 'web' } });
    const post = (headers: Record<string, string>) => app.inject({ method: 'POST', url: '/api/events', headers, payload: create() });

    it("the review's reproduction: with a limit of 1 a second, the board's add is limited like POST /api/events", async () => {
      await app.close();
      app = await build({ FLEET_EVENTS_RATE_LIMIT: '1' });
      // five at once against one a second: some are refused, however slow the machine
      const results = await Promise.all([1, 2, 3, 4, 5].map(() => add(LIFECYCLE_QUEUE, create(), bearer('boardWriter'))));
      const statuses = results.map((r) => r.statusCode);
      const refused = results.filter((r) => r.statusCode === 429);
      expect(refused, `the board's adds answered ${statuses.join()}`).to.not.have.length(0);
      expect(
        statuses.every((s) => s === 202 || s === 429),
        statuses.join(),
      ).to.equal(true);
      expect(errorOf(refused[0]?.body ?? '{}').code).to.equal('rate_limited');
      expect(refused[0]?.headers['retry-after']).to.match(/^\d+$/);
      expect(await producer.queue.count()).to.equal(statuses.filter((s) => s === 202).length);
    });

    it('POST /api/events and the board share one budget per token (one key, token:<name>, in the same namespace)', async () => {
      await app.close();
      app = await build({ FLEET_EVENTS_RATE_LIMIT: '2' }, { rateLimitRedis: redis });
      const key = `${prefix}:ratelimit:token:board-writer`;
      // one event of two left in a window that outlasts the test: which route spends it, the other is refused
      await redis.set(key, '1', 'PX', 60_000);
      const board = await add(LIFECYCLE_QUEUE, create(), bearer('boardWriter'));
      expect(board.statusCode, board.body).to.equal(202);
      const api = await post(bearer('boardWriter'));
      expect(api.statusCode, api.body).to.equal(429);
      expect(errorOf(api.body).code).to.equal('rate_limited');

      await redis.set(key, '1', 'PX', 60_000);
      expect((await post(bearer('boardWriter'))).statusCode).to.equal(202);
      const spent = await add(LIFECYCLE_QUEUE, create(), bearer('boardWriter'));
      expect(spent.statusCode, spent.body).to.equal(429);
      expect(errorOf(spent.body).code).to.equal('rate_limited');
      // another token has a budget of its own
      expect((await add(LIFECYCLE_QUEUE, create(), bearer('boardAdmin'))).statusCode).to.equal(202);
      expect(await producer.queue.count()).to.equal(3);
    });
  });

  describe("the board's other writes", () => {
    it('every write route of Bull Board has its decision in BOARD_WRITES, and nothing else is there', () => {
      const writes = routesOf(app)
        .filter((r) => !r.startsWith('GET ') && r.includes(` ${BOARD_PATH}/`))
        .map((r) => r.replace(` ${BOARD_PATH}`, ' ').replace(/\{([A-Za-z0-9_]+)\}/g, ':$1'));
      expect(writes).to.have.length.greaterThan(10);
      expect([...writes].sort()).to.deep.equal(Object.keys(BOARD_WRITES).sort());
    });

    it('routes that only move, reschedule or remove jobs already there stay `board`', async () => {
      await producer.queue.add('deployment.create', { deploymentId: randomUUID(), name: 'web' }, { jobId: 'delayed-1', delay: 60_000 });
      const moves: Array<[string, string]> = [
        ['PUT', `/api/queues/${LIFECYCLE_QUEUE}/pause`],
        ['PUT', `/api/queues/${LIFECYCLE_QUEUE}/resume`],
        ['PUT', `/api/queues/${LIFECYCLE_QUEUE}/retry/failed`],
        ['PUT', `/api/queues/${LIFECYCLE_QUEUE}/clean/completed`],
        ['PUT', `/api/queues/${LIFECYCLE_QUEUE}/delayed-1/promote`],
        ['PUT', '/api/queues/pause'],
        ['PUT', '/api/queues/resume'],
      ];
      for (const [method, url] of moves) {
        const res = await app.inject({ method, url: `${BOARD_PATH}${url}`, headers: bearer('boarder') });
        expect(res.statusCode, `${method} ${url}: ${res.body.slice(0, 200)}`).to.be.oneOf([200, 204]);
        expect(
          BOARD_WRITES[
            `${method} ${url
              .replace(LIFECYCLE_QUEUE, ':queueName')
              .replace('delayed-1', ':jobId')
              .replace(/\/(failed|completed)$/, '/:queueStatus')}` as keyof typeof BOARD_WRITES
          ],
        ).to.equal('board');
      }
      expect(await (await producer.queue.getJob('delayed-1'))?.getState()).to.equal('waiting');
      // a read token may not
      expect(
        (await app.inject({ method: 'PUT', url: `${BOARD_PATH}/api/queues/${LIFECYCLE_QUEUE}/pause`, headers: bearer('reader') })).statusCode,
      ).to.equal(403);
    });
  });

  describe('a job scheduler through the board', () => {
    it("PATCH …/job-schedulers/:schedulerId changes the schedule only: a body's template, data, name or options change nothing the scheduler makes", async () => {
      const template = { name: 'sweep', data: { registered: 'by the fleet' }, opts: { attempts: 1 } };
      await maintenance.upsertJobScheduler('sweep', { every: 60_000 }, template);
      const res = await app.inject({
        method: 'PATCH',
        url: `${BOARD_PATH}/api/queues/${MAINTENANCE_QUEUE}/job-schedulers/sweep`,
        headers: bearer('boarder'),
        payload: {
          every: 120_000,
          name: 'deployment.teardown',
          data: { deploymentId: randomUUID(), force: true, actor: 'sweep' },
          opts: { attempts: 99 },
          template: { name: 'deployment.teardown', data: { deploymentId: randomUUID(), force: true, actor: 'sweep' }, opts: { attempts: 99 } },
        },
      });
      expect(res.statusCode, res.body).to.equal(204);
      const scheduler = await maintenance.getJobScheduler('sweep');
      expect(scheduler?.every, 'the schedule did change').to.equal(120_000);
      // what it makes is still what the fleet registered (Bull Board 9.10.1 re-sends the stored template; a version
      // that takes the body's would fail here, and BOARD_WRITES must then refuse the route or send it through the intake)
      expect(scheduler).to.deep.include({ name: 'sweep' });
      expect(scheduler?.template?.data).to.deep.equal(template.data);
      expect(scheduler?.template?.opts).to.deep.include({ attempts: 1 });
      const made = (await maintenance.getJobs(['delayed', 'waiting'])).filter((j) => j.repeatJobKey === 'sweep');
      expect(made).to.not.have.length(0);
      for (const job of made) expect({ name: job.name, data: job.data as unknown }).to.deep.equal({ name: 'sweep', data: template.data });
    });
  });

  describe('nested JSON', () => {
    it("32,000 levels deep: 400 invalid_body at the board's routes as at the intake, never a 500, nothing enqueued", async () => {
      const deep = `${'['.repeat(32_000)}${']'.repeat(32_000)}`;
      const targets: Array<[string, string, Record<string, string>]> = [
        ['POST', ADD(LIFECYCLE_QUEUE), bearer('boardAdmin')],
        ['PUT', `${BOARD_PATH}/api/queues/${LIFECYCLE_QUEUE}/concurrency`, bearer('boardAdmin')],
        ['POST', '/api/events', bearer('boardAdmin')],
      ];
      for (const [method, url, headers] of targets) {
        for (const payload of [
          `{"name":"deployment.create","data":${deep}}`,
          `{"name":"deployment.create","data":{"deploymentId":"${randomUUID()}","name":${deep}}}`,
        ]) {
          const res = await app.inject({ method, url, headers: { ...headers, 'content-type': 'application/json' }, payload });
          expect(res.statusCode, `${method} ${url}: ${res.body.slice(0, 200)}`).to.equal(400);
          expect(errorOf(res.body)).to.deep.include({ code: 'invalid_body' });
          expect(errorOf(res.body).message).to.match(/^body: nests deeper than \d+ levels/);
        }
      }
      expect(await producer.queue.count()).to.equal(0);
    });
  });

  describe('the failed-authentication throttle', () => {
    it('locks out failed basic-auth guesses from an address, but never a valid token from it (bearer, or as the password)', async () => {
      await app.close();
      let now = 0;
      app = await build({}, { authThrottle: new AuthThrottle(3, 60_000, () => now) });
      const guess = basic('ops:guess');
      for (let i = 0; i < 3; i++) expect((await app.inject({ method: 'GET', url: BOARD_PATH, headers: guess })).statusCode).to.equal(401);
      for (const headers of [guess, PAIR]) {
        const res = await app.inject({ method: 'GET', url: BOARD_PATH, headers });
        expect(res.statusCode).to.equal(429);
        expect(errorOf(res.body).code).to.equal('too_many_failed_authentications');
      }
      for (const [label, headers] of [
        ['bearer', bearer('reader')],
        ['basic password', basic(`anyone:${tokens.boarder.token}`)],
      ] as const) {
        const page = await app.inject({ method: 'GET', url: `${BOARD_PATH}/api/queues`, headers });
        expect(page.statusCode, `a valid token as ${label}: ${page.body.slice(0, 200)}`).to.equal(200);
      }
      const pause = await app.inject({ method: 'PUT', url: `${BOARD_PATH}/api/queues/${LIFECYCLE_QUEUE}/pause`, headers: bearer('boarder') });
      expect(pause.statusCode, pause.body).to.equal(200);
      // the lockout still holds for the pair, and ends with its window
      expect((await app.inject({ method: 'GET', url: BOARD_PATH, headers: PAIR })).statusCode).to.equal(429);
      now += 60_000;
      expect((await app.inject({ method: 'GET', url: BOARD_PATH, headers: PAIR })).statusCode).to.equal(200);
    });
  });
});
