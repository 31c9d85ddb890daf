/**
 * The HTTP surface (docs/contract.md, "HTTP"): the read API, dispatch, event intake, health, metrics and Bull Board.
 * Errors are JSON `{error: {code, message}}`; intake errors also carry `issues: [{field, rule}]`.
 *
 * Access: with a tokens file, every `/api` route needs a bearer token with its scope (`read` for GETs,
 * `events:write` or `events:admin` for POST /api/events, by event); 401 without or with a wrong token, 403 without
 * the scope. Without one (loopback only: the config refuses it elsewhere) the API is open. `/healthz` and `/readyz`
 * are always open; `/metrics` needs `read` when FLEET_METRICS_AUTH=read. Failed authentications are throttled per
 * client address; intake is rate-limited per token.
 */
import rateLimit from '@fastify/rate-limit';
import type { Queue } from 'bullmq';
import { createServer, STATUS_CODES } from 'node:http';
import type { Duplex } from 'node:stream';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { RedisConnection } from '../queues/redis';
import type { DataSource } from 'typeorm';
import type { FleetConfig } from '../config';
import { migrationsApplied } from '../entities/migrate';
import { rejectAfter } from '../util';
import { registerBoard } from './board';
import { ADMIN_SQL, Database, deploymentExists } from '../entities/sql';
import { DurabilityError, EventIdConflictError, isTransient, ValidationError } from '../errors';
import { assertEndpointAllowed } from '../events/endpoint-allow';
import { ANONYMOUS_ACTOR, deriveEventId, parsePayload, UUID_PATTERN, type EventName } from '../events/schemas';
import { AuthThrottle, hasScope, readAccess, scopeForEvent, type Access, type Credentials } from './auth';
import { TokenStore, type Scope } from './tokens';
import type { Logger } from '../log';
import type { FleetMetrics } from '../metrics';
import { DEPLOYMENT_STATES } from '../machine';
import type { LifecycleProducer } from '../queues/producer';
import { resolveEndpoint } from '../services/dispatch';
import { getDeployment, listAttempts, listDeployments, listTransitions } from '../services/read-model';
import type { StampBuffer } from '../services/stamp-buffer';
import { context, ROOT_CONTEXT, SpanKind, trace } from '@opentelemetry/api';
import { failSpan, traceparentContext, tracer } from '../telemetry';

export interface HttpDeps {
  readonly config: FleetConfig;
  readonly dataSource: DataSource;
  readonly producer: LifecycleProducer;
  /** a connection for /readyz */
  readonly redis: RedisConnection;
  /** queues shown in Bull Board */
  readonly queues: readonly Queue[];
  readonly metrics: FleetMetrics;
  readonly logger: Logger;
  /** the clock for dispatch (default `() => new Date()`) */
  readonly now?: () => Date;
  /** the API tokens (default: read from FLEET_API_TOKENS_FILE when it is set; null: the API is open) */
  readonly tokens?: TokenStore | null;
  /** a fail-fast connection that keeps the intake's rate-limit counters fleet-wide (default: in this process) */
  readonly rateLimitRedis?: RedisConnection;
  /** failed authentications per client address (default: 10 a minute, then 429 until the minute is over) */
  readonly authThrottle?: AuthThrottle;
  /** a whole request, body included, must arrive within this (default 30 s; then 408) */
  readonly requestTimeoutMs?: number;
  /** a request's headers must arrive within this (default 10 s; then 408) */
  readonly headersTimeoutMs?: number;
  /**
   * The process's stamp buffer (default none): reads and dispatch see stamps absorbed but not yet flushed (the
   * later of PostgreSQL's and the buffered one; PostgreSQL's alone while Redis does not answer)
   */
  readonly stampBuffer?: StampBuffer | null;
}

/** The reason phrase of a status, as an error code: 408 -> request_timeout. */
function codeOf(status: number): string {
  return (STATUS_CODES[status] ?? 'error').toLowerCase().replace(/[^a-z]+/g, '_').replace(/^_|_$/g, '');
}

/**
 * Answers a request Node's HTTP parser refused before Fastify saw it (a malformed request, headers too large, a body
 * shorter than its Content-Length that timed out) in the API's error shape, then closes the connection.
 */
function clientErrorResponse(err: NodeJS.ErrnoException & { code?: string }, socket: Duplex): void {
  if (!socket.writable) {
    socket.destroy();
    return;
  }
  const status =
    err.code === 'HPE_HEADER_OVERFLOW' ? 431 : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : err.code === 'HPE_URI_TOO_LONG' ? 414 : 400;
  const body = JSON.stringify({ error: { code: codeOf(status), message: `${STATUS_CODES[status] ?? 'Bad Request'}: the request could not be read` } });
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
  );
}

const UUID = UUID_PATTERN;
export { BOARD_PATH } from './board';

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

/** What each request was let in as; read by the handlers and the rate limiter. */
const accessOf = new WeakMap<FastifyRequest, Access>();

declare module 'fastify' {
  interface FastifyContextConfig {
    /** what a route needs: a scope, or null for an open route. Every route of ours says; see `scopeOf`. */
    scope?: Scope | null;
  }
}

const READ: { config: { scope: Scope | null } } = { config: { scope: 'read' } };
const OPEN: { config: { scope: Scope | null } } = { config: { scope: null } };

/**
 * The scope a request needs: its route's `config.scope`. A request that matched none of our routes (a 404) still
 * needs `read` when its path, decoded, is under /api/: routes cannot be probed without a token.
 */
function scopeOf(request: FastifyRequest): Scope | null {
  const configured = (request.routeOptions.config as { scope?: Scope | null } | undefined)?.scope;
  if (configured !== undefined) return configured;
  if (request.routeOptions.url !== undefined) return null; // a route of a plugin (Bull Board guards its own)
  let path: string;
  try {
    path = decodeURIComponent(new URL(request.url, 'http://localhost').pathname);
  } catch {
    path = request.url;
  }
  return /^\/*api(\/|$)/i.test(path) ? 'read' : null;
}

/** Builds the server (not listening). */
export async function buildHttpServer(deps: HttpDeps): Promise<FastifyInstance> {
  const { config, dataSource: ds, metrics } = deps;
  const db = new Database(ds);
  const now = deps.now ?? (() => new Date());
  const stamps = { stampBuffer: deps.stampBuffer ?? null, logger: deps.logger };
  const creds: Credentials = {
    tokens: deps.tokens !== undefined ? deps.tokens : config.apiTokensFile === null ? null : new TokenStore(config.apiTokensFile),
    boardUser: config.boardUser,
    boardPassword: config.boardPassword,
  };
  const throttle = deps.authThrottle ?? new AuthThrottle();
  const app = Fastify({
    logger: false,
    // the client address (failed-authentication throttle, rate limits while open) behind these proxies only
    trustProxy: config.httpTrustProxy.length > 0 ? [...config.httpTrustProxy] : false,
    bodyLimit: 64 * 1024,
    // reject `__proto__` and `constructor.prototype` keys in JSON bodies outright
    onProtoPoisoning: 'error',
    onConstructorPoisoning: 'error',
    // a client that sends slowly (or never finishes its body) cannot hold a connection for ever
    requestTimeout: deps.requestTimeoutMs ?? 30_000,
    // a URL Fastify cannot decode, in the API's error shape
    frameworkErrors: (err, _request, reply) => {
      void (reply as FastifyReply).code(400).send({ error: { code: 'bad_url', message: err.message } });
    },
    clientErrorHandler: clientErrorResponse,
    // Node checks those timeouts every `connectionsCheckingInterval` (30 s by default, which doubles a 30 s limit)
    serverFactory: (handler) =>
      createServer(
        {
          requestTimeout: deps.requestTimeoutMs ?? 30_000,
          headersTimeout: Math.min(deps.headersTimeoutMs ?? 10_000, deps.requestTimeoutMs ?? 30_000),
          connectionsCheckingInterval: Math.min(1000, deps.requestTimeoutMs ?? 30_000),
        },
        handler,
      ),
  });
  // Every error answer has one shape, `{error: {code, message}}`, whoever produced it (Fastify, a plugin, Bull Board).
  app.addHook('onSend', async (_request, reply, payload) => {
    if (reply.statusCode < 400 || typeof payload !== 'string') return payload;
    let body: unknown;
    try {
      body = JSON.parse(payload);
    } catch {
      body = undefined;
    }
    const b = (typeof body === 'object' && body !== null ? body : {}) as { error?: unknown; message?: unknown; statusCode?: unknown };
    // ours already, or a body of its own (/readyz's checks): left alone; a framework's or a plugin's error: reshaped
    const inner = typeof b.error === 'object' && b.error !== null ? (b.error as { code?: unknown; key?: unknown }) : null;
    if (inner !== null && typeof inner.code === 'string') return payload;
    const foreign = typeof b.error === 'string' || inner !== null || typeof b.message === 'string' || typeof b.statusCode === 'number' || body === undefined;
    if (!foreign) return payload;
    // Bull Board names its errors by a translation key (`ERRORS.JOB_NOT_FOUND` -> "job not found")
    const message = typeof inner?.key === 'string' ? inner.key.replace(/^ERRORS\./, '').replace(/_/g, ' ').toLowerCase() : b.message;
    void reply.header('content-type', 'application/json; charset=utf-8');
    return JSON.stringify({
      error: { code: codeOf(reply.statusCode), message: typeof message === 'string' ? message : (STATUS_CODES[reply.statusCode] ?? 'error') },
    });
  });

  app.setErrorHandler((err: unknown, request, reply) => {
    if (err instanceof HttpError) {
      return reply.status(err.status).send({ error: { code: err.code, message: err.message, ...(err.issues ? { issues: err.issues } : {}) } });
    }
    const e = err as { statusCode?: number; code?: string; message?: string };
    if (typeof e.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) {
      return reply.status(e.statusCode).send({ error: { code: e.code ?? 'bad_request', message: e.message ?? 'bad request' } });
    }
    if (isTransient(err)) {
      // a server (PostgreSQL, Redis) that is away is not the request's fault: the caller may try again
      deps.logger.warn({ url: request.url, code: (err as { code?: unknown }).code, reason: (err as Error).message }, 'http request: a server did not answer');
      return reply
        .status(503)
        .header('retry-after', '5')
        .send({ error: { code: 'unavailable', message: 'a server the fleet needs did not answer; try again shortly' } });
    }
    deps.logger.error({ err, url: request.url }, 'http request failed');
    return reply.status(500).send({ error: { code: 'internal', message: 'internal error' } });
  });
  app.setNotFoundHandler((request, reply) =>
    reply.status(404).send({ error: { code: 'not_found', message: `no route ${request.method} ${request.url.split('?')[0] ?? ''}` } }),
  );

  /**
   * Lets the request in with `scope`, or answers it: 429 while its address is throttled, 401 without or with
   * wrong credentials, 403 without the scope. Returns whether it may go on.
   */
  const admit = (request: FastifyRequest, reply: FastifyReply, scope: Scope, challenge: 'Bearer' | 'Basic'): boolean => {
    const header = request.headers.authorization;
    const access: Access =
      challenge === 'Bearer' && creds.tokens === null
        ? { kind: 'open' } // no tokens file: the API is open, whatever the request sends
        : challenge === 'Basic' && header === undefined
          ? { kind: 'anonymous' }
          : readAccess(header, creds);
    // An address past its failures is refused whatever it sends, so guessing the board password gets nowhere; but
    // a valid bearer token (256 random bits: not guessable) always gets through, so that callers sharing an address
    // (a proxy, a NAT) cannot be locked out by someone else's wrong guesses.
    const wait = access.kind === 'token' && challenge === 'Bearer' ? null : throttle.retryAfterS(request.ip);
    if (wait !== null) {
      void reply
        .status(429)
        .header('retry-after', String(wait))
        .send({ error: { code: 'too_many_failed_authentications', message: `too many failed authentications from this address; retry in ${wait} s` } });
      return false;
    }
    accessOf.set(request, access);
    if (access.kind === 'invalid' || access.kind === 'anonymous') {
      if (access.kind === 'invalid') throttle.fail(request.ip);
      void reply
        .status(401)
        .header('www-authenticate', challenge === 'Basic' ? 'Basic realm="lifecycle-fleet", charset="UTF-8"' : 'Bearer realm="lifecycle-fleet"')
        .send({
          error: {
            code: 'unauthorized',
            message: access.kind === 'invalid' ? 'the credentials are not valid' : 'send Authorization: Bearer <token> (see `fleet token create`)',
          },
        });
      return false;
    }
    // on the board, its basic-auth pair and the `board` scope may do everything, reading included
    const boardWide = challenge === 'Basic' && (access.kind === 'board_user' || (access.kind === 'token' && access.principal.scopes.has('board')));
    if (!hasScope(access, scope) && !boardWide) {
      void reply.status(403).send({ error: { code: 'forbidden', message: `this token lacks the "${scope}" scope` } });
      return false;
    }
    return true;
  };

  // The scope comes from the route that matched (its `config.scope`), never from the URL's text: the router decodes
  // and normalises paths (`/%61pi/events`, absolute-form targets) that a prefix test on `request.url` would miss.
  app.addHook('onRequest', async (request, reply) => {
    const scope = scopeOf(request);
    if (scope === null) return undefined;
    if (!admit(request, reply, scope, 'Bearer')) return reply;
    return undefined;
  });

  if (config.eventsRateLimit > 0) {
    await app.register(rateLimit, {
      global: false,
      // after authentication: the limit is per token (per client address while the API is open)
      hook: 'preHandler',
      keyGenerator: (request) => {
        const access = accessOf.get(request);
        return access?.kind === 'token' ? `token:${access.principal.name}` : `ip:${request.ip}`;
      },
      ...(deps.rateLimitRedis === undefined ? {} : { redis: deps.rateLimitRedis, nameSpace: `${config.prefix}:ratelimit:` }),
      // a Redis that does not answer must not turn every request into a 500; the enqueue answers 503 anyway
      skipOnError: true,
      errorResponseBuilder: (_request, context) => ({
        statusCode: 429,
        code: 'rate_limited',
        message: `more than ${context.max} events in ${context.after === '' ? 'a second' : 'the window'} for this token; retry in ${context.after}`,
      }),
    });
  }

  // --- read API ---
  app.get('/api/deployments/:id', READ, async (request) => {
    const id = deploymentId(request);
    const deployment = await getDeployment(ds, id, stamps);
    if (deployment === null) throw new HttpError(404, 'not_found', `deployment ${id} not found`);
    return deployment;
  });

  app.get('/api/deployments', READ, async (request) => {
    const query = request.query as Record<string, string | undefined>;
    const state = query.state;
    if (state !== undefined && state !== '' && !(DEPLOYMENT_STATES as readonly string[]).includes(state)) {
      throw new HttpError(400, 'invalid_query', `state: must be one of ${DEPLOYMENT_STATES.join(', ')}`);
    }
    const limit = intParam(query.limit, 'limit', 50, 1, 500);
    const cursor = query.cursor;
    if (cursor !== undefined && cursor !== '' && !UUID.test(cursor)) throw new HttpError(400, 'invalid_query', 'cursor: must be a cursor from a previous page');
    return listDeployments(ds, {
      state: state === '' ? undefined : (state as (typeof DEPLOYMENT_STATES)[number] | undefined),
      limit,
      after: cursor || undefined,
      ...stamps,
    });
  });

  async function requireDeployment(id: string): Promise<void> {
    const exists = await deploymentExists(db, id);
    if (!exists) throw new HttpError(404, 'not_found', `deployment ${id} not found`);
  }

  app.get('/api/deployments/:id/attempts', READ, async (request) => {
    const id = deploymentId(request);
    await requireDeployment(id);
    return { items: await listAttempts(ds, id) };
  });

  app.get('/api/deployments/:id/transitions', READ, async (request) => {
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
  app.get('/api/deployments/:id/endpoint', READ, async (request) => {
    const id = deploymentId(request);
    const deployment = await getDeployment(ds, id, stamps);
    if (deployment === null) throw new HttpError(404, 'not_found', `deployment ${id} not found`);
    const answer = resolveEndpoint(deployment, now(), {
      readyWindowS: config.readyWindowS,
      publicEndpointUrl: config.publicEndpointUrl,
      endpointAllow: config.endpointAllow,
    });
    metrics.dispatched(answer.source, answer.reason);
    return answer;
  });

  // --- intake ---
  const intake: { scope: Scope; rateLimit?: { max: number; timeWindow: number } } = {
    // the base scope; the handler asks for events:admin where the event needs it
    scope: 'events:write',
    ...(config.eventsRateLimit > 0 ? { rateLimit: { max: config.eventsRateLimit, timeWindow: 1000 } } : {}),
  };
  const acceptEvent = async (request: FastifyRequest, reply: FastifyReply) => {
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
    const access = accessOf.get(request);
    if (access === undefined) throw new HttpError(401, 'unauthorized', 'the request was not authenticated'); // never open by default
    const needs = scopeForEvent(name, data);
    if (!hasScope(access, needs)) {
      throw new HttpError(403, 'forbidden', `${String(name).slice(0, 60)}${needs === 'events:admin' && name === 'deployment.teardown' ? ' with force' : ''} needs the "${needs}" scope`);
    }
    // The actor is the caller: the token's name (anonymous while the API is open), never what the payload says.
    const actor = access.kind === 'token' ? access.principal.name : ANONYMOUS_ACTOR;
    if (typeof data === 'object' && data !== null && !Array.isArray(data)) {
      const given = (data as { actor?: unknown }).actor;
      if (given !== undefined && given !== actor) {
        const rule = `is set from the caller over HTTP ("${actor}"): leave it out`;
        throw new HttpError(400, 'invalid_payload', `data.actor: ${rule}`, [{ field: 'actor', rule }]);
      }
    }
    let eventId: string | undefined;
    try {
      const given = typeof data === 'object' && data !== null && !Array.isArray(data) ? { ...data, actor } : data;
      // the payload's shape first (so its errors come as they always have), then the allow-list
      const parsed = parsePayload(name as string, given);
      assertEndpointAllowed(parsed, config.endpointAllow);
      // The eventId is fixed before the enqueue, so that an answer that never comes (503) can name the id to retry with.
      eventId = parsed.eventId ?? deriveEventId(name as EventName, parsed);
      const result = await deps.producer.enqueue(name as string, { ...(given as object), eventId });
      return await reply.status(202).send(result);
    } catch (err) {
      if (err instanceof ValidationError) throw new HttpError(400, err.code, err.message, err.issues);
      if (err instanceof EventIdConflictError) {
        return reply.status(409).send({ error: { code: err.code, message: err.message, existing: err.existing } });
      }
      if (err instanceof DurabilityError) {
        deps.logger.warn({ eventName: name, eventId, replicas: err.replicas, acknowledged: err.acknowledged, timeoutMs: err.timeoutMs }, 'intake: the event did not reach its replicas in time; answered 503');
        return reply
          .status(503)
          .header('retry-after', '1')
          .send({ error: { code: err.code, message: err.message, eventId: err.eventId, replicas: err.replicas, acknowledged: err.acknowledged } });
      }
      if (isTransient(err)) {
        deps.logger.warn({ eventName: name, eventId, code: (err as { code?: unknown }).code, reason: (err as Error).message }, 'intake: Redis did not answer; answered 503');
        return reply
          .status(503)
          .header('retry-after', '5')
          .send({
            error: {
              code: 'unavailable',
              message: `the queue did not answer in time; the event may have been accepted: retry with the same eventId "${eventId ?? ''}" (it is applied at most once)`,
              ...(eventId !== undefined ? { eventId } : {}),
            },
          });
      }
      throw err;
    }
  };
  app.post('/api/events', { config: intake }, async (request, reply) => {
    // The request's span (docs/architecture.md, "Tracing"): under the caller's trace when it sends a W3C
    // `traceparent` header; the event's `enqueue` span goes under it. A no-op while tracing is off.
    const header = request.headers.traceparent;
    const parent = traceparentContext(typeof header === 'string' ? header : undefined) ?? ROOT_CONTEXT;
    const span = tracer().startSpan('POST /api/events', { kind: SpanKind.SERVER, attributes: { 'http.request.method': 'POST', 'http.route': '/api/events' } }, parent);
    try {
      const sent = await context.with(trace.setSpan(parent, span), () => acceptEvent(request, reply));
      span.setAttribute('http.response.status_code', reply.statusCode);
      return sent;
    } catch (err) {
      const status = err instanceof HttpError ? err.status : 500;
      span.setAttribute('http.response.status_code', status);
      if (status >= 500) failSpan(span, err);
      throw err;
    } finally {
      span.end();
    }
  });

  // --- health and metrics ---
  app.get('/healthz', OPEN, async () => ({ status: 'ok' }));
  app.get('/readyz', OPEN, async (request, reply) => {
    const checks: Record<string, string> = {};
    const check = async (name: string, fn: () => Promise<boolean>) => {
      try {
        checks[name] = (await rejectAfter(fn(), 2000, name)) ? 'ok' : 'failing';
      } catch (err) {
        // the details go to the log, not to an unauthenticated caller (they may name hosts or users)
        deps.logger.warn({ err, check: name }, 'readiness check failed');
        checks[name] = 'failing';
      }
    };
    await Promise.all([
      check('redis', async () => (await deps.redis.ping()) === 'PONG'),
      check('postgres', async () => (await db.run(ADMIN_SQL.ping)).rows.length === 1),
      check('migrations', () => migrationsApplied(ds)),
    ]);
    const ok = Object.values(checks).every((v) => v === 'ok');
    return reply.status(ok ? 200 : 503).send({ status: ok ? 'ok' : 'unavailable', checks });
  });
  app.get('/metrics', config.metricsAuth === 'read' ? READ : OPEN, async (request, reply) => reply.type(metrics.contentType).send(await metrics.text()));

  await registerBoard(app, { queues: deps.queues, creds, admit, accessOf });
  return app;
}
