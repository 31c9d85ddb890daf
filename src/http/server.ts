/**
 * The HTTP surface (docs/contract.md, "HTTP"): the read API, dispatch, event intake, health, metrics, the OpenAPI
 * document and Bull Board. This file builds the server and puts the parts together; each part is its own file:
 *
 * - the hardening of the server itself (body and header limits, timeouts, JSON without prototype keys): here;
 * - error answers, one shape `{error: {code, message}}` (intake errors also carry `issues: [{field, rule}]`):
 *   http-error.ts;
 * - access: with a tokens file, every `/api` route needs a bearer token with its scope (`read` for GETs,
 *   `events:write` or `events:admin` for POST /api/events, by event); 401 without or with a wrong token, 403 without
 *   the scope. Without one (loopback only: the config refuses it elsewhere) the API is open. `/healthz` and `/readyz`
 *   are always open; `/metrics` needs `read` when FLEET_METRICS_AUTH=read. Failed authentications are throttled per
 *   client address (access.ts, auth.ts); intake is rate-limited per token (routes/events.ts);
 * - the routes, as Fastify plugins by concern: routes/deployments.ts, dispatch.ts, events.ts, health.ts, docs.ts,
 *   watch.ts (transitions as server-sent events, from one reader of the stream per process);
 *   each declares its schemas (route-options.ts), which validate its parameters and queries and from which the
 *   OpenAPI document at /openapi.json (Swagger UI at /docs) is generated;
 * - Bull Board behind the same access: board.ts.
 */
import { createServer } from 'node:http';
import type { Queue } from 'bullmq';
import Fastify, { type FastifyInstance, type FastifyReply } from 'fastify';
import type { DataSource } from 'typeorm';
import type { FleetConfig } from '../config';
import type { Logger } from '../log';
import type { FleetMetrics } from '../metrics';
import type { LifecycleProducer } from '../queues/producer';
import { siblingOf, type RedisConnection } from '../redis/connection';
import type { StampBuffer } from '../services/stamps';
import { transitionStreamKey } from '../streams/outbox-relay';
import { WatchHub } from '../streams/watch-hub';
import { createGate, credentialsOf, guardRoutes } from './access';
import { AuthThrottle } from './auth';
import { registerBoard } from './board';
import { answerErrorsInOneShape, clientErrorResponse } from './http-error';
import { parseJsonBodies } from './json-body';
import { validatorCompiler } from './route-options';
import { deploymentRoutes } from './routes/deployments';
import { dispatchRoutes } from './routes/dispatch';
import { docsRoutes, gatherDocument } from './routes/docs';
import { eventIntake, eventRoutes } from './routes/events';
import { healthRoutes } from './routes/health';
import { watchRoutes, type WatchRouteOptions } from './routes/watch';
import type { TokenStore } from './tokens';

export { BOARD_PATH } from './board';
export { DOCS_PATH, OPENAPI_PATH } from './routes/docs';

export interface HttpDeps {
  readonly config: FleetConfig;
  readonly dataSource: DataSource;
  readonly producer: LifecycleProducer;
  /** a connection for /readyz; the watch's reader makes its own like it */
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
  /**
   * GET /api/watch: the process's one reader of the stream (default: made here, started with the first watcher, on
   * connections like `redis`; closed with the server), the keep-alive and the bound per watcher
   */
  readonly watch?: Partial<Omit<WatchRouteOptions, 'metrics'>>;
}

/**
 * The server, hardened: bodies up to 64 KiB of JSON without `__proto__` or `constructor.prototype` keys, a request
 * whole within `requestTimeoutMs` and its headers within `headersTimeoutMs` (then 408), and what Node's parser or
 * Fastify's router refuse answered in the API's error shape.
 */
function hardenedServer(deps: HttpDeps): FastifyInstance {
  const requestTimeout = deps.requestTimeoutMs ?? 30_000;
  return Fastify({
    logger: false,
    // the client address (failed-authentication throttle, rate limits while open) behind these proxies only
    trustProxy: deps.config.httpTrustProxy.length > 0 ? [...deps.config.httpTrustProxy] : false,
    bodyLimit: 64 * 1024,
    // reject `__proto__` and `constructor.prototype` keys in JSON bodies outright
    onProtoPoisoning: 'error',
    onConstructorPoisoning: 'error',
    // a client that sends slowly (or never finishes its body) cannot hold a connection for ever
    requestTimeout,
    // a URL Fastify cannot decode, in the API's error shape
    frameworkErrors: (err, _request, reply) => {
      void (reply as FastifyReply).code(400).send({ error: { code: 'bad_url', message: err.message } });
    },
    clientErrorHandler: clientErrorResponse,
    // Node checks those timeouts every `connectionsCheckingInterval` (30 s by default, which doubles a 30 s limit)
    serverFactory: (handler) =>
      createServer(
        {
          requestTimeout,
          headersTimeout: Math.min(deps.headersTimeoutMs ?? 10_000, requestTimeout),
          connectionsCheckingInterval: Math.min(1000, requestTimeout),
        },
        handler,
      ),
  });
}

/** Builds the server (not listening). */
export async function buildHttpServer(deps: HttpDeps): Promise<FastifyInstance> {
  const { config, dataSource, metrics, logger } = deps;
  const app = hardenedServer(deps);
  parseJsonBodies(app);
  answerErrorsInOneShape(app, logger);
  const gate = createGate(credentialsOf(config, deps.tokens, logger), deps.authThrottle ?? new AuthThrottle());
  guardRoutes(app, gate);
  // Params and query are validated by their zod schemas; answers are serialized as they always were (JSON.stringify),
  // their schemas serve the document only.
  app.setValidatorCompiler(validatorCompiler);
  app.setSerializerCompiler(() => (data) => JSON.stringify(data));
  await gatherDocument(app);
  const accept = await eventIntake(app, { config, gate, producer: deps.producer, logger, rateLimitRedis: deps.rateLimitRedis });

  const reads = { dataSource, stamps: { stampBuffer: deps.stampBuffer ?? null, logger } };
  await app.register(deploymentRoutes, reads);
  await app.register(dispatchRoutes, { ...reads, config, metrics, now: deps.now ?? (() => new Date()) });
  await app.register(eventRoutes, { accept });
  await app.register(healthRoutes, { config, dataSource, redis: deps.redis, metrics, logger });
  const hub =
    deps.watch?.hub ?? new WatchHub({ streamKey: transitionStreamKey(config.prefix), connect: (name) => siblingOf(deps.redis, name), logger });
  await app.register(watchRoutes, { ...deps.watch, hub, metrics });
  await app.register(docsRoutes);
  await registerBoard(app, { queues: deps.queues, gate, acceptEvent: accept });
  return app;
}
