/**
 * The event catalog (docs/contract.md, "Queues and jobs"): one entry per lifecycle event, and everything else about
 * events derived from it: the payload schemas (EVENT_SCHEMAS, and docs/schemas through `npm run schemas`), the
 * stamps (STAMP_EVENTS), the events that happen once per subject (ONCE_PER_SUBJECT: their derived eventIds), the
 * scope the HTTP intake asks for (`eventScope`), the producer SDK's methods (`PRODUCER_METHODS`) and the machine's
 * view of an event (`toMachineEvent`). Adding an event is one entry here plus its rows in the machine's state table
 * (src/machine); the compiler holds the two to each other (`MachineMapping`).
 */
import { z } from 'zod';
import type { MachineEvent, MachineEventType } from '../machine';
import { actor, DEPLOYMENT_NAME_PATTERN, endpoint, eventId, payloadSchema, reason, uuid } from './fields';

/** What an event is about: a deployment, or one attempt of it. A derived eventId names it (`<name>.<its id>`). */
export type Subject = 'deployment' | 'attempt';

/** The scopes the HTTP intake may ask of an event's sender (docs/contract.md, "HTTP", Auth). */
export type EventScope = 'events:write' | 'events:admin';

/** When the machine re-checks a sweep's verdict: computed where the event is applied (the transition service). */
export interface MachineCutoffs {
  /** `attempt.orphaned`: the attempt is orphaned only while its liveness is older than this */
  readonly deadBefore: Date;
  /** `attempt.expired`: the attempt expired only if it started before this */
  readonly startedBefore: Date;
}

/** The ids every payload carries, by subject; the entry's own fields come after them. */
const SUBJECT_FIELDS = {
  deployment: { eventId: eventId.optional(), actor: actor.optional(), deploymentId: uuid },
  attempt: { eventId: eventId.optional(), actor: actor.optional(), deploymentId: uuid, attemptId: uuid },
} as const;

type PayloadShape<S extends Subject, F extends z.core.$ZodLooseShape> = (typeof SUBJECT_FIELDS)[S] & F;
type Payload<S extends Subject, F extends z.core.$ZodLooseShape> = z.output<ReturnType<typeof payloadSchema<PayloadShape<S, F>>>>;

/** What every entry says. */
interface EventSpec<S extends Subject, F extends z.core.$ZodLooseShape, Method extends string | null> {
  readonly subject: S;
  /** the payload's fields besides `eventId`, `actor` and the subject's ids */
  readonly fields: F;
  /** happens once per subject: without an eventId it gets the derived `<name>.<subject's id>`, else a random one */
  readonly once: boolean;
  /** what the HTTP intake asks: a scope, or `events:admin` when the payload's boolean `field` is true */
  readonly scope: EventScope | { readonly adminWhen: keyof F & string };
  /** the producer SDK's method for the event; null for the fleet's own events (the sweep's) */
  readonly method: Method;
}

/** A stamp changes no state (a heartbeat, a readiness observation): it never waits for a decision or a batch. */
function stamp<S extends Subject, F extends z.core.$ZodLooseShape, Method extends string | null>(spec: EventSpec<S, F, Method>) {
  return { ...spec, kind: 'stamp' as const, schema: payloadSchema<PayloadShape<S, F>>({ ...SUBJECT_FIELDS[spec.subject], ...spec.fields }) };
}

/** An event the machine decides on; `toMachine` is the machine's view of its payload. */
function transition<S extends Subject, F extends z.core.$ZodLooseShape, Method extends string | null, M extends MachineEvent>(
  spec: EventSpec<S, F, Method> & { readonly toMachine: (data: Payload<S, F>, cutoffs: MachineCutoffs) => M },
) {
  return { ...spec, kind: 'transition' as const, schema: payloadSchema<PayloadShape<S, F>>({ ...SUBJECT_FIELDS[spec.subject], ...spec.fields }) };
}

/** Every event of the machine has an entry, and an entry maps to the machine's event of its own name. */
type MachineMapping = {
  readonly [K in MachineEventType]: {
    readonly kind: 'transition';
    readonly toMachine: (data: never, cutoffs: MachineCutoffs) => Extract<MachineEvent, { type: K }>;
  };
};

export const EVENT_CATALOG = {
  'deployment.create': transition({
    subject: 'deployment',
    fields: {
      name: z.string().regex(DEPLOYMENT_NAME_PATTERN, { error: 'must be 1-63 characters of a-z0-9-' }),
      endpoint: endpoint.optional(),
    },
    once: true,
    scope: 'events:write',
    method: 'createDeployment',
    toMachine: (d) => ({ type: 'deployment.create', name: d.name, endpoint: d.endpoint }),
  }),
  'attempt.create': transition({
    subject: 'attempt',
    fields: {},
    once: true,
    scope: 'events:write',
    method: 'createAttempt',
    toMachine: (d) => ({ type: 'attempt.create', attemptId: d.attemptId }),
  }),
  'attempt.start': transition({
    subject: 'attempt',
    fields: {},
    once: true,
    scope: 'events:write',
    method: 'startAttempt',
    toMachine: (d) => ({ type: 'attempt.start', attemptId: d.attemptId }),
  }),
  'attempt.heartbeat': stamp({ subject: 'attempt', fields: {}, once: false, scope: 'events:write', method: 'heartbeat' }),
  'attempt.end': transition({
    subject: 'attempt',
    fields: {
      outcome: z.enum(['succeeded', 'failed'], { error: 'must be "succeeded" or "failed"' }),
      reason: reason.optional(),
      endpoint: endpoint.optional(),
    },
    once: true,
    scope: 'events:write',
    method: 'endAttempt',
    toMachine: (d) => ({ type: 'attempt.end', attemptId: d.attemptId, outcome: d.outcome, reason: d.reason, endpoint: d.endpoint }),
  }),
  'attempt.cancel': transition({
    subject: 'attempt',
    fields: { reason: reason.optional() },
    once: true,
    scope: 'events:write',
    method: 'cancelAttempt',
    toMachine: (d) => ({ type: 'attempt.cancel', attemptId: d.attemptId, reason: d.reason }),
  }),
  // the sweep's verdicts, re-checked by the machine against the cutoffs where they are applied
  'attempt.orphaned': transition({
    subject: 'attempt',
    fields: {},
    once: true,
    scope: 'events:admin',
    method: null,
    toMachine: (d, cutoffs) => ({ type: 'attempt.orphaned', attemptId: d.attemptId, deadBefore: cutoffs.deadBefore }),
  }),
  'attempt.expired': transition({
    subject: 'attempt',
    fields: {},
    once: true,
    scope: 'events:admin',
    method: null,
    toMachine: (d, cutoffs) => ({ type: 'attempt.expired', attemptId: d.attemptId, startedBefore: cutoffs.startedBefore }),
  }),
  'deployment.teardown': transition({
    subject: 'deployment',
    fields: { force: z.boolean({ error: 'must be a boolean' }).optional() },
    once: false,
    scope: { adminWhen: 'force' },
    method: 'teardown',
    toMachine: (d) => ({ type: 'deployment.teardown', force: d.force }),
  }),
  'deployment.resolve': transition({
    subject: 'deployment',
    fields: {
      outcome: z.enum(['ready', 'failed'], { error: 'must be "ready" or "failed"' }),
      reason: reason.optional(),
    },
    once: false,
    scope: 'events:admin',
    method: 'resolve',
    toMachine: (d) => ({ type: 'deployment.resolve', outcome: d.outcome, reason: d.reason }),
  }),
  'deployment.readiness': stamp({
    subject: 'deployment',
    fields: { observedAt: z.iso.datetime({ offset: true, error: 'must be an ISO 8601 date-time' }).optional() },
    once: false,
    scope: 'events:write',
    method: 'readiness',
  }),
} satisfies MachineMapping & Readonly<Record<string, { readonly kind: 'stamp' | 'transition' }>>;

type Catalog = typeof EVENT_CATALOG;
export type EventName = keyof Catalog;
export const EVENT_NAMES = Object.keys(EVENT_CATALOG) as EventName[];

/** Each event's payload schema. */
export const EVENT_SCHEMAS = Object.fromEntries(EVENT_NAMES.map((name) => [name, EVENT_CATALOG[name].schema])) as {
  readonly [K in EventName]: Catalog[K]['schema'];
};

/** The payload type of each event, derived from its schema. */
export type EventPayloads = { [K in EventName]: z.infer<Catalog[K]['schema']> };

/** The events the machine decides on, and the stamps. */
export type TransitionName = { [K in EventName]: Catalog[K]['kind'] extends 'transition' ? K : never }[EventName];
export type StampName = Exclude<EventName, TransitionName>;

export function isEventName(name: unknown): name is EventName {
  return typeof name === 'string' && Object.prototype.hasOwnProperty.call(EVENT_CATALOG, name);
}

/** Heartbeat and readiness stamps: they change no state, so they never wait for a decision or a batch. */
export const STAMP_EVENTS: ReadonlySet<string> = new Set<EventName>(EVENT_NAMES.filter((name) => EVENT_CATALOG[name].kind === 'stamp'));

/** Events that happen once per subject: without an eventId they get the derived `<name>.<attemptId or deploymentId>`. */
export const ONCE_PER_SUBJECT: ReadonlySet<EventName> = new Set<EventName>(EVENT_NAMES.filter((name) => EVENT_CATALOG[name].once));

/** The id of what the event is about: its attemptId, or its deploymentId. */
export function subjectIdOf(
  name: EventName,
  payload: { readonly deploymentId: string; readonly attemptId?: string },
): { field: 'attemptId' | 'deploymentId'; id: string } {
  return EVENT_CATALOG[name].subject === 'attempt' && payload.attemptId !== undefined
    ? { field: 'attemptId', id: payload.attemptId }
    : { field: 'deploymentId', id: payload.deploymentId };
}

/**
 * The scope the HTTP intake asks of an event's sender, read before the payload is validated (a caller without the
 * scope learns nothing of the payload's rules): `data` as sent.
 */
export function eventScope(name: EventName, data: unknown): EventScope {
  const { scope } = EVENT_CATALOG[name];
  if (typeof scope === 'string') return scope;
  const flag = typeof data === 'object' && data !== null ? (data as Record<string, unknown>)[scope.adminWhen] : undefined;
  return flag === true ? 'events:admin' : 'events:write';
}

/** The producer SDK's method of each event that has one, by method name. */
export type ProducerMethodName = { [K in EventName]: Catalog[K]['method'] }[EventName] & string;
export type EventOfMethod<M extends ProducerMethodName> = { [K in EventName]: Catalog[K]['method'] extends M ? K : never }[EventName];
export const PRODUCER_METHODS = Object.fromEntries(
  EVENT_NAMES.flatMap((name) => {
    const method = EVENT_CATALOG[name].method;
    return method === null ? [] : [[method, name]];
  }),
) as { readonly [M in ProducerMethodName]: EventOfMethod<M> };

/** An event the machine decides on, as the transition service holds it (a `LifecycleEvent` of a transition). */
export type MachineBound = { [K in TransitionName]: { readonly name: K; readonly data: EventPayloads[K] } }[TransitionName];

/** The machine's view of an event (`decide`'s input). */
export function toMachineEvent(event: MachineBound, cutoffs: MachineCutoffs): MachineEvent {
  // each entry's `toMachine` takes its own event's payload; TypeScript cannot follow `name` to the matching entry
  const toMachine = EVENT_CATALOG[event.name].toMachine as (data: EventPayloads[TransitionName], cutoffs: MachineCutoffs) => MachineEvent;
  return toMachine(event.data, cutoffs);
}
