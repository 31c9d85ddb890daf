/**
 * The front door, second pass (issue 28), over real Redis and PostgreSQL, through the HTTP intake, the producer SDK
 * and the worker: an endpoint URL every client reads as the host the allow-list checked, derived event ids bound to
 * their subject, and text PostgreSQL can store.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import type IORedis from 'ioredis';
import { ValidationError } from '../../src/errors';
import { createToken } from '../../src/http/tokens';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { Sweeper } from '../../src/services/sweep/sweeper';
import { TransitionService } from '../../src/services/transitions';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { testHttpServer } from '../helpers/http';
import { runningAttempt } from '../helpers/lifecycle';
import { ReadyServer } from '../helpers/ready-server';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

const NOW = new Date('2026-11-23T12:00:00.000Z');
const ALLOW = '.cluster.local,10.0.0.0/8';
const PUBLIC = 'https://public.example.com/';

describe('front door, second pass: one URL for checker and client, ids bound to their subject, storable text', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let prefix: string;
  let redis: IORedis;
  let producer: LifecycleProducer;
  let maintenance: Queue;
  let service: TransitionService;
  let app: FastifyInstance;
  let worker: LifecycleWorker | null = null;
  let dir: string;
  let tokensFile: string;
  const writer = createToken('writer', ['read', 'events:write']);
  const auth = { authorization: `Bearer ${writer.token}` };

  before(async () => {
    db = await openTestDatabase(8);
    service = new TransitionService({ dataSource: db.dataSource, now: () => NOW });
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'front-door-input-'));
    tokensFile = path.join(dir, 'tokens.json');
    fs.writeFileSync(tokensFile, JSON.stringify([writer.entry]));
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
    app = await testHttpServer(
      { prefix, dataSource: db.dataSource, producer, redis, maintenance },
      {
        FLEET_API_TOKENS_FILE: tokensFile,
        FLEET_ENDPOINT_ALLOW: ALLOW,
        FLEET_PUBLIC_ENDPOINT_URL: PUBLIC,
        FLEET_BOARD_USER: 'ops',
        FLEET_BOARD_PASSWORD: 'board-password-1',
      },
      { now: () => NOW },
    );
  });
  afterEach(async () => {
    await worker?.close();
    worker = null;
    await app.close();
    await maintenance.close();
    await producer.close();
    redis.disconnect();
    await dropPrefix(prefix);
  });

  const post = (name: string, data: Record<string, unknown>) =>
    app.inject({ method: 'POST', url: '/api/events', headers: auth, payload: { name, data } });
  const body = (raw: string) => JSON.parse(raw) as { error?: { code: string; issues?: Array<{ field: string; rule: string }> }; eventId?: string };
  const startWorker = () => {
    worker = new LifecycleWorker({ connection: testEnv().redisUrl, prefix, service });
  };
  const stateOf = async (deploymentId: string) =>
    (
      await db.dataSource.query<Array<{ state: string; endpoint_url: string | null }>>(`SELECT state, endpoint_url FROM deployments WHERE id = $1`, [
        deploymentId,
      ])
    )[0];
  // a job read once it has failed for good (finished, with its reason), not between its failure and its state
  const failedReason = (jobId: string) =>
    waitFor(`job ${jobId} failed`, async () => {
      const job = await producer.queue.getJob(jobId);
      return job?.finishedOn !== undefined && job.failedReason !== undefined ? job : undefined;
    });

  describe('endpoint URLs', () => {
    it("refuses the issue's backslash bypass at the intake (400 naming endpoint.url and the rule); nothing is enqueued", async () => {
      const { deploymentId, attemptId } = await runningAttempt(service);
      for (const url of ['http://10.0.0.1\\@127.0.0.1:3199/', 'https://build.cluster.local\\@attacker.example.com/']) {
        const res = await post('attempt.end', { deploymentId, attemptId, outcome: 'succeeded', endpoint: { url, kind: 'cluster_dns' } });
        expect(res.statusCode, url).to.equal(400);
        expect(body(res.body).error?.code).to.equal('invalid_payload');
        const issues = body(res.body).error?.issues ?? [];
        expect(
          issues.map((i) => i.field),
          url,
        ).to.deep.equal(['endpoint.url']);
        expect(issues[0]?.rule).to.contain('must not contain a backslash');
      }
      expect(await producer.queue.count()).to.equal(0);
      expect(await stateOf(deploymentId)).to.deep.equal({ state: 'deploying', endpoint_url: null });
    });

    it('stores and serves the normalised form; the worker refuses a raw job with a URL the rules refuse', async () => {
      const { deploymentId, attemptId } = await runningAttempt(service);
      const res = await post('attempt.end', {
        deploymentId,
        attemptId,
        outcome: 'succeeded',
        endpoint: { url: 'HTTP://Web.Cluster.LOCAL:80', kind: 'cluster_dns' },
      });
      expect(res.statusCode).to.equal(202);
      const job = await producer.queue.getJob(body(res.body).eventId ?? '');
      expect((job?.data as { endpoint?: unknown }).endpoint).to.deep.equal({ url: 'http://web.cluster.local/', kind: 'cluster_dns' });
      startWorker();
      await waitFor('the end applied', async () => ((await stateOf(deploymentId))?.state === 'ready' ? true : undefined));
      expect(await stateOf(deploymentId)).to.deep.equal({ state: 'ready', endpoint_url: 'http://web.cluster.local/' });
      const served = await app.inject({ method: 'GET', url: `/api/deployments/${deploymentId}/endpoint`, headers: auth });
      expect(JSON.parse(served.body)).to.deep.equal({ url: 'http://web.cluster.local/', source: 'private', reason: 'cluster_dns' });

      // a producer writing to Redis without the SDK meets the same rules in the worker
      const other = await runningAttempt(service);
      await producer.queue.add(
        'attempt.end',
        { ...other, outcome: 'succeeded', endpoint: { url: 'http://10.0.0.1\\@127.0.0.1:3199/', kind: 'cluster_dns' } },
        { jobId: 'raw-backslash' },
      );
      const failed = await failedReason('raw-backslash');
      expect(failed.failedReason).to.match(/^invalid_payload: endpoint\.url: must not contain a backslash/);
      expect(await stateOf(other.deploymentId)).to.deep.equal({ state: 'deploying', endpoint_url: null });
    });

    it('a retry of an event enqueued before the normalisation (its URL as sent) is a duplicate, not a conflict', async () => {
      const { deploymentId, attemptId } = await runningAttempt(service);
      const end = { deploymentId, attemptId, outcome: 'succeeded', endpoint: { url: 'HTTP://Web.Cluster.LOCAL:80', kind: 'cluster_dns' } };
      // as an earlier version enqueued it: the URL as sent, under the derived id
      await producer.queue.add(
        'attempt.end',
        { ...end, eventId: `attempt.end.${attemptId}`, actor: 'writer' },
        { jobId: `attempt.end.${attemptId}` },
      );
      const retry = await post('attempt.end', end);
      expect(retry.statusCode, retry.body).to.equal(202);
      expect(JSON.parse(retry.body)).to.deep.include({ eventId: `attempt.end.${attemptId}`, duplicate: true });
    });

    it('a row stored before the rules is neither served (public fallback, endpoint_not_allowed) nor probed', async () => {
      const { deploymentId, attemptId } = await runningAttempt(service);
      await service.apply('attempt.end', {
        deploymentId,
        attemptId,
        outcome: 'succeeded',
        endpoint: { url: 'http://10.0.0.1:30000', kind: 'node_port' },
        eventId: randomUUID(),
      });
      await db.dataSource.query(`UPDATE deployments SET endpoint_url = $2, endpoint_kind = 'cluster_dns' WHERE id = $1`, [
        deploymentId,
        'http://10.0.0.1\\@127.0.0.1:3199/',
      ]);
      const served = await app.inject({ method: 'GET', url: `/api/deployments/${deploymentId}/endpoint`, headers: auth });
      expect(JSON.parse(served.body)).to.deep.equal({ url: PUBLIC, source: 'public', reason: 'endpoint_not_allowed' });

      // the sweep's probe, even with no allow-list: credentials are a spelling the rules refuse
      const internal = new ReadyServer('ok');
      const url = await internal.listen();
      try {
        await db.dataSource.query(`UPDATE deployments SET endpoint_url = NULL, endpoint_kind = NULL WHERE state = 'ready'`);
        await db.dataSource.query(`UPDATE deployments SET endpoint_url = $2, endpoint_kind = 'node_port' WHERE id = $1`, [
          deploymentId,
          url.replace('http://', 'http://user@'),
        ]);
        const report = await new Sweeper({ dataSource: db.dataSource, producer, now: () => NOW, endpointAllow: null }).sweep();
        expect(report).to.deep.include({ probed: 1, stamped: 0, failed: 1, probeFailures: { not_allowed: 1 } });
        expect(internal.requests).to.have.length(0);
      } finally {
        await internal.close();
      }
    });
  });

  describe('derived event ids', () => {
    it("deployment.create.<N> is refused for any other deployment, and N's real create then applies", async () => {
      const victim = randomUUID();
      const squat = await post('deployment.create', { deploymentId: randomUUID(), name: 'squatter', eventId: `deployment.create.${victim}` });
      expect(squat.statusCode).to.equal(400);
      expect(body(squat.body).error?.issues?.map((i) => i.field)).to.deep.equal(['eventId']);
      expect(body(squat.body).error?.issues?.[0]?.rule).to.contain(`must name this event's deploymentId`);
      const real = await post('deployment.create', { deploymentId: victim, name: 'web' });
      expect(real.statusCode).to.equal(202);
      expect(body(real.body).eventId).to.equal(`deployment.create.${victim}`);
      startWorker();
      await waitFor('the real create applied', async () => ((await stateOf(victim))?.state === 'pending' ? true : undefined));
    });

    it("attempt.end.<A> on the attacker's own attempt is refused (intake and SDK), and A's real end applies", async () => {
      const victim = await runningAttempt(service);
      const attacker = await runningAttempt(service);
      const squat = await post('attempt.end', { ...attacker, outcome: 'failed', eventId: `attempt.end.${victim.attemptId}` });
      expect(squat.statusCode).to.equal(400);
      expect(body(squat.body).error?.issues?.map((i) => i.field)).to.deep.equal(['eventId']);
      expect(body(squat.body).error?.issues?.[0]?.rule).to.contain(`must name this event's attemptId`);
      let sdk: unknown;
      await producer.endAttempt({ ...attacker, outcome: 'failed', eventId: `attempt.end.${victim.attemptId}` }).catch((err: unknown) => (sdk = err));
      expect(sdk).to.be.instanceOf(ValidationError);
      expect((sdk as ValidationError).issues.map((i) => i.field)).to.deep.equal(['eventId']);
      expect(await producer.queue.count()).to.equal(0);

      const real = await post('attempt.end', { ...victim, outcome: 'succeeded', endpoint: { url: 'http://10.0.0.1:30000', kind: 'node_port' } });
      expect(real.statusCode).to.equal(202);
      startWorker();
      await waitFor("the victim's end applied", async () => ((await stateOf(victim.deploymentId))?.state === 'ready' ? true : undefined));
    });

    it('the prefix and the subject are compared without regard to case', async () => {
      const victim = await runningAttempt(service);
      const attacker = await runningAttempt(service);
      const upper = `ATTEMPT.END.${victim.attemptId.toUpperCase()}`;
      const asHeartbeat = await post('attempt.heartbeat', { ...victim, eventId: upper });
      expect(asHeartbeat.statusCode).to.equal(400);
      expect(body(asHeartbeat.body).error?.issues?.[0]).to.deep.include({ field: 'eventId' });
      expect(body(asHeartbeat.body).error?.issues?.[0]?.rule).to.contain('belong to attempt.end events');
      const asOtherEnd = await post('attempt.end', { ...attacker, outcome: 'failed', eventId: upper });
      expect(asOtherEnd.statusCode).to.equal(400);
      expect(body(asOtherEnd.body).error?.issues?.[0]?.rule).to.contain(`must name this event's attemptId`);
      expect(await producer.queue.count()).to.equal(0);
    });
  });

  describe('text PostgreSQL cannot store', () => {
    it('a NUL or a lone surrogate in a text field is refused at the intake and by the SDK, naming the field; nothing is enqueued', async () => {
      const ids = await runningAttempt(service);
      for (const reason of ['x\u0000y', 'x\uD800y', '\uDE00']) {
        const res = await post('attempt.cancel', { ...ids, reason });
        expect(res.statusCode, JSON.stringify(reason)).to.equal(400);
        expect(body(res.body).error?.code).to.equal('invalid_payload');
        const issues = body(res.body).error?.issues ?? [];
        expect(issues.map((i) => i.field)).to.deep.equal(['reason']);
        expect(issues[0]?.rule).to.contain('PostgreSQL cannot store');
        let sdk: unknown;
        await producer.cancelAttempt({ ...ids, reason }).catch((err: unknown) => (sdk = err));
        expect(sdk, JSON.stringify(reason)).to.be.instanceOf(ValidationError);
        expect((sdk as ValidationError).issues.map((i) => i.field)).to.deep.equal(['reason']);
      }
      expect(await producer.queue.count()).to.equal(0);
      // a character outside the Basic Multilingual Plane is a surrogate pair, not a lone one
      expect((await post('attempt.cancel', { ...ids, reason: 'x😀y' })).statusCode).to.equal(202);
    });

    it('the worker fails a raw job with such text at once as invalid_payload, without retries', async () => {
      const ids = await runningAttempt(service);
      await producer.queue.add('attempt.cancel', { ...ids, reason: 'x\u0000y' }, { jobId: 'raw-nul', attempts: 5 });
      startWorker();
      const failed = await failedReason('raw-nul');
      expect(failed.failedReason).to.match(/^invalid_payload: reason: /);
      expect(failed.attemptsMade).to.equal(1);
      expect((await stateOf(ids.deploymentId))?.state).to.equal('deploying');
    });
  });
});
