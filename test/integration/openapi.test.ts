/**
 * The OpenAPI document (issue 19, part 2) over real Redis and PostgreSQL: it is a well-formed OpenAPI 3.1 document
 * that lists every route the server has (Bull Board's and the document's own aside); every route's answers, success
 * and errors, validate against the schema the document gives for that route and status; and /openapi.json and
 * /docs sit behind the API's auth.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type { FastifyInstance, InjectOptions, LightMyRequestResponse } from 'fastify';
import type IORedis from 'ioredis';
import Ajv2020 from 'ajv/dist/2020';
import addFormats from 'ajv-formats';
import { AuthThrottle } from '../../src/http/auth';
import { BOARD_PATH, DOCS_PATH, OPENAPI_PATH, type HttpDeps } from '../../src/http/server';
import { createToken } from '../../src/http/tokens';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { TransitionService } from '../../src/services/transitions';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { routesOf, testHttpServer } from '../helpers/http';

const NOW = new Date('2026-11-23T12:00:00.000Z');
const METHODS = ['get', 'put', 'post', 'delete', 'patch'] as const;
/** The error statuses every operation's test must reach where the document lists them. */
const MAIN_ERRORS = ['400', '401', '403', '404', '409'];

interface Answer {
  readonly description?: string;
  readonly content?: Record<string, { readonly schema?: unknown }>;
}
interface Operation {
  readonly summary?: string;
  readonly description?: string;
  readonly parameters?: ReadonlyArray<{ readonly name: string; readonly in: string; readonly required?: boolean; readonly schema?: unknown }>;
  readonly requestBody?: { readonly content?: Record<string, { readonly schema?: unknown }> };
  readonly responses?: Record<string, Answer>;
  readonly security?: ReadonlyArray<Record<string, unknown>>;
  readonly 'x-scope'?: string;
}
interface OpenApiDocument {
  readonly openapi: string;
  readonly info: { readonly title: string; readonly version: string };
  readonly paths: Record<string, Partial<Record<(typeof METHODS)[number], Operation>>>;
  readonly components: {
    readonly schemas: Record<string, unknown>;
    readonly securitySchemes: Record<string, { readonly type: string; readonly scheme?: string }>;
  };
  readonly security?: ReadonlyArray<Record<string, unknown>>;
}

/** Every operation of the document, as `GET /api/deployments/{id}`. */
function operationsOf(doc: OpenApiDocument): string[] {
  return Object.entries(doc.paths).flatMap(([p, item]) => METHODS.filter((m) => item[m] !== undefined).map((m) => `${m.toUpperCase()} ${p}`));
}

describe('OpenAPI: the document, every answer against it, and its auth', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let prefix: string;
  let redis: IORedis;
  let producer: LifecycleProducer;
  let maintenance: Queue;
  let service: TransitionService;
  let app: FastifyInstance;
  let doc: OpenApiDocument;
  let ajv: Ajv2020;
  let dir: string;
  let tokensFile: string;
  const tokens = {
    reader: createToken('reader', ['read']),
    writer: createToken('writer', ['read', 'events:write']),
    pusher: createToken('pusher', ['events:write']),
  };
  const bearer = (t: keyof typeof tokens) => ({ authorization: `Bearer ${tokens[t].token}` });

  async function build(env: Record<string, string> = {}, overrides: Partial<HttpDeps> = {}): Promise<FastifyInstance> {
    return testHttpServer(
      { prefix, dataSource: db.dataSource, producer, redis, maintenance },
      { FLEET_API_TOKENS_FILE: tokensFile, FLEET_METRICS_AUTH: 'read', ...env },
      { now: () => NOW, authThrottle: new AuthThrottle(10_000), ...overrides },
    );
  }

  before(async () => {
    db = await openTestDatabase(8);
    service = new TransitionService({ dataSource: db.dataSource, now: () => NOW });
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'openapi-'));
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
    const res = await app.inject({ method: 'GET', url: OPENAPI_PATH, headers: bearer('reader') });
    expect(res.statusCode, res.body).to.equal(200);
    doc = res.json<OpenApiDocument>();
    ajv = new Ajv2020({ strict: false, allErrors: true });
    addFormats(ajv);
    ajv.addSchema(doc, 'openapi');
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

  /** A JSON pointer into the document, as a URI fragment. */
  const pointer = (...tokens: string[]) => tokens.map((t) => encodeURIComponent(t.replace(/~/g, '~0').replace(/\//g, '~1'))).join('/');

  /**
   * Checks one answer against the document: the operation lists its status, with a body of its media type, and the
   * body validates against that schema. Returns the status, so a test can say which statuses it reached.
   */
  function conforms(operation: string, res: LightMyRequestResponse): string {
    const [method = '', template = ''] = operation.split(' ');
    const status = String(res.statusCode);
    const answer = doc.paths[template]?.[method.toLowerCase() as (typeof METHODS)[number]]?.responses?.[status];
    expect(answer, `${operation} answered ${status} (${res.body.slice(0, 200)}), which the document does not list`).to.not.equal(undefined);
    const media = (res.headers['content-type'] ?? '').toString().split(';')[0]?.trim() ?? '';
    expect(Object.keys(answer?.content ?? {}), `${operation} ${status}: the media type`).to.include(media);
    const validate = ajv.compile({
      $ref: `openapi#/${pointer('paths', template, method.toLowerCase(), 'responses', status, 'content', media, 'schema')}`,
    });
    const body: unknown = media === 'application/json' ? res.json() : res.body;
    expect(validate(body), `${operation} ${status}: ${ajv.errorsText(validate.errors)}\n${res.body.slice(0, 500)}`).to.equal(true);
    return status;
  }

  /** Each operation of the document: the requests that reach its success and its main errors. */
  const CASES: Record<string, (op: string) => Promise<string[]>> = {
    'GET /api/deployments/{id}': async (op) => {
      const id = await readyDeployment();
      const pending = randomUUID();
      await service.apply('deployment.create', { deploymentId: pending, name: 'quiet' }, { fallbackEventId: randomUUID() });
      return [
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}`, headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${pending}`, headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: '/api/deployments/nope', headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}` })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}`, headers: bearer('pusher') })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${randomUUID()}`, headers: bearer('reader') })),
      ];
    },
    'GET /api/deployments': async (op) => {
      await readyDeployment();
      await readyDeployment();
      const page = await app.inject({ method: 'GET', url: '/api/deployments?limit=1', headers: bearer('reader') });
      expect(page.json<{ nextCursor: string | null }>().nextCursor).to.be.a('string');
      return [
        conforms(op, page),
        conforms(op, await app.inject({ method: 'GET', url: '/api/deployments?state=ready&limit=500', headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: '/api/deployments?limit=0', headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: '/api/deployments' })),
        conforms(op, await app.inject({ method: 'GET', url: '/api/deployments', headers: bearer('pusher') })),
      ];
    },
    'GET /api/deployments/{id}/attempts': async (op) => {
      const id = await readyDeployment();
      return [
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}/attempts`, headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: '/api/deployments/nope/attempts', headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}/attempts` })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}/attempts`, headers: bearer('pusher') })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${randomUUID()}/attempts`, headers: bearer('reader') })),
      ];
    },
    'GET /api/deployments/{id}/transitions': async (op) => {
      const id = await readyDeployment();
      const page = await app.inject({ method: 'GET', url: `/api/deployments/${id}/transitions?limit=2`, headers: bearer('reader') });
      expect(page.json<{ nextAfterVersion: number | null }>().nextAfterVersion).to.equal(2);
      return [
        conforms(op, page),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}/transitions?afterVersion=2`, headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}/transitions?afterVersion=-1`, headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}/transitions` })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}/transitions`, headers: bearer('pusher') })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${randomUUID()}/transitions`, headers: bearer('reader') })),
      ];
    },
    'GET /api/deployments/{id}/endpoint': async (op) => {
      const id = await readyDeployment();
      return [
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}/endpoint`, headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: '/api/deployments/nope/endpoint', headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}/endpoint` })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${id}/endpoint`, headers: bearer('pusher') })),
        conforms(op, await app.inject({ method: 'GET', url: `/api/deployments/${randomUUID()}/endpoint`, headers: bearer('reader') })),
      ];
    },
    'POST /api/events': async (op) => {
      const post = (target: FastifyInstance, name: string, data: Record<string, unknown>, headers: Record<string, string> = bearer('writer')) =>
        target.inject({ method: 'POST', url: '/api/events', headers, payload: { name, data } } satisfies InjectOptions);
      const deploymentId = randomUUID();
      const statuses = [
        conforms(op, await post(app, 'deployment.create', { deploymentId, name: 'web', eventId: 'openapi-create' })),
        conforms(op, await post(app, 'deployment.create', { deploymentId, name: 'web', eventId: 'openapi-create' })), // duplicate
        conforms(op, await post(app, 'deployment.create', { deploymentId: 'nope', name: 'Web!' })),
        conforms(op, await post(app, 'deployment.create', { deploymentId, name: 'web' }, {})),
        conforms(op, await post(app, 'deployment.resolve', { deploymentId, outcome: 'ready' }, bearer('pusher'))),
        conforms(op, await post(app, 'deployment.create', { deploymentId: randomUUID(), name: 'other', eventId: 'openapi-create' })),
        conforms(
          op,
          await app.inject({
            method: 'POST',
            url: '/api/events',
            headers: { ...bearer('writer'), 'content-type': 'application/xml' },
            payload: '<a/>',
          }),
        ),
      ];
      const limited = await build({ FLEET_EVENTS_RATE_LIMIT: '1' });
      const dead = new LifecycleProducer({ connection: 'redis://127.0.0.1:1', prefix });
      const unavailable = await build({}, { producer: dead });
      try {
        // two at once against one a second: one is refused, however slow the machine
        const both = await Promise.all([1, 2].map(() => post(limited, 'deployment.create', { deploymentId: randomUUID(), name: 'web' })));
        statuses.push(...both.map((res) => conforms(op, res)));
        statuses.push(conforms(op, await post(unavailable, 'deployment.create', { deploymentId: randomUUID(), name: 'web' })));
      } finally {
        await limited.close();
        await unavailable.close();
        await dead.close();
      }
      expect(statuses).to.include.members(['429', '503', '415']);
      return statuses;
    },
    'GET /api/watch': async (op) => {
      // a stream that ends by itself: a Last-Event-ID that is no cursor is answered with a resync, then the end
      const resync = await app.inject({ method: 'GET', url: '/api/watch', headers: { ...bearer('reader'), 'last-event-id': 'not-a-cursor' } });
      expect(resync.body).to.match(/^retry: 2000\n\nevent: resync\ndata: \{"reason":"bad_cursor"/);
      return [
        conforms(op, resync),
        conforms(op, await app.inject({ method: 'GET', url: '/api/watch?state=sleeping', headers: bearer('reader') })),
        conforms(op, await app.inject({ method: 'GET', url: '/api/watch' })),
        conforms(op, await app.inject({ method: 'GET', url: '/api/watch', headers: bearer('pusher') })),
      ];
    },
    'GET /healthz': async (op) => [conforms(op, await app.inject({ method: 'GET', url: '/healthz' }))],
    'GET /readyz': async (op) => [conforms(op, await app.inject({ method: 'GET', url: '/readyz' }))],
    'GET /metrics': async (op) => [
      conforms(op, await app.inject({ method: 'GET', url: '/metrics', headers: bearer('reader') })),
      conforms(op, await app.inject({ method: 'GET', url: '/metrics' })),
      conforms(op, await app.inject({ method: 'GET', url: '/metrics', headers: bearer('pusher') })),
    ],
  };

  describe('the document', () => {
    it('is OpenAPI 3.1: info, a bearer scheme, each operation with its scope and answers, every schema valid and every $ref resolved', () => {
      expect(doc.openapi).to.match(/^3\.1\.\d+$/);
      expect(doc.info.title).to.equal('lifecycle-fleet');
      expect(doc.info.version).to.match(/^\d+\.\d+\.\d+/);
      expect(doc.components.securitySchemes.bearer).to.deep.include({ type: 'http', scheme: 'bearer' });
      expect(doc.security).to.deep.equal([{ bearer: [] }]);
      for (const op of operationsOf(doc)) {
        const [method = '', template = ''] = op.split(' ');
        const operation = doc.paths[template]?.[method.toLowerCase() as (typeof METHODS)[number]];
        expect(template, op).to.match(/^\//);
        expect(operation?.summary, `${op}: a summary`).to.be.a('string');
        // a guarded operation names its scope; an open one says it needs no token
        if (operation?.security === undefined) expect(operation?.['x-scope'], `${op}: x-scope`).to.be.oneOf(['read', 'events:write']);
        else expect(operation.security, `${op}: open`).to.deep.equal([]);
        // every {param} of the path is a required path parameter, and nothing else is
        const inPath = [...template.matchAll(/\{([^}]+)\}/g)].map((m) => m[1]);
        const declared = (operation?.parameters ?? []).filter((p) => p.in === 'path');
        expect(
          declared.map((p) => p.name),
          `${op}: path parameters`,
        ).to.deep.equal(inPath);
        expect(
          declared.every((p) => p.required === true),
          `${op}: path parameters required`,
        ).to.equal(true);
        const responses = Object.entries(operation?.responses ?? {});
        expect(responses, `${op}: answers`).to.not.be.empty;
        for (const [status, answer] of responses) {
          expect(status, op).to.match(/^[1-5]\d\d$/);
          expect(answer.description, `${op} ${status}: a description`).to.be.a('string').and.not.equal('Default Response');
          // every error answer is the one error shape, referenced
          if (Number(status) >= 400 && !(template === '/readyz' && status === '503')) {
            expect(answer.content?.['application/json']?.schema, `${op} ${status}`).to.deep.equal({ $ref: '#/components/schemas/ApiError' });
          }
        }
      }
      // every schema of the document compiles as JSON Schema 2020-12, which resolves every $ref in it
      const schemas = [
        ...Object.keys(doc.components.schemas).map((id) => pointer('components', 'schemas', id)),
        ...operationsOf(doc).flatMap((op) => {
          const [method = '', template = ''] = op.split(' ');
          const operation = doc.paths[template]?.[method.toLowerCase() as (typeof METHODS)[number]];
          return [
            ...Object.entries(operation?.responses ?? {}).flatMap(([status, answer]) =>
              Object.keys(answer.content ?? {}).map((media) =>
                pointer('paths', template, method.toLowerCase(), 'responses', status, 'content', media, 'schema'),
              ),
            ),
            ...Object.keys(operation?.requestBody?.content ?? {}).map((media) =>
              pointer('paths', template, method.toLowerCase(), 'requestBody', 'content', media, 'schema'),
            ),
            ...(operation?.parameters ?? []).map((_, i) => pointer('paths', template, method.toLowerCase(), 'parameters', String(i), 'schema')),
          ];
        }),
      ];
      expect(schemas.length).to.be.greaterThan(40);
      for (const at of schemas) expect(() => ajv.compile({ $ref: `openapi#/${at}` }), at).to.not.throw();
    });

    it("lists every route the server has, and only those, leaving out Bull Board's and its own", () => {
      const hidden = (route: string) => {
        const p = route.split(' ')[1] ?? '';
        return p.startsWith(BOARD_PATH) || p === DOCS_PATH || p.startsWith(`${DOCS_PATH}/`) || p === OPENAPI_PATH;
      };
      const routes = routesOf(app);
      // the route tree was read: the board's, the UI's and the API's routes are all in it
      expect(routes).to.include.members([
        'GET /api/deployments/{id}/transitions',
        `GET ${OPENAPI_PATH}`,
        `GET ${DOCS_PATH}/json`,
        `PUT ${BOARD_PATH}/api/queues/{queueName}/pause`,
      ]);
      expect(operationsOf(doc).sort()).to.deep.equal(routes.filter((r) => !hidden(r)).sort());
    });

    it('describes the request: path and query parameters, and the events the intake takes', () => {
      const list = doc.paths['/api/deployments']?.get?.parameters ?? [];
      expect(list.map((p) => [p.name, p.in, p.required])).to.deep.equal([
        ['state', 'query', false],
        ['limit', 'query', false],
        ['cursor', 'query', false],
      ]);
      const body = doc.paths['/api/events']?.post?.requestBody?.content?.['application/json']?.schema;
      expect(body).to.deep.equal({ $ref: '#/components/schemas/EventBodyInput' });
      const validate = ajv.compile({ $ref: `openapi#/${pointer('components', 'schemas', 'EventBodyInput')}` });
      const deploymentId = randomUUID();
      expect(validate({ name: 'deployment.create', data: { deploymentId, name: 'web' } }), ajv.errorsText(validate.errors)).to.equal(true);
      expect(validate({ name: 'attempt.end', data: { deploymentId, attemptId: randomUUID(), outcome: 'succeeded' } })).to.equal(true);
      expect(validate({ name: 'deployment.create', data: { deploymentId, name: 'web', actor: 'me' } }), 'actor is set from the caller').to.equal(
        false,
      );
      expect(validate({ name: 'deployment.sleep', data: { deploymentId } })).to.equal(false);
    });
  });

  describe('every answer of every route validates against the document', () => {
    it('has a case for every operation of the document', () => {
      expect(Object.keys(CASES).sort()).to.deep.equal(operationsOf(doc).sort());
    });

    for (const [op, run] of Object.entries(CASES)) {
      it(`${op}: its success and its main errors`, async () => {
        const reached = new Set(await run(op));
        const [method = '', template = ''] = op.split(' ');
        const documented = Object.keys(doc.paths[template]?.[method.toLowerCase() as (typeof METHODS)[number]]?.responses ?? {});
        const expected = documented.filter((s) => /^2\d\d$/.test(s) || MAIN_ERRORS.includes(s));
        expect([...reached].sort(), `${op}: statuses reached`).to.include.members(expected);
      });
    }
  });

  describe('auth of the document and its UI', () => {
    for (const url of [
      OPENAPI_PATH,
      DOCS_PATH,
      `${DOCS_PATH}/`,
      `${DOCS_PATH}/json`,
      `${DOCS_PATH}/static/index.html`,
      `${DOCS_PATH}/static/swagger-ui-bundle.js`,
    ]) {
      it(`${url}: 401 without a token, 403 without "read", 200 with it`, async () => {
        const anonymous = await app.inject({ method: 'GET', url });
        expect(anonymous.statusCode).to.equal(401);
        expect(anonymous.headers['www-authenticate']).to.match(/^Bearer /);
        expect(anonymous.json<{ error: { code: string } }>().error.code).to.equal('unauthorized');
        const wrong = await app.inject({ method: 'GET', url, headers: { authorization: `Bearer ${createToken('nobody', ['read']).token}` } });
        expect(wrong.statusCode).to.equal(401);
        const lacking = await app.inject({ method: 'GET', url, headers: bearer('pusher') });
        expect(lacking.statusCode).to.equal(403);
        expect(lacking.json<{ error: { code: string; message: string } }>().error).to.deep.equal({
          code: 'forbidden',
          message: 'this token lacks the "read" scope',
        });
        const allowed = await app.inject({ method: 'GET', url, headers: bearer('reader') });
        expect(allowed.statusCode, allowed.body.slice(0, 200)).to.be.oneOf([200, 302]);
      });
    }

    it('the UI is HTML with the API document, and everything it loads is its own (a same-origin CSP)', async () => {
      const page = await app.inject({ method: 'GET', url: `${DOCS_PATH}/`, headers: bearer('reader') });
      expect(page.statusCode).to.equal(200);
      expect(page.headers['content-type']).to.match(/^text\/html/);
      expect(page.body).to.contain('swagger-ui-bundle.js');
      expect(page.body).to.not.match(/https?:\/\//);
      expect(page.headers['content-security-policy']).to.match(/default-src 'self'/);
      const json = await app.inject({ method: 'GET', url: `${DOCS_PATH}/json`, headers: bearer('reader') });
      expect(json.json<OpenApiDocument>().paths).to.deep.equal(doc.paths);
    });

    it('is open, like the API, on loopback without a tokens file', async () => {
      const open = await testHttpServer({ prefix, dataSource: db.dataSource, producer, redis, maintenance });
      try {
        for (const url of [OPENAPI_PATH, `${DOCS_PATH}/`, `${DOCS_PATH}/json`]) {
          expect((await open.inject({ method: 'GET', url })).statusCode, url).to.equal(200);
        }
      } finally {
        await open.close();
      }
    });
  });
});
