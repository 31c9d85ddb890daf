/**
 * GET /api/summary and the page at /ui (issue 31, item 3) over real Redis and PostgreSQL: the counts right after
 * transitions, the deployments needing a person (and the day's edge), the statement's plan on thousands of rows, and
 * who may read them; the page's files served as written, with their CSP, behind basic auth with a token.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import type IORedis from 'ioredis';
import { SUMMARY_SQL } from '../../src/entities/sql';
import { AuthThrottle } from '../../src/http/auth';
import { UI_CSP, UI_DIR } from '../../src/http/routes/ui';
import { UI_PATH, type HttpDeps } from '../../src/http/server';
import { createToken } from '../../src/http/tokens';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import type { SummaryView } from '../../src/services/read-model/summary';
import { TransitionService } from '../../src/services/transitions';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { testHttpServer } from '../helpers/http';
import { applied } from '../helpers/lifecycle';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';

const NOW = new Date('2026-11-23T12:00:00.000Z');
const HOUR = 3_600_000;
const BOARD = { user: 'ops', password: 'a-board-password-of-some-length' };

/** The node types and index names of an EXPLAIN (FORMAT JSON) plan. */
function planOf(plan: unknown): { nodes: string[]; indexes: string[] } {
  const nodes: string[] = [];
  const indexes: string[] = [];
  const walk = (node: unknown): void => {
    if (Array.isArray(node)) return node.forEach(walk);
    if (typeof node !== 'object' || node === null) return;
    const record = node as Record<string, unknown>;
    if (typeof record['Node Type'] === 'string') nodes.push(record['Node Type']);
    if (typeof record['Index Name'] === 'string') indexes.push(record['Index Name']);
    Object.values(record).forEach(walk);
  };
  walk(plan);
  return { nodes, indexes };
}

describe('GET /api/summary and the page at /ui', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let prefix: string;
  let redis: IORedis;
  let producer: LifecycleProducer;
  let maintenance: Queue;
  let service: TransitionService;
  let app: FastifyInstance;
  let clock: Date;
  let dir: string;
  let tokensFile: string;
  const tokens = {
    reader: createToken('reader', ['read']),
    pusher: createToken('pusher', ['events:write']),
    boarder: createToken('boarder', ['board']),
  };
  const bearer = (t: keyof typeof tokens) => ({ authorization: `Bearer ${tokens[t].token}` });
  const basic = (user: string, password: string) => ({ authorization: `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}` });

  function build(env: Record<string, string> = {}, overrides: Partial<HttpDeps> = {}): Promise<FastifyInstance> {
    return testHttpServer(
      { prefix, dataSource: db.dataSource, producer, redis, maintenance },
      { FLEET_API_TOKENS_FILE: tokensFile, FLEET_BOARD_USER: BOARD.user, FLEET_BOARD_PASSWORD: BOARD.password, ...env },
      { now: () => clock, authThrottle: new AuthThrottle(10_000), ...overrides },
    );
  }

  before(async () => {
    db = await openTestDatabase(4);
    service = new TransitionService({ dataSource: db.dataSource, now: () => clock });
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'summary-ui-'));
    tokensFile = path.join(dir, 'tokens.json');
    fs.writeFileSync(tokensFile, JSON.stringify(Object.values(tokens).map((t) => t.entry)), { mode: 0o600 });
  });
  after(async () => {
    await db?.close();
    if (dir !== undefined) fs.rmSync(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    clock = NOW;
    prefix = uniquePrefix();
    redis = testRedis();
    producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix });
    app = await build();
    await db.dataSource.query('TRUNCATE deployments, attempts, state_transitions, outbox, processed_events CASCADE');
  });
  afterEach(async () => {
    await app.close();
    await maintenance.close();
    await producer.close();
    redis.disconnect();
    await dropPrefix(prefix);
  });

  async function summary(): Promise<SummaryView> {
    const res = await app.inject({ method: 'GET', url: '/api/summary', headers: bearer('reader') });
    expect(res.statusCode, res.body).to.equal(200);
    return res.json<SummaryView>();
  }

  /** A deployment taken through `events` (`start`: create, attempt.create, attempt.start), at the clock of each. */
  async function deployment(
    name: string,
    ...steps: Array<'start' | 'succeed' | 'fail' | 'orphan'>
  ): Promise<{ deploymentId: string; attemptId: string }> {
    const ids = { deploymentId: randomUUID(), attemptId: randomUUID() };
    await applied(service, 'deployment.create', { deploymentId: ids.deploymentId, name });
    for (const step of steps) {
      if (step === 'start') {
        await applied(service, 'attempt.create', ids);
        await applied(service, 'attempt.start', ids);
      } else if (step === 'orphan') {
        clock = new Date(clock.getTime() + 10 * 60_000); // long past FLEET_ORPHAN_AFTER_S without a heartbeat
        await applied(service, 'attempt.orphaned', ids);
      } else {
        await applied(service, 'attempt.end', { ...ids, outcome: step === 'succeed' ? 'succeeded' : 'failed' });
      }
    }
    return ids;
  }

  describe('GET /api/summary', () => {
    it('counts every state, zero included, and counts again right after each transition', async () => {
      expect(await summary()).to.deep.equal({
        counts: { pending: 0, deploying: 0, ready: 0, failed: 0, unknown: 0 },
        attention: [],
        failedSince: new Date(NOW.getTime() - 24 * HOUR).toISOString(),
        at: NOW.toISOString(),
      });
      const a = await deployment('a');
      await deployment('b', 'start');
      await deployment('c', 'start', 'succeed');
      await deployment('d', 'start', 'fail');
      await deployment('e', 'start', 'orphan');
      expect((await summary()).counts).to.deep.equal({ pending: 1, deploying: 1, ready: 1, failed: 1, unknown: 1 });
      await applied(service, 'attempt.create', a);
      expect((await summary()).counts, 'pending -> pending').to.deep.equal({ pending: 1, deploying: 1, ready: 1, failed: 1, unknown: 1 });
      await applied(service, 'attempt.start', a);
      expect((await summary()).counts).to.deep.equal({ pending: 0, deploying: 2, ready: 1, failed: 1, unknown: 1 });
      await applied(service, 'attempt.end', { ...a, outcome: 'succeeded' });
      expect((await summary()).counts).to.deep.equal({ pending: 0, deploying: 1, ready: 2, failed: 1, unknown: 1 });
    });

    it('lists every unknown deployment and those failed in the last 24 hours (the edge included), newest first', async () => {
      clock = new Date(NOW.getTime() - 25 * HOUR);
      await deployment('failed-yesterday', 'start', 'fail');
      clock = new Date(NOW.getTime() - 24 * HOUR);
      const edge = await deployment('failed-at-the-edge', 'start', 'fail');
      clock = new Date(NOW.getTime() - 3 * HOUR);
      const stuck = await deployment('stuck', 'start', 'orphan');
      const resolved = await deployment('resolved', 'start', 'orphan');
      await applied(service, 'deployment.resolve', { deploymentId: resolved.deploymentId, outcome: 'ready' });
      clock = new Date(NOW.getTime() - HOUR);
      const recent = await deployment('failed-recently', 'start', 'fail');
      await deployment('fine', 'start', 'succeed');
      clock = NOW;

      const got = await summary();
      expect(got.counts).to.deep.equal({ pending: 0, deploying: 0, ready: 2, failed: 3, unknown: 1 });
      const entry = (ids: { deploymentId: string }, name: string, state: string, since: Date) => ({
        deploymentId: ids.deploymentId,
        name,
        state,
        since: since.toISOString(),
      });
      expect(got.attention).to.deep.equal([
        entry(recent, 'failed-recently', 'failed', new Date(NOW.getTime() - HOUR)),
        entry(stuck, 'stuck', 'unknown', new Date(NOW.getTime() - 3 * HOUR + 10 * 60_000)),
        entry(edge, 'failed-at-the-edge', 'failed', new Date(NOW.getTime() - 24 * HOUR)),
      ]);
      expect(got.failedSince).to.equal(new Date(NOW.getTime() - 24 * HOUR).toISOString());
      // a day later, only the unknown one still needs a person
      clock = new Date(NOW.getTime() + 24 * HOUR);
      expect((await summary()).attention.map((a) => a.name)).to.deep.equal(['stuck']);
    });

    it('is one statement on the state and attention indexes, with no sequential scan, over thousands of deployments; lists at most 100', async () => {
      await db.dataSource.query(
        `INSERT INTO deployments (id, name, state, version, state_changed_at)
         SELECT gen_random_uuid(), 'd-' || i,
                CASE WHEN i <= 2000 THEN 'ready' WHEN i <= 3000 THEN 'pending' WHEN i <= 3500 THEN 'deploying'
                     WHEN i <= 3900 THEN 'failed' ELSE 'unknown' END,
                3, $1::timestamptz - (i % 48) * interval '1 hour'
           FROM generate_series(1, 4000) AS i`,
        [NOW],
      );
      await db.dataSource.query('ANALYZE deployments');
      const failedSince = new Date(NOW.getTime() - 24 * HOUR);
      const [explained] = await db.dataSource.query<Array<{ 'QUERY PLAN': unknown }>>(`EXPLAIN (FORMAT JSON) ${SUMMARY_SQL.summary.text}`, [
        failedSince,
        100,
      ]);
      const plan = planOf(explained?.['QUERY PLAN']);
      expect(plan.nodes, JSON.stringify(plan)).to.not.include('Seq Scan');
      expect(plan.indexes).to.include('deployments_state_id_idx'); // the counts
      expect(plan.indexes).to.include('deployments_attention_idx'); // the attention list, read in order

      const got = await summary();
      expect(got.counts).to.deep.equal({ pending: 1000, deploying: 500, ready: 2000, failed: 400, unknown: 100 });
      expect(got.attention).to.have.length(100);
      const since = got.attention.map((a) => Date.parse(a.since));
      expect(since).to.deep.equal([...since].sort((x, y) => y - x));
      const [{ n }] = await db.dataSource.query<[{ n: string }]>(
        `SELECT count(*) AS n FROM deployments WHERE state = 'unknown' OR (state = 'failed' AND state_changed_at >= $1)`,
        [failedSince],
      );
      expect(Number(n)).to.be.greaterThan(100);
    });

    it('needs "read": 401 without a token, 403 without the scope; a token as the basic-auth password reads it (the page)', async () => {
      const anonymous = await app.inject({ method: 'GET', url: '/api/summary' });
      expect(anonymous.statusCode).to.equal(401);
      expect(anonymous.headers['www-authenticate']).to.match(/^Bearer /);
      const lacking = await app.inject({ method: 'GET', url: '/api/summary', headers: bearer('pusher') });
      expect(lacking.statusCode).to.equal(403);
      expect(lacking.json()).to.deep.equal({ error: { code: 'forbidden', message: 'this token lacks the "read" scope' } });
      const page = await app.inject({ method: 'GET', url: '/api/summary', headers: basic('anyone', tokens.reader.token) });
      expect(page.statusCode).to.equal(200);
    });
  });

  describe(`the page at ${UI_PATH}`, () => {
    const FILES = [
      { url: UI_PATH, file: 'index.html', type: /^text\/html; charset=utf-8$/ },
      { url: `${UI_PATH}/page.js`, file: 'page.js', type: /^text\/javascript; charset=utf-8$/ },
      { url: `${UI_PATH}/page.css`, file: 'page.css', type: /^text\/css; charset=utf-8$/ },
    ];

    for (const { url, file, type } of FILES) {
      it(`${url}: ${file} as written, with the CSP, to a token given as the basic-auth password`, async () => {
        const res = await app.inject({ method: 'GET', url, headers: basic('anyone', tokens.reader.token) });
        expect(res.statusCode, res.body.slice(0, 200)).to.equal(200);
        expect(res.headers['content-type']).to.match(type);
        expect(res.body).to.equal(fs.readFileSync(path.join(UI_DIR, file), 'utf8'));
        expect(res.headers['content-security-policy']).to.equal(UI_CSP);
        expect(res.headers['x-content-type-options']).to.equal('nosniff');
        expect(res.headers['x-frame-options']).to.equal('DENY');
        const asBearer = await app.inject({ method: 'GET', url, headers: bearer('reader') });
        expect(asBearer.statusCode).to.equal(200);
      });
    }

    it('allows only its own files and origin: no inline script or style, nothing from elsewhere', async () => {
      expect(UI_CSP).to.contain("default-src 'none'").and.contain("script-src 'self'").and.contain("connect-src 'self'");
      expect(UI_CSP).to.not.contain('unsafe');
      const html = (await app.inject({ method: 'GET', url: UI_PATH, headers: bearer('reader') })).body;
      expect(html).to.match(/<meta name="viewport"/);
      expect([...html.matchAll(/<script\b[^>]*>/g)].map((m) => m[0])).to.deep.equal(['<script src="/ui/page.js" defer>']);
      expect(html).to.not.match(/<style|\sstyle=|\son[a-z]+=|https?:\/\//i);
      const js = (await app.inject({ method: 'GET', url: `${UI_PATH}/page.js`, headers: bearer('reader') })).body;
      expect(js, 'data goes in as text, never as HTML').to.not.match(/innerHTML|outerHTML|insertAdjacentHTML|document\.write/);
    });

    it('asks a browser for basic auth: 401 with a Basic challenge without a token or with a wrong one', async () => {
      for (const headers of [{}, basic('anyone', createToken('nobody', ['read']).token), { authorization: 'Bearer nope' }]) {
        const res = await app.inject({ method: 'GET', url: UI_PATH, headers });
        expect(res.statusCode).to.equal(401);
        // a browser answers the Basic challenge with the credentials it holds for the realm, or asks for them
        expect([res.headers['www-authenticate']].flat()).to.include('Basic realm="lifecycle-fleet", charset="UTF-8"');
        expect(res.json<{ error: { code: string } }>().error.code).to.equal('unauthorized');
      }
    });

    it('403 without "read": a token of other scopes (board included), and the board\'s own pair', async () => {
      for (const headers of [basic('anyone', tokens.pusher.token), basic('anyone', tokens.boarder.token), basic(BOARD.user, BOARD.password)]) {
        for (const url of [UI_PATH, `${UI_PATH}/page.js`]) {
          const res = await app.inject({ method: 'GET', url, headers });
          expect(res.statusCode, url).to.equal(403);
          expect(res.json<{ error: { code: string; message: string } }>().error.code).to.equal('forbidden');
        }
      }
    });

    it(`is open on loopback without a tokens file, like the API; ${UI_PATH}/ leads to ${UI_PATH}`, async () => {
      const open = await build({ FLEET_API_TOKENS_FILE: '', FLEET_BOARD_USER: '', FLEET_BOARD_PASSWORD: '' });
      try {
        for (const { url } of FILES) expect((await open.inject({ method: 'GET', url })).statusCode, url).to.equal(200);
        expect((await open.inject({ method: 'GET', url: '/api/summary' })).statusCode).to.equal(200);
        const slash = await open.inject({ method: 'GET', url: `${UI_PATH}/` });
        expect(slash.statusCode).to.equal(308);
        expect(slash.headers.location).to.equal(UI_PATH);
      } finally {
        await open.close();
      }
    });
  });
});
