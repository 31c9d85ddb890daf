/**
 * The lifecycle event contract (docs/contract.md, "Queues and jobs"): parsing an event by its catalog entry
 * (catalog.ts), its eventId's rules, and its digest. Used by the producer SDK, the worker, the transition service and
 * the HTTP intake; everything behind `parseEvent` and `validateEvent` receives typed, trusted values.
 */
import { createHash, randomUUID } from 'node:crypto';
import type { z } from 'zod';
import { ValidationError, type FieldIssue } from '../errors';
import {
  EVENT_NAMES,
  EVENT_SCHEMAS,
  isEventName,
  ONCE_PER_SUBJECT,
  subjectIdOf,
  type EventName,
  type EventPayloads,
  type TransitionName,
} from './catalog';
import { canonicalId, EVENT_ID_PATTERN, payloadSchema } from './fields';

// The catalog and the fields, for the modules that import the event contract from here.
export {
  EVENT_CATALOG,
  EVENT_NAMES,
  EVENT_SCHEMAS,
  ONCE_PER_SUBJECT,
  PRODUCER_METHODS,
  STAMP_EVENTS,
  eventScope,
  isEventName,
  toMachineEvent,
  type EventName,
  type EventPayloads,
  type EventScope,
  type StampName,
  type TransitionName,
} from './catalog';
export {
  ACTOR_PATTERN,
  ANONYMOUS_ACTOR,
  canonicalId,
  DEFAULT_ACTOR,
  DEPLOYMENT_NAME_PATTERN,
  EVENT_ID_PATTERN,
  RESERVED_ACTORS,
  STORABLE_TEXT_PATTERN,
  SWEEP_ACTOR,
  UUID_PATTERN,
} from './fields';

export const MAX_PAYLOAD_BYTES = 16 * 1024;

/** An event's payload schema without `actor`, which the HTTP intake sets from the caller (its OpenAPI body). */
export function payloadSchemaWithoutActor(name: EventName): z.ZodType {
  const { actor: _actor, ...shape } = EVENT_SCHEMAS[name].shape;
  return payloadSchema(shape);
}

/**
 * A validated event: its name, its payload, and the eventId it is deduplicated by. `digestAsSent`, when normalising
 * changed the payload's endpoint URL: `payloadDigest` of the payload with the URL as the job carried it, the digest a
 * worker from before issue 28 (which kept the URL as sent) recorded in `processed_events` for this event.
 */
export type LifecycleEvent = {
  [K in EventName]: { readonly name: K; readonly eventId: string; readonly data: EventPayloads[K]; readonly digestAsSent?: string };
}[EventName];

/** An event the machine decides on (everything but the stamps). */
export type StateEvent = Extract<LifecycleEvent, { name: TransitionName }>;

/**
 * Validates a payload for an event name. Throws `ValidationError` naming every offending field and rule:
 * `unknown_event` for a name not in the contract, `invalid_payload` otherwise. Never partially accepts.
 */
export function parsePayload<K extends EventName>(name: K, data: unknown): EventPayloads[K];
export function parsePayload(name: string, data: unknown): EventPayloads[EventName];
export function parsePayload(name: string, data: unknown): EventPayloads[EventName] {
  if (!isEventName(name)) {
    throw new ValidationError('unknown_event', [
      { field: 'name', rule: `"${truncate(String(name))}" is not a lifecycle event (${EVENT_NAMES.join(', ')})` },
    ]);
  }
  let size: number;
  try {
    size = Buffer.byteLength(JSON.stringify(data) ?? '', 'utf8');
  } catch {
    throw new ValidationError('invalid_payload', [{ field: '(root)', rule: 'must be JSON-serializable' }]);
  }
  if (size > MAX_PAYLOAD_BYTES) {
    throw new ValidationError('invalid_payload', [{ field: '(root)', rule: `must be at most ${MAX_PAYLOAD_BYTES} bytes as JSON, got ${size}` }]);
  }
  const result = EVENT_SCHEMAS[name].safeParse(data, { reportInput: true });
  if (!result.success) throw new ValidationError('invalid_payload', toIssues(result.error));
  const problem = eventIdProblem(name, result.data);
  if (problem !== null) throw new ValidationError('invalid_payload', [{ field: 'eventId', rule: problem }]);
  return result.data;
}

/**
 * The eventId for a payload without one: `<name>.<attemptId>` for attempt events (`<name>.<deploymentId>` for
 * deployment.create), so a retried producer call enqueues the same event. Heartbeats, readiness, teardowns and
 * resolves can happen many times: they get a random id. Ids are lower case (the schemas normalise them).
 */
export function deriveEventId(name: EventName, payload: { deploymentId: string; attemptId?: string }): string {
  if (!ONCE_PER_SUBJECT.has(name)) return `${name}.${randomUUID()}`;
  return `${name}.${canonicalId(subjectIdOf(name, payload).id)}`;
}

/**
 * An eventId claims only its own event kind, and a derived id only its own subject (docs/contract.md). Ids that
 * begin with an event name and a dot, in any case, are that event's: another event may not use them (a heartbeat
 * sent as `attempt.end.<A>` would otherwise take the real end's id, and the end would be refused as a conflict).
 * For an event that happens once per subject, such an id is its derived form and must go on with the event's own
 * subject, `<name>.<attemptId or deploymentId>` and optionally `.<anything>` (the sweep's orphan ids); otherwise a
 * `deployment.create.<N>` sent for another deployment would take N's create for good. Other ids are free-form; an
 * id already used by a different event (another name, another payload, another deployment) is refused where it
 * meets the earlier one, at the enqueue or at the worker (`event_id_conflict`), never dropped as a duplicate.
 */
export function eventIdProblem(name: EventName, payload: { eventId?: string | undefined; deploymentId: string; attemptId?: string }): string | null {
  const id = payload.eventId === undefined ? undefined : canonicalId(payload.eventId);
  if (id === undefined) return null;
  const kind = EVENT_NAMES.filter((n) => id.startsWith(`${n}.`)).sort((a, b) => b.length - a.length)[0];
  if (kind === undefined) return null;
  if (kind !== name) {
    return `must not begin with "${kind}." (in any case): ids with that prefix belong to ${kind} events (an eventId claims only its own event kind)`;
  }
  if (!ONCE_PER_SUBJECT.has(name)) return null; // their derived ids are random: they name no subject
  const { field, id: subject } = subjectIdOf(name, payload);
  const rest = id.slice(name.length + 1);
  if (rest === subject || rest.startsWith(`${subject}.`)) return null;
  return `an id that begins with "${name}." must name this event's ${field} next ("${name}.${subject}", optionally followed by "." and more): a derived id belongs to its own subject`;
}

declare const validated: unique symbol;

/**
 * An event validated for the queue (`validateEvent`): its payload parsed by its schema, its eventId settled. The
 * producer enqueues it as it is (`LifecycleProducer.enqueueValidated`), without parsing it again. Only
 * `validateEvent` makes one: its brand is a symbol no other module can name.
 */
export type ValidatedEvent = {
  [K in EventName]: { readonly name: K; readonly data: EventPayloads[K] & { readonly eventId: string }; readonly [validated]: true };
}[EventName];

/**
 * Validates an untrusted payload for the queue and settles its eventId: the payload's, else the derived one
 * (`deriveEventId`). Throws `ValidationError` as `parsePayload` does.
 */
export function validateEvent(name: string, data: unknown): ValidatedEvent {
  const payload = parsePayload(name, data);
  const eventId = payload.eventId ?? deriveEventId(name as EventName, payload); // parsePayload refused any other name
  return { name, data: { ...payload, eventId } } as ValidatedEvent;
}

/**
 * Validates an event and settles its eventId: the payload's `eventId`, else `fallbackEventId` (the BullMQ jobId),
 * which then answers to the same rules (`eventIdProblem`): a raw job may not take another kind's or subject's id.
 */
export function parseEvent(name: string, data: unknown, fallbackEventId?: string): LifecycleEvent {
  const payload = parsePayload(name, data);
  const id = payload.eventId ?? fallbackEventId;
  if (id === undefined || !EVENT_ID_PATTERN.test(id)) {
    throw new ValidationError('invalid_payload', [
      { field: 'eventId', rule: 'is required (in the payload or as the job id) and must be 1-200 characters of A-Za-z0-9._-' },
    ]);
  }
  // parsePayload checked the payload's own id; isEventName only narrows `name` (parsePayload refused any other)
  const problem = payload.eventId === undefined && isEventName(name) ? eventIdProblem(name, { ...payload, eventId: id }) : null;
  if (problem !== null)
    throw new ValidationError('invalid_payload', [{ field: 'eventId', rule: `${problem} (the job id, standing for the missing eventId)` }]);
  return { name, eventId: id, data: payload, ...digestAsSent(data, payload) } as LifecycleEvent;
}

/** The event's `digestAsSent` (LifecycleEvent): only where normalising changed its endpoint URL. */
function digestAsSent(data: unknown, payload: EventPayloads[EventName]): { digestAsSent?: string } {
  if (!('endpoint' in payload) || payload.endpoint === undefined) return {};
  const url = (data as { endpoint: { url: string } }).endpoint.url; // the schema took it as a string
  return url === payload.endpoint.url ? {} : { digestAsSent: payloadDigest({ ...payload, endpoint: { ...payload.endpoint, url } }) };
}

function toIssues(error: z.ZodError): FieldIssue[] {
  return error.issues.map((issue) => {
    const field = issue.path.length === 0 ? '(root)' : issue.path.map(String).join('.');
    if (issue.code === 'unrecognized_keys') {
      return { field: field, rule: `unknown field(s): ${issue.keys.map((k) => truncate(k)).join(', ')}` };
    }
    if (issue.input === undefined && issue.path.length > 0) return { field, rule: 'is required' };
    return { field, rule: issue.message };
  });
}

function truncate(value: string): string {
  return value.length > 60 ? `${value.slice(0, 60)}…` : value;
}

/**
 * The payload as one canonical string: keys sorted, `eventId` and `actor` left out (the same event sent again, by
 * another caller or under its derived id, is still the same event). Two deliveries of one eventId must agree on it.
 */
export function canonicalPayload(data: unknown): string {
  const canonical = (value: unknown, top: boolean): string => {
    if (typeof value !== 'object' || value === null) return JSON.stringify(value) ?? 'null';
    if (Array.isArray(value)) return `[${value.map((v) => canonical(v, false)).join(',')}]`;
    const entries = Object.entries(value as Record<string, unknown>)
      .filter(([k, v]) => v !== undefined && !(top && (k === 'eventId' || k === 'actor')))
      .sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonical(v, false)}`).join(',')}}`;
  };
  return canonical(data, true);
}

/** SHA-256 (hex) of `canonicalPayload`: what `processed_events` keeps to tell a redelivery from another event. */
export function payloadDigest(data: unknown): string {
  return createHash('sha256').update(canonicalPayload(data)).digest('hex');
}
