/**
 * The lifecycle event contract (docs/contract.md, "Queues and jobs"): one strict schema per event, defined once and used
 * by the producer SDK, the worker, the transition service and the HTTP intake. Everything behind `parseEvent`
 * receives typed, trusted values.
 */
import { createHash, randomUUID } from 'node:crypto';
import { z } from 'zod';
import { ValidationError, type FieldIssue } from '../errors';
import { ENDPOINT_URL_MAX_LENGTH, ENDPOINT_URL_PATTERN, endpointUrlProblem, normalizeEndpointUrl } from './endpoint-url';

export const MAX_PAYLOAD_BYTES = 16 * 1024;
export const EVENT_ID_PATTERN = /^[A-Za-z0-9._-]{1,200}$/;
export const DEPLOYMENT_NAME_PATTERN = /^[a-z0-9-]{1,63}$/;
/** Who caused a transition: a token name, `sweep`, or a producer's own `actor` (docs/contract.md). */
export const ACTOR_PATTERN = /^[A-Za-z0-9._:@-]{1,100}$/;
/** The actor recorded when a producer gives none. */
export const DEFAULT_ACTOR = 'producer';
/** The sweep's actor (orphans, deadlines). */
export const SWEEP_ACTOR = 'sweep';
/** The actor of HTTP intake while the API is open (loopback, no tokens file). */
export const ANONYMOUS_ACTOR = 'anonymous';
/** Actors the fleet records itself: no API token may be named after one. */
export const RESERVED_ACTORS: readonly string[] = [DEFAULT_ACTOR, SWEEP_ACTOR, ANONYMOUS_ACTOR];
export { UUID_PATTERN } from '../util/ids';

// `.meta()` carries what the JSON Schemas in docs/schemas/ say beyond the checks (`npm run schemas` writes them).
const eventId = z
  .string()
  .regex(EVENT_ID_PATTERN, { error: 'must be 1-200 characters of A-Za-z0-9._-' })
  .meta({ description: 'the BullMQ jobId and the deduplication key; default: derived (attempt events) or random' });
/**
 * An id's one spelling: ids are normalised to lower case, so that a derived eventId, the database and whatever keys
 * on an id before the schemas run (the coalescer) never see two spellings of one id.
 */
export function canonicalId(id: string): string {
  return id.toLowerCase();
}
const uuid = z.uuid({ error: 'must be a UUID' }).transform(canonicalId);
const reason = z.string().max(500, { error: 'must be at most 500 characters' });
const actor = z
  .string()
  .regex(ACTOR_PATTERN, { error: 'must be 1-100 characters of A-Za-z0-9._:@-' })
  .meta({ description: `recorded on the transition (default "${DEFAULT_ACTOR}")` });
const endpoint = z.strictObject({
  url: z
    .string({ error: 'must be an http or https URL' })
    .check((ctx) => {
      const problem = endpointUrlProblem(ctx.value);
      if (problem !== null) ctx.issues.push({ code: 'custom', message: problem, input: ctx.value });
    })
    .meta({
      // the checks' own grammar (endpoint-url.ts); the JSON Schema of a check is empty otherwise
      pattern: ENDPOINT_URL_PATTERN,
      maxLength: ENDPOINT_URL_MAX_LENGTH,
      description:
        'http or https, a host (a name, an IPv4 address or a bracketed IPv6 address), an optional port and path; no credentials, query or fragment; ' +
        'printable ASCII without a backslash. Stored as WHATWG URL normalises it. Its host must be one FLEET_ENDPOINT_ALLOW allows',
    })
    .transform(normalizeEndpointUrl),
  kind: z.enum(['node_port', 'cluster_dns'], { error: 'must be "node_port" or "cluster_dns"' }),
});

/**
 * Text PostgreSQL can store, as a JSON Schema pattern: no NUL (PostgreSQL refuses it in text and in jsonb:
 * `invalid byte sequence for encoding "UTF8": 0x00`) and no lone UTF-16 surrogate (not UTF-8 at all: the driver
 * would store U+FFFD instead, and jsonb refuses it). A pair of surrogates, one character outside the Basic
 * Multilingual Plane, is one code point to this pattern (JSON Schema's `u`-mode regular expressions, Python's `re`).
 */
export const STORABLE_TEXT_PATTERN = '^[^\\u0000\\uD800-\\uDFFF]*$';
const STORABLE_TEXT = new RegExp(STORABLE_TEXT_PATTERN, 'u');
const UNSTORABLE_TEXT = 'must not contain NUL (\\u0000) or an unpaired UTF-16 surrogate: PostgreSQL cannot store them';

/**
 * The text rule, once for every string of a payload, nested ones included (so a field added later has it too).
 * It runs even when other fields failed (`when`), so that every offending field is named at once, and leaves out
 * what already failed its own checks (a hostile value may nest thousands deep: it is never walked).
 */
function storableText(value: unknown, ctx: z.RefinementCtx): void {
  // a payload that is no object at all failed already; an issue of the whole payload (unknown fields) prunes nothing
  if (typeof value !== 'object' || value === null) return;
  const failed = ctx.issues.map((issue) => issue.path ?? []).filter((path) => path.length > 0);
  const alreadyFailed = (path: ReadonlyArray<PropertyKey>) => failed.some((f) => f.length <= path.length && f.every((key, i) => key === path[i]));
  const pending: Array<{ readonly v: unknown; readonly path: ReadonlyArray<string | number> }> = Object.entries(value as Record<string, unknown>).map(([key, v]) => ({ v, path: [key] }));
  // breadth first, in the payload's order (so the issues come in it); the list grows as objects are opened
  for (let i = 0; i < pending.length; i++) {
    const { v, path } = pending[i] ?? { v: undefined, path: [] };
    if (alreadyFailed(path)) continue;
    if (typeof v === 'string') {
      if (!STORABLE_TEXT.test(v)) ctx.addIssue({ code: 'custom', message: UNSTORABLE_TEXT, path: [...path], input: v });
    } else if (Array.isArray(v)) {
      v.forEach((item: unknown, i) => pending.push({ v: item, path: [...path, i] }));
    } else if (typeof v === 'object' && v !== null) {
      for (const [key, item] of Object.entries(v as Record<string, unknown>)) pending.push({ v: item, path: [...path, key] });
    }
  }
}

/** One event's payload schema: its fields, nothing else, and text PostgreSQL can store. */
function payloadSchema<Shape extends z.core.$ZodLooseShape>(shape: Shape) {
  return z.strictObject(shape).superRefine(storableText, { when: () => true });
}

const base = { eventId: eventId.optional(), actor: actor.optional(), deploymentId: uuid };
const attemptBase = { ...base, attemptId: uuid };

export const EVENT_SCHEMAS = {
  'deployment.create': payloadSchema({
    ...base,
    name: z.string().regex(DEPLOYMENT_NAME_PATTERN, { error: 'must be 1-63 characters of a-z0-9-' }),
    endpoint: endpoint.optional(),
  }),
  'attempt.create': payloadSchema(attemptBase),
  'attempt.start': payloadSchema(attemptBase),
  'attempt.heartbeat': payloadSchema(attemptBase),
  'attempt.end': payloadSchema({
    ...attemptBase,
    outcome: z.enum(['succeeded', 'failed'], { error: 'must be "succeeded" or "failed"' }),
    reason: reason.optional(),
    endpoint: endpoint.optional(),
  }),
  'attempt.cancel': payloadSchema({ ...attemptBase, reason: reason.optional() }),
  'attempt.orphaned': payloadSchema(attemptBase),
  'attempt.expired': payloadSchema(attemptBase),
  'deployment.teardown': payloadSchema({ ...base, force: z.boolean({ error: 'must be a boolean' }).optional() }),
  'deployment.resolve': payloadSchema({
    ...base,
    outcome: z.enum(['ready', 'failed'], { error: 'must be "ready" or "failed"' }),
    reason: reason.optional(),
  }),
  'deployment.readiness': payloadSchema({
    ...base,
    observedAt: z.iso.datetime({ offset: true, error: 'must be an ISO 8601 date-time' }).optional(),
  }),
} as const;

export type EventName = keyof typeof EVENT_SCHEMAS;

/** An event's payload schema without `actor`, which the HTTP intake sets from the caller (its OpenAPI body). */
export function payloadSchemaWithoutActor(name: EventName): z.ZodType {
  const { actor: _actor, ...shape } = EVENT_SCHEMAS[name].shape;
  return payloadSchema(shape);
}
export const EVENT_NAMES = Object.keys(EVENT_SCHEMAS) as EventName[];

/** The payload type of each event, derived from its schema. */
export type EventPayloads = { [K in EventName]: z.infer<(typeof EVENT_SCHEMAS)[K]> };

/**
 * A validated event: its name, its payload, and the eventId it is deduplicated by. `digestAsSent`, when normalising
 * changed the payload's endpoint URL: `payloadDigest` of the payload with the URL as the job carried it, the digest a
 * worker from before issue 28 (which kept the URL as sent) recorded in `processed_events` for this event.
 */
export type LifecycleEvent = {
  [K in EventName]: { readonly name: K; readonly eventId: string; readonly data: EventPayloads[K]; readonly digestAsSent?: string };
}[EventName];

export function isEventName(name: unknown): name is EventName {
  return typeof name === 'string' && Object.prototype.hasOwnProperty.call(EVENT_SCHEMAS, name);
}

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
    throw new ValidationError('invalid_payload', [
      { field: '(root)', rule: `must be at most ${MAX_PAYLOAD_BYTES} bytes as JSON, got ${size}` },
    ]);
  }
  const result = EVENT_SCHEMAS[name].safeParse(data, { reportInput: true });
  if (!result.success) throw new ValidationError('invalid_payload', toIssues(result.error));
  const problem = eventIdProblem(name, result.data);
  if (problem !== null) throw new ValidationError('invalid_payload', [{ field: 'eventId', rule: problem }]);
  return result.data;
}

/** Heartbeat and readiness stamps: they change no state, so they never wait for a decision or a batch. */
export const STAMP_EVENTS: ReadonlySet<string> = new Set<EventName>(['attempt.heartbeat', 'deployment.readiness']);

/** Events that happen once per subject: without an eventId they get the derived `<name>.<attemptId or deploymentId>`. */
export const ONCE_PER_SUBJECT: ReadonlySet<EventName> = new Set<EventName>([
  'deployment.create',
  'attempt.create',
  'attempt.start',
  'attempt.end',
  'attempt.cancel',
  'attempt.orphaned',
  'attempt.expired',
]);

/**
 * The eventId for a payload without one: `<name>.<attemptId>` for attempt events (`<name>.<deploymentId>` for
 * deployment.create), so a retried producer call enqueues the same event. Heartbeats, readiness, teardowns and
 * resolves can happen many times: they get a random id. Ids are lower case (the schemas normalise them).
 */
export function deriveEventId(name: EventName, payload: { deploymentId: string; attemptId?: string }): string {
  if (!ONCE_PER_SUBJECT.has(name)) return `${name}.${randomUUID()}`;
  return `${name}.${canonicalId(payload.attemptId ?? payload.deploymentId)}`;
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
  const [field, subject] = payload.attemptId === undefined ? ['deploymentId', payload.deploymentId] : ['attemptId', payload.attemptId];
  const rest = id.slice(name.length + 1);
  if (rest === subject || rest.startsWith(`${subject}.`)) return null;
  return `an id that begins with "${name}." must name this event's ${field} next ("${name}.${subject}", optionally followed by "." and more): a derived id belongs to its own subject`;
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
  if (problem !== null) throw new ValidationError('invalid_payload', [{ field: 'eventId', rule: `${problem} (the job id, standing for the missing eventId)` }]);
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
