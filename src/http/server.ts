/**
 * The HTTP surface (CONTRACT.md, "HTTP"): the read API, dispatch, event intake, health, metrics and Bull Board.
 * Errors are JSON `{error: {code, message}}`; intake errors also carry `issues: [{field, rule}]`.
 */
import { timingSafeEqual, createHash } from 'node:crypto';
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { FastifyAdapter } from '@bull-board/fastify';
import type { Queue } from 'bullmq';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type IORedis from 'ioredis';
import type { DataSource } from 'typeorm';
import type { FleetConfig } from '../config';
import { migrationsApplied } from '../entities/migrate';
import { ValidationError } from '../errors';
import type { Logger } from '../log';
import type { FleetMetrics } from '../metrics';
import { DEPLOYMENT_STATES } from '../machine';
import type { LifecycleProducer } from '../queues/producer';
import { resolveEndpoint } from '../services/dispatch';
import { getDeployment, listAttempts, listDeployments, listTransitions } from '../services/read-model';

export interface HttpDeps {
  readonly config: FleetConfig;
  readonly dataSource: DataSource;
  readonly producer: LifecycleProducer;
  /** a connection for /readyz */
  readonly redis: IORedis;
  /** queues shown in Bull Board */
  readonly queues: readonly Queue[];
  readonly metrics: FleetMetrics;
  readonly logger: Logger;
  /** the clock for dispatch (default `() => new Date()`) */
  readonly now?: () => Date;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
export const BOARD_PATH = '/admin/queues';

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly issues?: ReadonlyArray<{ field: string; rule: string }>,
  ) {
    super(message);
  }
}

function deploymentId(request: FastifyRequest): string {
  const { id } = request.params as { id: string };
  if (!UUID.test(id)) throw new HttpError(400, 'invalid_id', `id: must be a UUID, got "${id.slice(0, 60)}"`);
  return id;
}

function intParam(value: unknown, field: string, fallback: number, min: number, max: number): number {
  if (value === undefined || value === '') return fallback;
  if (typeof value !== 'string' || !/^\d+$/.test(value) || Number(value) < min || Number(value) > max) {
    throw new HttpError(400, 'invalid_query', `${field}: must be a whole number from ${min} to ${max}`);
  }
  return Number(value);
}

function sameSecret(given: string, expected: string): boolean {
  // compare digests: equal length, constant time, and no length leak
  const a = createHash('sha256').update(given).digest();
  const b = createHash('sha256').update(expected).digest();
  return timingSafeEqual(a, b);
}

/** Builds the server (not listening). */
export async function buildHttpServer(deps: HttpDeps): Promise<FastifyInstance> {
  const { config, dataSource: ds, metrics } = deps;
  const now = deps.now ?? (() => new Date());
  const app = Fastify({
    logger: false,
    bodyLimit: 64 * 1024,
    // reject `__proto__` and `constructor.prototype` keys in JSON bodies outright
    onProtoPoisoning: 'error',
    onConstructorPoisoning: 'error',
  });

  app.setErrorHandler((err: unknown, request, reply) => {
    if (err instanceof HttpError) {
      return reply.status(err.status).send({ error: { code: err.code, message: err.message, ...(err.issues ? { issues: err.issues } : {}) } });
    }
    const e = err as { statusCode?: number; code?: string; message?: string };
    if (typeof e.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) {
      return reply.status(e.statusCode).send({ error: { code: e.code ?? 'bad_request', message: e.message ?? 'bad request' } });
    }
    deps.logger.error({ err, url: request.url }, 'http request failed');
    return reply.status(500).send({ error: { code: 'internal', message: 'internal error' } });
  });
  app.setNotFoundHandler((request, reply) =>
    reply.status(404).send({ error: { code: 'not_found', message: `no route ${request.method} ${request.url.split('?')[0] ?? ''}` } }),
  );

  // --- read API ---
  app.get('/api/deployments/:id', async (request) => {
    const id = deploymentId(request);
    const deployment = await getDeployment(ds, id);
    if (deployment === null) throw new HttpError(404, 'not_found', `deployment ${id} not found`);
    return deployment;
  });

  app.get('/api/deployments', async (request) => {
    const query = request.query as Record<string, string | undefined>;
    const state = query.state;
    if (state !== undefined && state !== '' && !(DEPLOYMENT_STATES as readonly string[]).includes(state)) {
      throw new HttpError(400, 'invalid_query', `state: must be one of ${DEPLOYMENT_STATES.join(', ')}`);
    }
    const limit = intParam(query.limit, 'limit', 50, 1, 500);
    const cursor = query.cursor;
    if (cursor !== undefined && cursor !== '' && !UUID.test(cursor)) throw new HttpError(400, 'invalid_query', 'cursor: must be a cursor from a previous page');
    return listDeployments(ds, { state: state === '' ? undefined : (state as (typeof DEPLOYMENT_STATES)[number] | undefined), limit, after: cursor || undefined });
  });

  async function requireDeployment(id: string): Promise<void> {
    const rows = await ds.query<unknown[]>(`SELECT 1 FROM deployments WHERE id = $1`, [id]);
    if (rows.length === 0) throw new HttpError(404, 'not_found', `deployment ${id} not found`);
  }

  app.get('/api/deployments/:id/attempts', async (request) => {
    const id = deploymentId(request);
    await requireDeployment(id);
    return { items: await listAttempts(ds, id) };
  });

  app.get('/api/deployments/:id/transitions', async (request) => {
    const id = deploymentId(request);
    const query = request.query as Record<string, string | undefined>;
    const afterVersion = intParam(query.afterVersion, 'afterVersion', 0, 0, 2_147_483_647);
    const limit = intParam(query.limit, 'limit', 100, 1, 1000);
    await requireDeployment(id);
    const items = await listTransitions(ds, id, afterVersion, limit);
    const last = items[items.length - 1];
    return { items, nextAfterVersion: items.length === limit && last !== undefined ? last.version : null };
  });

  // --- dispatch ---
  app.get('/api/deployments/:id/endpoint', async (request) => {
    const id = deploymentId(request);
    const deployment = await getDeployment(ds, id);
    if (deployment === null) throw new HttpError(404, 'not_found', `deployment ${id} not found`);
    const answer = resolveEndpoint(deployment, now(), {
      readyWindowS: config.readyWindowS,
      publicEndpointUrl: config.publicEndpointUrl,
    });
    metrics.dispatched(answer.source, answer.reason);
    return answer;
  });

  // --- intake ---
  app.post('/api/events', async (request, reply) => {
    const body = request.body;
    if (typeof body !== 'object' || body === null || Array.isArray(body)) {
      throw new HttpError(400, 'invalid_body', 'body: must be a JSON object {name, data}', [{ field: '(root)', rule: 'must be a JSON object {name, data}' }]);
    }
    const extra = Object.keys(body).filter((k) => k !== 'name' && k !== 'data');
    const { name, data } = body as { name?: unknown; data?: unknown };
    const issues = [
      ...(typeof name === 'string' ? [] : [{ field: 'name', rule: 'is required: the event name' }]),
      ...(data === undefined ? [{ field: 'data', rule: 'is required: the event payload' }] : []),
      ...(extra.length > 0 ? [{ field: '(root)', rule: `unknown field(s): ${extra.map((k) => k.slice(0, 40)).join(', ')}` }] : []),
    ];
    if (issues.length > 0) throw new HttpError(400, 'invalid_body', issues.map((i) => `${i.field}: ${i.rule}`).join('; '), issues);
    try {
      const result = await deps.producer.enqueue(name as string, data);
      return await reply.status(202).send(result);
    } catch (err) {
      if (err instanceof ValidationError) throw new HttpError(400, err.code, err.message, err.issues);
      throw err;
    }
  });

  // --- health and metrics ---
  app.get('/healthz', async () => ({ status: 'ok' }));
  app.get('/readyz', async (request, reply) => {
    const checks: Record<string, string> = {};
    const check = async (name: string, fn: () => Promise<boolean>) => {
      try {
        checks[name] = (await withTimeout(fn(), 2000)) ? 'ok' : 'failing';
      } catch (err) {
        // the details go to the log, not to an unauthenticated caller (they may name hosts or users)
        deps.logger.warn({ err, check: name }, 'readiness check failed');
        checks[name] = 'failing';
      }
    };
    await Promise.all([
      check('redis', async () => (await deps.redis.ping()) === 'PONG'),
      check('postgres', async () => (await ds.query<unknown[]>('SELECT 1')).length === 1),
      check('migrations', () => migrationsApplied(ds)),
    ]);
    const ok = Object.values(checks).every((v) => v === 'ok');
    return reply.status(ok ? 200 : 503).send({ status: ok ? 'ok' : 'unavailable', checks });
  });
  app.get('/metrics', async (request, reply) => reply.type(metrics.contentType).send(await metrics.text()));

  await registerBoard(app, deps);
  return app;
}

async function registerBoard(app: FastifyInstance, deps: HttpDeps): Promise<void> {
  const { boardUser, boardPassword } = deps.config;
  const authenticated = boardUser !== null && boardPassword !== null;
  const serverAdapter = new FastifyAdapter();
  serverAdapter.setBasePath(BOARD_PATH);
  createBullBoard({
    // without credentials the board is read-only: nobody may retry, clean or remove jobs anonymously
    queues: deps.queues.map((q) => new BullMQAdapter(q, { readOnlyMode: !authenticated })),
    serverAdapter,
    options: { uiConfig: { boardTitle: 'lifecycle-fleet' } },
  });

  await app.register(
    async (board) => {
      board.addHook('onRequest', async (request: FastifyRequest, reply: FastifyReply) => {
        if (authenticated) {
          if (!basicAuthOk(request.headers.authorization, boardUser, boardPassword)) {
            return reply
              .status(401)
              .header('www-authenticate', 'Basic realm="lifecycle-fleet", charset="UTF-8"')
              .send({ error: { code: 'unauthorized', message: 'Bull Board needs the FLEET_BOARD_USER credentials' } });
          }
        } else if (request.method !== 'GET' && request.method !== 'HEAD') {
          return reply
            .status(403)
            .send({ error: { code: 'forbidden', message: 'Bull Board is read-only without FLEET_BOARD_USER/FLEET_BOARD_PASSWORD' } });
        }
        return undefined;
      });
      await board.register(serverAdapter.registerPlugin(), { prefix: BOARD_PATH });
    },
  );
}

function basicAuthOk(header: string | undefined, user: string, password: string): boolean {
  if (header === undefined || !header.startsWith('Basic ')) return false;
  const decoded = Buffer.from(header.slice(6), 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return false;
  // evaluate both: no early exit that tells which half was wrong
  const userOk = sameSecret(decoded.slice(0, colon), user);
  const passwordOk = sameSecret(decoded.slice(colon + 1), password);
  return userOk && passwordOk;
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
    promise.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e instanceof Error ? e : new Error(String(e)));
      },
    );
  });
}
