/**
 * The HTTP surface (docs/contract.md, "HTTP"): the read API, dispatch, event intake, health, metrics and Bull Board.
 * Errors are JSON `{error: {code, message}}`; intake errors also carry `issues: [{field, rule}]`.
 *
 * Access: with a tokens file, every `/api` route needs a bearer token with its scope (`read` for GETs,
 * `events:write` or `events:admin` for POST /api/events, by event); 401 without or with a wrong token, 403 without
 * the scope. Without one (loopback only: the config refuses it elsewhere) the API is open. `/healthz` and `/readyz`
 * are always open; `/metrics` needs `read` when FLEET_METRICS_AUTH=read. Failed authentications are throttled per
 * client address; intake is rate-limited per token.
 *
 * Every route declares its schemas (zod: api-schemas.ts, and the views' own where they are built): parameters and
 * queries are validated with them, and the OpenAPI document at /openapi.json (Swagger UI at /docs, both needing
 * `read` like the API's GETs) is generated from them. Bull Board's routes stay out of it.
 */
import rateLimit from '@fastify/rate-limit';
import swagger, { type SwaggerTransformObject } from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { Queue } from 'bullmq';
import { createServer, STATUS_CODES } from 'node:http';
import type { Duplex } from 'node:stream';
import * as fs from 'node:fs';
import * as path from 'node:path';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifySchemaCompiler } from 'fastify';
import { jsonSchemaTransform, jsonSchemaTransformObject, type ZodTypeProvider } from 'fastify-type-provider-zod';
import type { z } from 'zod';
import type { RedisConnection } from '../queues/redis';
import type { DataSource } from 'typeorm';
import type { FleetConfig } from '../config';
import { migrationsApplied } from '../entities/migrate';
import { rejectAfter, repoRoot } from '../util';
import { registerBoard } from './board';
import { ADMIN_SQL, Database, deploymentExists } from '../entities/sql';
import { isTransient } from '../errors';
import { AuthThrottle, hasScope, readAccess, type Access, type Credentials } from './auth';
import { clientErrorOf, codeOf, HttpError } from './http-error';
import { acceptEvent, type Intake } from './intake';
import { parseJsonBodies } from './json-body';
import { TokenStore, type Scope } from './tokens';
import type { Logger } from '../log';
import type { FleetMetrics } from '../metrics';
import { enqueueResultSchema, type LifecycleProducer } from '../queues/producer';
import { resolveEndpoint, resolvedEndpointSchema } from '../services/dispatch';
import { deploymentPageSchema, deploymentViewSchema, getDeployment, listAttempts, listDeployments, listTransitions } from '../services/read-model';
import {
  apiErrorSchema,
  attemptListSchema,
  deploymentIdParamsSchema,
  deploymentListQuerySchema,
  eventBodySchema,
  healthSchema,
  metricsTextSchema,
  readinessSchema,
  transitionPageSchema,
  transitionQuerySchema,
} from './api-schemas';
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

export { BOARD_PATH } from './board';
/** The OpenAPI document of the API, generated from the routes' schemas. */
export const OPENAPI_PATH = '/openapi.json';
/** Swagger UI over that document. */
export const DOCS_PATH = '/docs';

/**
 * Validates a route's params and query with their zod schemas, after authentication (a request without the scope
 * learns nothing about the parameters): the first offending field, in the API's words, as `400 invalid_id` (the path's
 * `:id`) or `400 invalid_query`. Bodies are left to their route: the intake checks its own after the rate limit.
 */
const validatorCompiler: FastifySchemaCompiler<z.ZodType> = ({ schema, httpPart }) => {
  if (httpPart !== 'params' && httpPart !== 'querystring') return () => true;
  return (data) => {
    const result = schema.safeParse(data);
    if (result.success) return { value: result.data };
    const issue = result.error.issues[0];
    const message = issue === undefined ? 'is not valid' : `${issue.path.map(String).join('.') || '(root)'}: ${issue.message}`;
    return { error: new HttpError(400, httpPart === 'params' ? 'invalid_id' : 'invalid_query', message) };
  };
};

/** What each request was let in as; read by the handlers and the rate limiter. */
const accessOf = new WeakMap<FastifyRequest, Access>();

declare module 'fastify' {
  interface FastifyContextConfig {
    /** what a route needs: a scope, or null for an open route. Every route of ours says; see `scopeOf`. */
    scope?: Scope | null;
  }
}

/** An answer of the document: a JSON body and what it means on this route. */
function answer<S extends z.ZodType>(description: string, schema: S) {
  return { description, content: { 'application/json': { schema } } };
}

/** An error answer of the document: the one error body (`ApiError`), with what the status means on this route. */
const failure = (description: string) => answer(description, apiErrorSchema);

const UNAVAILABLE = failure('unavailable: PostgreSQL or Redis did not answer; try again (see Retry-After)');

/** What every guarded route may answer besides its own: its scope's refusals. */
const refusals = (scope: Scope) => ({
  401: failure('unauthorized: no token, or a wrong one (with a tokens file; on loopback without one the API is open)'),
  403: failure(`forbidden: the token lacks the "${scope}" scope`),
  429: failure('too_many_failed_authentications: this address failed to authenticate too often; see Retry-After'),
});

/**
 * A route's options: who may call it (`config.scope`, which the onRequest hook enforces) and its schema, which the
 * route validates with and /openapi.json is generated from. The document gets the scope as `x-scope` and in the
 * description, no security for an open route, and the refusals and the 500 that every route may answer.
 */
function route<S extends { description: string; response: object }>(scope: Scope | null, schema: S) {
  return {
    config: { scope },
    schema: {
      ...schema,
      description: `${schema.description}\n\n${scope === null ? 'Open: no token needed.' : `Scope: \`${scope}\`.`}`,
      ...(scope === null ? { security: [] } : { 'x-scope': scope }),
      response: {
        ...(scope === null ? {} : refusals(scope)),
        500: failure('internal: a fault of the server (logged)'),
        ...schema.response,
      },
    },
  };
}

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

type OpenApiDocument = ReturnType<SwaggerTransformObject>;

/**
 * The document without the named schemas nothing refers to: the type provider names every schema with an `id` twice,
 * as the input and as the output twin, and each is used one way only.
 */
function withoutUnusedSchemas(document: OpenApiDocument): OpenApiDocument {
  // an OpenAPI 3 document (the only kind this server asks for): its named schemas are under components
  const components = (document as { components?: { schemas?: Record<string, unknown> } }).components;
  const schemas = components?.schemas ?? {};
  const used = new Set<string>();
  const visit = (value: unknown): void => {
    for (const [, id] of JSON.stringify(value).matchAll(/"#\/components\/schemas\/([^"]+)"/g)) {
      if (id === undefined || used.has(id)) continue;
      used.add(id);
      visit(schemas[id]);
    }
  };
  visit({ ...document, components: { ...components, schemas: {} } });
  const kept = Object.fromEntries(Object.entries(schemas).filter(([id]) => used.has(id)));
  return { ...document, components: { ...components, schemas: kept } } as OpenApiDocument;
}

function packageVersion(): string {
  const { version } = JSON.parse(fs.readFileSync(path.join(repoRoot(), 'package.json'), 'utf8')) as { version?: unknown };
  return typeof version === 'string' ? version : '0.0.0';
}

/** Builds the server (not listening). */
export async function buildHttpServer(deps: HttpDeps): Promise<FastifyInstance> {
  const { config, dataSource: ds, metrics } = deps;
  const db = new Database(ds);
  const now = deps.now ?? (() => new Date());
  const stamps = { stampBuffer: deps.stampBuffer ?? null, logger: deps.logger };
  const creds: Credentials = {
    tokens:
      deps.tokens !== undefined
        ? deps.tokens
        : config.apiTokensFile === null
          ? null
          : new TokenStore(config.apiTokensFile, { warn: (message, fields) => deps.logger.warn(fields, message) }),
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
  parseJsonBodies(app);
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
      const contentType = request.headers['content-type'];
      const refused = clientErrorOf({ code: e.code, message: e.message, statusCode: e.statusCode }, { contentType, bodyLimit: request.routeOptions.bodyLimit });
      return reply.status(e.statusCode).send({ error: refused });
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
    // a valid token (256 random bits: not guessable), as a bearer token or as the board's basic-auth password, on the
    // API and on the board, always gets through, so that callers sharing an address (a proxy, a NAT) cannot be
    // locked out by someone else's wrong guesses.
    const wait = access.kind === 'token' ? null : throttle.retryAfterS(request.ip);
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

  // Params and query are validated by their zod schemas; answers are serialized as they always were (JSON.stringify),
  // their schemas serve the document only.
  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(() => (data) => JSON.stringify(data));
  // The document is gathered from the routes as they are added: registered before any of them.
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'lifecycle-fleet',
        version: packageVersion(),
        description: 'The HTTP API of the deployment lifecycle fleet (docs/contract.md, "HTTP"). Errors are `{error: {code, message}}`.',
      },
      components: {
        securitySchemes: {
          bearer: {
            type: 'http',
            scheme: 'bearer',
            description: 'An API token (`fleet token create`); each operation names the scope it needs (`x-scope`). Without a tokens file (loopback only) the API is open.',
          },
        },
      },
      security: [{ bearer: [] }],
    },
    transform: jsonSchemaTransform,
    transformObject: (document) => withoutUnusedSchemas(jsonSchemaTransformObject(document)),
  });

  if (config.eventsRateLimit > 0) {
    await app.register(rateLimit, {
      // used by the intake only (limitEvents below), with these as its limit
      global: false,
      max: config.eventsRateLimit,
      timeWindow: 1000,
      // after authentication: the limit is per token (per client address while the API is open)
      hook: 'preHandler',
      keyGenerator: (request) => {
        const access = accessOf.get(request);
        return access?.kind === 'token' ? `token:${access.principal.name}` : `ip:${request.ip}`;
      },
      ...(deps.rateLimitRedis === undefined ? {} : { redis: deps.rateLimitRedis, nameSpace: `${config.prefix}:ratelimit:` }),
      // a Redis that does not answer must not turn every request into a 500; the enqueue answers 503 anyway
      skipOnError: true,
      // an Error, so that it reaches the server's error handler through the board's too (which passes on only Errors)
      errorResponseBuilder: (_request, context) =>
        new HttpError(429, 'rate_limited', `more than ${context.max} events in ${context.after === '' ? 'a second' : 'the window'} for this token; retry in ${context.after}`),
    });
  }

  // --- read API ---
  const api = app.withTypeProvider<ZodTypeProvider>();
  const notFound = failure('not_found: no such deployment');
  const deploymentOr404 = async (id: string) => {
    const deployment = await getDeployment(ds, id, stamps);
    if (deployment === null) throw new HttpError(404, 'not_found', `deployment ${id} not found`);
    return deployment;
  };
  const badId = failure('invalid_id: `id` is not a UUID');
  api.get(
    '/api/deployments/:id',
    route('read', {
      summary: 'A deployment with its current attempt',
      description: 'Timestamps the stamp buffer holds and PostgreSQL does not yet are included.',
      params: deploymentIdParamsSchema,
      response: { 200: answer('the deployment', deploymentViewSchema), 400: badId, 404: notFound, 503: UNAVAILABLE },
    }),
    async (request) => {
      return deploymentOr404(request.params.id);
    },
  );

  api.get(
    '/api/deployments',
    route('read', {
      summary: 'A page of deployments',
      description: 'In id order (stable while deployments are created); follow `nextCursor` for the next page.',
      querystring: deploymentListQuerySchema,
      response: {
        200: answer('a page', deploymentPageSchema),
        400: failure('invalid_query: names the first offending parameter and its rule'),
        503: UNAVAILABLE,
      },
    }),
    async (request) => {
      const { state, limit, cursor } = request.query;
      return listDeployments(ds, { state, limit, after: cursor, ...stamps });
    },
  );

  async function requireDeployment(id: string): Promise<void> {
    const exists = await deploymentExists(db, id);
    if (!exists) throw new HttpError(404, 'not_found', `deployment ${id} not found`);
  }

  api.get(
    '/api/deployments/:id/attempts',
    route('read', {
      summary: "A deployment's attempts",
      description: 'Every attempt of the deployment, newest first.',
      params: deploymentIdParamsSchema,
      response: { 200: answer('the attempts', attemptListSchema), 400: badId, 404: notFound, 503: UNAVAILABLE },
    }),
    async (request) => {
      const { id } = request.params;
      await requireDeployment(id);
      return { items: await listAttempts(ds, id) };
    },
  );

  api.get(
    '/api/deployments/:id/transitions',
    route('read', {
      summary: "A deployment's transitions",
      description: "History after `afterVersion`, in version order: for consumers that fell behind the stream's retention.",
      params: deploymentIdParamsSchema,
      querystring: transitionQuerySchema,
      response: {
        200: answer('a page of history', transitionPageSchema),
        400: failure('invalid_id or invalid_query: names the offending parameter and its rule'),
        404: notFound,
        503: UNAVAILABLE,
      },
    }),
    async (request) => {
      const { id } = request.params;
      const { afterVersion, limit } = request.query;
      await requireDeployment(id);
      const items = await listTransitions(ds, id, afterVersion, limit);
      const last = items[items.length - 1];
      return { items, nextAfterVersion: items.length === limit && last !== undefined ? last.version : null };
    },
  );

  // --- dispatch ---
  api.get(
    '/api/deployments/:id/endpoint',
    route('read', {
      summary: 'Dispatch: the endpoint to hand out now',
      description: 'The private endpoint while it may be served, else the public fallback (`none` when unset), and why.',
      params: deploymentIdParamsSchema,
      response: { 200: answer('the endpoint', resolvedEndpointSchema), 400: badId, 404: notFound, 503: UNAVAILABLE },
    }),
    async (request) => {
      const { id } = request.params;
      const deployment = await deploymentOr404(id);
      const answer = resolveEndpoint(deployment, now(), {
        readyWindowS: config.readyWindowS,
        publicEndpointUrl: config.publicEndpointUrl,
        endpointAllow: config.endpointAllow,
      });
      metrics.dispatched(answer.source, answer.reason);
      return answer;
    },
  );

  // --- intake ---
  // the base scope; the handler asks for events:admin where the event needs it
  const intake: { scope: Scope } = { scope: 'events:write' };
  const intakeRoute = route('events:write', {
    summary: 'Enqueue a lifecycle event',
    description:
      'Validated and enqueued; the job id is the eventId (derived when the payload has none). `events:admin` is needed ' +
      'for a forced teardown, `deployment.resolve`, `attempt.orphaned` and `attempt.expired`. The actor is the token\'s ' +
      'name: leave `actor` out of `data`.',
    body: eventBodySchema,
    response: {
      202: answer('enqueued (or already enqueued: `duplicate`)', enqueueResultSchema),
      400: failure('invalid_body, invalid_payload or unknown_event: `issues` names every offending field and its rule'),
      403: failure('forbidden: the token lacks `events:write`, or `events:admin` for this event'),
      409: failure('event_id_conflict: the eventId belongs to another event (`existing` says which); nothing was enqueued'),
      413: failure('payload_too_large: the body is over 64 KiB'),
      415: failure('unsupported_media_type: the body is not JSON'),
      429: failure('rate_limited (this token sent too many events; see Retry-After) or too_many_failed_authentications'),
      503: failure('unavailable or not_durable: the event may have been accepted; retry with the same `eventId` (see Retry-After)'),
    },
  });
  const events: Intake = { producer: deps.producer, endpointAllow: config.endpointAllow, logger: deps.logger };
  // One budget per token for every way in of an event (here and the board's add): the plugin's own limiter, whose key
  // is `token:<name>` in its namespace. A route's `config.rateLimit` would keep a count of its own for each route.
  const limitEvents = config.eventsRateLimit > 0 ? app.rateLimit() : null;
  // the body is not validated by the framework (see validatorCompiler): acceptEvent checks it
  const acceptRequest = async (request: FastifyRequest, body: unknown, reply: FastifyReply) => {
    await limitEvents?.call(app, request, reply);
    return acceptEvent(events, accessOf.get(request), body, reply);
  };
  api.post('/api/events', { ...intakeRoute, config: intake }, async (request, reply) => {
    // The request's span (docs/architecture.md, "Tracing"): under the caller's trace when it sends a W3C
    // `traceparent` header; the event's `enqueue` span goes under it. A no-op while tracing is off.
    const header = request.headers.traceparent;
    const parent = traceparentContext(typeof header === 'string' ? header : undefined) ?? ROOT_CONTEXT;
    const span = tracer().startSpan('POST /api/events', { kind: SpanKind.SERVER, attributes: { 'http.request.method': 'POST', 'http.route': '/api/events' } }, parent);
    try {
      const sent = await context.with(trace.setSpan(parent, span), () => acceptRequest(request, request.body, reply));
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
  api.get(
    '/healthz',
    route(null, { summary: 'Liveness', description: 'The process answers.', response: { 200: answer('alive', healthSchema) } }),
    async () => ({ status: 'ok' as const }),
  );
  api.get(
    '/readyz',
    route(null, {
      summary: 'Readiness',
      description: 'Redis and PostgreSQL answer within 2 s and the migrations are applied.',
      response: { 200: answer('ready', readinessSchema), 503: answer('not ready: `checks` says which failed', readinessSchema) },
    }),
    async (request, reply) => {
      const check = async (name: string, fn: () => Promise<boolean>): Promise<'ok' | 'failing'> => {
        try {
          return (await rejectAfter(fn(), 2000, name)) ? 'ok' : 'failing';
        } catch (err) {
          // the details go to the log, not to an unauthenticated caller (they may name hosts or users)
          deps.logger.warn({ err, check: name }, 'readiness check failed');
          return 'failing';
        }
      };
      const [redis, postgres, migrations] = await Promise.all([
        check('redis', async () => (await deps.redis.ping()) === 'PONG'),
        check('postgres', async () => (await db.run(ADMIN_SQL.ping)).rows.length === 1),
        check('migrations', () => migrationsApplied(ds)),
      ]);
      const checks = { redis, postgres, migrations };
      const ok = Object.values(checks).every((v) => v === 'ok');
      return reply.status(ok ? 200 : 503).send({ status: ok ? 'ok' : 'unavailable', checks });
    },
  );
  api.get(
    '/metrics',
    route(config.metricsAuth === 'read' ? 'read' : null, {
      summary: 'Prometheus metrics',
      description: 'The text exposition format. Needs `read` when FLEET_METRICS_AUTH=read.',
      response: { 200: { description: 'the metrics', content: { 'text/plain': { schema: metricsTextSchema } } } },
    }),
    async (request, reply) => reply.type(metrics.contentType).send(await metrics.text()),
  );

  // --- the document and its UI ---
  app.get(OPENAPI_PATH, { config: { scope: 'read' }, schema: { hide: true } }, async () => app.swagger());
  await app.register(async (docs) => {
    // every route of the UI, its assets included, needs what the document needs
    docs.addHook('onRoute', (options) => {
      options.config = { ...options.config, scope: 'read' };
    });
    await docs.register(swaggerUi, {
      routePrefix: DOCS_PATH,
      // nothing from elsewhere: the assets come from the package, and no online validator is asked
      validatorUrl: false,
      staticCSP: "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; object-src 'none'; frame-ancestors 'none'",
      uiConfig: { showExtensions: true, displayRequestDuration: true },
    });
  });

  await registerBoard(app, { queues: deps.queues, creds, admit, accessOf, acceptEvent: acceptRequest });
  return app;
}
