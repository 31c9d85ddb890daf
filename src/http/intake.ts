/**
 * The intake of lifecycle events over HTTP: one path for `POST /api/events` and Bull Board's add on the lifecycle
 * queue (docs/contract.md, "HTTP"), so that the board can enqueue nothing the API would refuse.
 */
import type { FastifyReply } from 'fastify';
import { DurabilityError, EventIdConflictError, isTransient, ValidationError } from '../errors';
import { assertEndpointAllowed, type EndpointAllowList } from '../events/endpoint-allow';
import { ANONYMOUS_ACTOR, EVENT_CATALOG, isEventName, validateEvent } from '../events/schemas';
import type { Logger } from '../log';
import type { LifecycleProducer } from '../queues/producer';
import { hasScope, scopeForEvent, type Access } from './auth';
import { HttpError } from './http-error';

export interface Intake {
  readonly producer: LifecycleProducer;
  /** FLEET_ENDPOINT_ALLOW (null: every endpoint) */
  readonly endpointAllow: EndpointAllowList | null;
  readonly logger: Logger;
}

/**
 * Takes one event, `body` `{name, data}`, from a caller let in as `access`: the caller needs the event's scope
 * (`scopeForEvent`), the actor is the caller (a payload `actor` that differs is refused), the payload is validated
 * and its endpoint checked against the allow-list, and the eventId is fixed before the enqueue. Answers 202 with the
 * enqueue's result, or 409 / 503 itself; throws HttpError for what the caller got wrong.
 */
export async function acceptEvent(intake: Intake, access: Access | undefined, body: unknown, reply: FastifyReply): Promise<FastifyReply> {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new HttpError(400, 'invalid_body', 'body: must be a JSON object {name, data}', [
      { field: '(root)', rule: 'must be a JSON object {name, data}' },
    ]);
  }
  const extra = Object.keys(body).filter((k) => k !== 'name' && k !== 'data');
  const { name, data } = body as { name?: unknown; data?: unknown };
  const issues = [
    ...(typeof name === 'string' ? [] : [{ field: 'name', rule: 'is required: the event name' }]),
    ...(data === undefined ? [{ field: 'data', rule: 'is required: the event payload' }] : []),
    ...(extra.length > 0 ? [{ field: '(root)', rule: `unknown field(s): ${extra.map((k) => k.slice(0, 40)).join(', ')}` }] : []),
  ];
  if (issues.length > 0) throw new HttpError(400, 'invalid_body', issues.map((i) => `${i.field}: ${i.rule}`).join('; '), issues);
  if (access === undefined) throw new HttpError(401, 'unauthorized', 'the request was not authenticated'); // never open by default
  const needs = scopeForEvent(name, data);
  if (!hasScope(access, needs)) {
    // an event that needs events:admin only with a flag set (a forced teardown) says so: "deployment.teardown with force"
    const scope = isEventName(name) ? EVENT_CATALOG[name].scope : null;
    const condition = needs === 'events:admin' && typeof scope === 'object' && scope !== null ? ` with ${scope.adminWhen}` : '';
    throw new HttpError(403, 'forbidden', `${String(name).slice(0, 60)}${condition} needs the "${needs}" scope`);
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
    // the payload's shape first (so its errors come as they always have), then the allow-list. The eventId is fixed
    // before the enqueue, so that an answer that never comes (503) can name the id to retry with.
    const event = validateEvent(name as string, given);
    assertEndpointAllowed(event.data, intake.endpointAllow);
    eventId = event.data.eventId;
    const result = await intake.producer.enqueueValidated(event);
    return await reply.status(202).send(result);
  } catch (err) {
    if (err instanceof ValidationError) throw new HttpError(400, err.code, err.message, err.issues);
    if (err instanceof EventIdConflictError) {
      return reply.status(409).send({ error: { code: err.code, message: err.message, existing: err.existing } });
    }
    if (err instanceof DurabilityError) {
      intake.logger.warn(
        { eventName: name, eventId, replicas: err.replicas, acknowledged: err.acknowledged, timeoutMs: err.timeoutMs },
        'intake: the event did not reach its replicas in time; answered 503',
      );
      return reply
        .status(503)
        .header('retry-after', '1')
        .send({ error: { code: err.code, message: err.message, eventId: err.eventId, replicas: err.replicas, acknowledged: err.acknowledged } });
    }
    if (isTransient(err)) {
      intake.logger.warn(
        { eventName: name, eventId, code: (err as { code?: unknown }).code, reason: (err as Error).message },
        'intake: Redis did not answer; answered 503',
      );
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
}
