/**
 * The lifecycle event contract (docs/contract.md, "Queues and jobs"): one strict schema per event, defined once and used
 * by the producer SDK, the worker, the transition service and the HTTP intake. Everything behind `parseEvent`
 * receives typed, trusted values.
 */
import { createHash, randomUUID } from 'node:crypto';
import { z } from 'zod';
import { ValidationError, type FieldIssue } from '../errors';

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
/**
 * The endpoint URL's rules as one JSON Schema pattern, since the JSON Schema of a refine is empty: http or https,
 * no `@` before the path (credentials), no query or fragment. As strict as the checks or stricter (it also refuses
 * an empty `@` and spaces), never laxer; test/unit/json-schemas.test.ts checks that on samples.
 */
const ENDPOINT_URL_JSON_PATTERN = '^[Hh][Tt][Tt][Pp][Ss]?://[^/?#@\\s]+(/[^?#\\s]*)?$';
const endpoint = z.strictObject({
  url: z
    .url({ protocol: /^https?$/, error: 'must be an http or https URL' })
    .max(2048, { error: 'must be at most 2048 characters' })
    .refine((v) => !/[?#]/.test(v), { error: 'must not carry a query or a fragment' })
    .refine(hasNoCredentials, { error: 'must not carry credentials (user:password@)' })
    .meta({
      pattern: ENDPOINT_URL_JSON_PATTERN,
      description: 'http or https, without credentials, query or fragment; its host must be one FLEET_ENDPOINT_ALLOW allows',
    }),
  kind: z.enum(['node_port', 'cluster_dns'], { error: 'must be "node_port" or "cluster_dns"' }),
});

function hasNoCredentials(url: string): boolean {
  try {
    const parsed = new URL(url);
    return parsed.username === '' && parsed.password === '';
  } catch {
    return true; // the URL rule reports it
  }
}

const base = { eventId: eventId.optional(), actor: actor.optional(), deploymentId: uuid };
const attemptBase = { ...base, attemptId: uuid };

export const EVENT_SCHEMAS = {
  'deployment.create': z.strictObject({
    ...base,
    name: z.string().regex(DEPLOYMENT_NAME_PATTERN, { error: 'must be 1-63 characters of a-z0-9-' }),
    endpoint: endpoint.optional(),
  }),
  'attempt.create': z.strictObject(attemptBase),
  'attempt.start': z.strictObject(attemptBase),
  'attempt.heartbeat': z.strictObject(attemptBase),
  'attempt.end': z.strictObject({
    ...attemptBase,
    outcome: z.enum(['succeeded', 'failed'], { error: 'must be "succeeded" or "failed"' }),
    reason: reason.optional(),
    endpoint: endpoint.optional(),
  }),
  'attempt.cancel': z.strictObject({ ...attemptBase, reason: reason.optional() }),
  'attempt.orphaned': z.strictObject(attemptBase),
  'attempt.expired': z.strictObject(attemptBase),
  'deployment.teardown': z.strictObject({ ...base, force: z.boolean({ error: 'must be a boolean' }).optional() }),
  'deployment.resolve': z.strictObject({
    ...base,
    outcome: z.enum(['ready', 'failed'], { error: 'must be "ready" or "failed"' }),
    reason: reason.optional(),
  }),
  'deployment.readiness': z.strictObject({
    ...base,
    observedAt: z.iso.datetime({ offset: true, error: 'must be an ISO 8601 date-time' }).optional(),
  }),
} as const;

export type EventName = keyof typeof EVENT_SCHEMAS;
export const EVENT_NAMES = Object.keys(EVENT_SCHEMAS) as EventName[];

/** The payload type of each event, derived from its schema. */
export type EventPayloads = { [K in EventName]: z.infer<(typeof EVENT_SCHEMAS)[K]> };

/** A validated event: its name, its payload, and the eventId it is deduplicated by. */
export type LifecycleEvent = { [K in EventName]: { readonly name: K; readonly eventId: string; readonly data: EventPayloads[K] } }[EventName];

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
 * An eventId claims only its own event kind (docs/contract.md). Ids that begin with an event name and a dot are that
 * event's: another event may not use them (a heartbeat sent as `attempt.end.<A>` would otherwise take the real
 * end's id, and the end would be dropped as already enqueued). Other ids are free-form; an id already used by a
 * different event (another name, another payload, another deployment) is refused where it meets the earlier one,
 * at the enqueue or at the worker (`event_id_conflict`), never dropped as a duplicate.
 */
export function eventIdProblem(name: EventName, payload: { eventId?: string | undefined }): string | null {
  const id = payload.eventId;
  if (id === undefined) return null;
  const kind = EVENT_NAMES.filter((n) => id.startsWith(`${n}.`)).sort((a, b) => b.length - a.length)[0];
  if (kind === undefined) return null;
  if (kind !== name) {
    return `must not begin with "${kind}.": ids with that prefix belong to ${kind} events (an eventId claims only its own event kind)`;
  }
  return null;
}

/**
 * Validates an event and settles its eventId: the payload's `eventId`, else `fallbackEventId` (the BullMQ jobId).
 */
export function parseEvent(name: string, data: unknown, fallbackEventId?: string): LifecycleEvent {
  const payload = parsePayload(name, data);
  const id = payload.eventId ?? fallbackEventId;
  if (id === undefined || !EVENT_ID_PATTERN.test(id)) {
    throw new ValidationError('invalid_payload', [
      { field: 'eventId', rule: 'is required (in the payload or as the job id) and must be 1-200 characters of A-Za-z0-9._-' },
    ]);
  }
  return { name, eventId: id, data: payload } as LifecycleEvent;
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
