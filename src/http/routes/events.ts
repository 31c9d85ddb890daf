/**
 * The event intake over HTTP (docs/contract.md, "HTTP"): `POST /api/events`, and the token's event budget
 * (FLEET_EVENTS_RATE_LIMIT) that it shares with Bull Board's add. What the intake checks is in intake.ts.
 */
import rateLimit from '@fastify/rate-limit';
import { context, ROOT_CONTEXT, SpanKind, trace } from '@opentelemetry/api';
import type { FastifyInstance, FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import type { FleetConfig } from '../../config';
import { EVENT_CATALOG, EVENT_NAMES } from '../../events/catalog';
import type { Logger } from '../../log';
import { enqueueResultSchema, type LifecycleProducer } from '../../queues/producer';
import type { RedisConnection } from '../../redis/connection';
import { failSpan, traceparentContext, tracer } from '../../telemetry';
import type { Gate } from '../access';
import { eventBodySchema } from '../api-schemas';
import { HttpError } from '../http-error';
import { acceptEvent } from '../intake';
import { answer, failure, route } from '../route-options';

/** Takes the event `{name, data}` in `body` from the request's caller and answers (202, or the intake's refusal). */
export type AcceptEvent = (request: FastifyRequest, body: unknown, reply: FastifyReply) => Promise<FastifyReply>;

export interface EventIntakeOptions {
  readonly config: Pick<FleetConfig, 'eventsRateLimit' | 'prefix' | 'endpointAllow'>;
  readonly gate: Gate;
  readonly producer: LifecycleProducer;
  readonly logger: Logger;
  /** a fail-fast connection that keeps the budget's counters fleet-wide (default: in this process) */
  readonly rateLimitRedis?: RedisConnection | undefined;
}

/**
 * The intake as every way in of an event runs it (POST /api/events, Bull Board's add): the caller's event budget,
 * then `acceptEvent`. One budget per token for all of them: the rate-limit plugin's own limiter, registered here on
 * `app`, whose key is `token:<name>` in its namespace (a route's `config.rateLimit` would keep a count per route).
 */
export async function eventIntake(app: FastifyInstance, options: EventIntakeOptions): Promise<AcceptEvent> {
  const { config, gate } = options;
  if (config.eventsRateLimit > 0) {
    await app.register(rateLimit, {
      // used by the intake only (limitEvents below), with these as its limit
      global: false,
      max: config.eventsRateLimit,
      timeWindow: 1000,
      // after authentication: the limit is per token (per client address while the API is open)
      hook: 'preHandler',
      keyGenerator: (request) => {
        const access = gate.accessOf(request);
        return access?.kind === 'token' ? `token:${access.principal.name}` : `ip:${request.ip}`;
      },
      ...(options.rateLimitRedis === undefined ? {} : { redis: options.rateLimitRedis, nameSpace: `${config.prefix}:ratelimit:` }),
      // a Redis that does not answer must not turn every request into a 500; the enqueue answers 503 anyway
      skipOnError: true,
      // an Error, so that it reaches the server's error handler through the board's too (which passes on only Errors)
      errorResponseBuilder: (_request, context) =>
        new HttpError(
          429,
          'rate_limited',
          `more than ${context.max} events in ${context.after === '' ? 'a second' : 'the window'} for this token; retry in ${context.after}`,
        ),
    });
  }
  const limitEvents = config.eventsRateLimit > 0 ? app.rateLimit() : null;
  const intake = { producer: options.producer, endpointAllow: config.endpointAllow, logger: options.logger };
  // the body is not validated by the framework (route-options.ts's validatorCompiler): acceptEvent checks it
  return async (request, body, reply) => {
    await limitEvents?.call(app, request, reply);
    return acceptEvent(intake, gate.accessOf(request), body, reply);
  };
}

/** The events that need `events:admin`, as the catalog says: "`deployment.resolve`, ... and `x` with `force: true`". */
function adminEvents(): string {
  const names = EVENT_NAMES.flatMap((name) => {
    const { scope } = EVENT_CATALOG[name];
    if (scope === 'events:admin') return [`\`${name}\``];
    return typeof scope === 'object' ? [`\`${name}\` with \`${scope.adminWhen}: true\``] : [];
  });
  return names.length < 2 ? names.join('') : `${names.slice(0, -1).join(', ')} and ${names[names.length - 1] ?? ''}`;
}

const intakeRoute = route('events:write', {
  summary: 'Enqueue a lifecycle event',
  description:
    'Validated and enqueued; the job id is the eventId (derived when the payload has none). `events:admin` is needed ' +
    `for ${adminEvents()}. The actor is the token's name: leave \`actor\` out of \`data\`.`,
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

/** `POST /api/events`; the route's scope is the base one, the intake asks for `events:admin` where the event needs it. */
export const eventRoutes: FastifyPluginAsync<{ readonly accept: AcceptEvent }> = async (app, { accept }) => {
  app.withTypeProvider<ZodTypeProvider>().post('/api/events', intakeRoute, async (request, reply) => {
    // The request's span (docs/architecture.md, "Tracing"): under the caller's trace when it sends a W3C
    // `traceparent` header; the event's `enqueue` span goes under it. A no-op while tracing is off.
    const header = request.headers.traceparent;
    const parent = traceparentContext(typeof header === 'string' ? header : undefined) ?? ROOT_CONTEXT;
    const attributes = { 'http.request.method': 'POST', 'http.route': '/api/events' };
    const span = tracer().startSpan('POST /api/events', { kind: SpanKind.SERVER, attributes }, parent);
    try {
      const sent = await context.with(trace.setSpan(parent, span), () => accept(request, request.body, reply));
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
};
