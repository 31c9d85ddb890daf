/**
 * The lifecycle event contract (CONTRACT.md, "Queues and jobs"): one strict schema per event, defined once and used
 * by the producer SDK, the worker, the transition service and the HTTP intake. Everything behind `parseEvent`
 * receives typed, trusted values.
 */
import { z } from 'zod';
import { ValidationError, type FieldIssue } from '../errors';

export const MAX_PAYLOAD_BYTES = 16 * 1024;
export const EVENT_ID_PATTERN = /^[A-Za-z0-9._-]{1,200}$/;
export const DEPLOYMENT_NAME_PATTERN = /^[a-z0-9-]{1,63}$/;

const eventId = z.string().regex(EVENT_ID_PATTERN, { error: 'must be 1-200 characters of A-Za-z0-9._-' });
const uuid = z.uuid({ error: 'must be a UUID' });
const reason = z.string().max(500, { error: 'must be at most 500 characters' });
const endpoint = z.strictObject({
  url: z
    .url({ protocol: /^https?$/, error: 'must be an http or https URL' })
    .max(2048, { error: 'must be at most 2048 characters' }),
  kind: z.enum(['node_port', 'cluster_dns'], { error: 'must be "node_port" or "cluster_dns"' }),
});

const base = { eventId: eventId.optional(), deploymentId: uuid };
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
  return result.data;
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
