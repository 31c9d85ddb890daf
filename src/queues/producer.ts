/**
 * The producer SDK: typed, validated enqueueing of lifecycle events onto the `lifecycle` queue. The jobId is the
 * eventId, so enqueueing the same event twice collapses into one job; the worker's processed_events table makes
 * any delivery that still gets through a recorded noop.
 */
import { Queue } from 'bullmq';
import type { DefaultJobOptions, JobsOptions, Telemetry } from 'bullmq';
import { SpanKind } from '@opentelemetry/api';
import type { RedisConnection } from '../redis/connection';
import { z } from 'zod';
import {
  canonicalPayload,
  deriveEventId,
  EVENT_NAMES,
  parsePayload,
  validateEvent,
  type EventName,
  type EventPayloads,
  type ValidatedEvent,
} from '../events/schemas';
import { PRODUCER_METHODS, type EventOfMethod, type ProducerMethodName } from '../events/catalog';
import { LIFECYCLE_QUEUE } from './names';
import { commandTimeoutOf, connectionForKey, createRedis, requireSlotPrefix } from '../redis/connection';
import { DurabilityError, EventIdConflictError } from '../errors';
import { assertEndpointAllowed, type EndpointAllowList } from '../events/endpoint-allow';
import { failSpan, tracer } from '../telemetry';

/** A payload as a producer writes it: `eventId` optional (derived when omitted). */
export type EventInput<K extends EventName> = Omit<EventPayloads[K], 'eventId'> & { eventId?: string };

/** What an enqueue did (the SDK's answer, and `POST /api/events`'s 202 body). */
export const enqueueResultSchema = z
  .object({
    name: z.enum(EVENT_NAMES),
    eventId: z.string(),
    jobId: z.string(),
    duplicate: z.boolean().describe('true when the same event (same name and payload) was already enqueued: nothing was added'),
  })
  .meta({ id: 'EnqueueResult' });
export type EnqueueResult = z.output<typeof enqueueResultSchema>;

/**
 * Job options every lifecycle job gets unless the producer overrides them. The worker owns the retries that
 * matter ("not created yet", conflicts, outages never use up `attempts`); `attempts` here only bounds retries of
 * unexpected errors. Completed and failed jobs are kept long enough to inspect, and bounded so Redis does not grow.
 */
export const DEFAULT_JOB_OPTIONS: DefaultJobOptions = Object.freeze({
  attempts: 5,
  backoff: { type: 'exponential', delay: 1000, jitter: 0.5 },
  removeOnComplete: { age: 24 * 3600, count: 10_000 },
  removeOnFail: { age: 7 * 24 * 3600, count: 50_000 },
});

/**
 * Whether the job held under an eventId carries this payload. Normally it is the job just added, as it was sent: the
 * same text. Else it is read as the schemas read it today, so that a job enqueued before a normalisation was added (an
 * endpoint URL stored as sent before issue 28) is still the same event as its retry; as stored when it no longer
 * validates (then it is another event).
 */
function holdsPayload(name: string, held: unknown, ours: string): boolean {
  if (canonicalPayload(held) === ours) return true;
  try {
    return canonicalPayload(parsePayload(name, held)) === ours;
  } catch {
    return false;
  }
}

/** The derived eventId lives with the event contract; re-exported here for SDK users. */
export { deriveEventId };

/**
 * The BullMQ jobId for an eventId. They are the same, except that BullMQ refuses integer-looking custom ids,
 * which the contract allows as eventIds: those get the `int.` prefix.
 */
export function jobIdFor(eventId: string): string {
  return `${parseInt(eventId, 10)}` === eventId ? `int.${eventId}` : eventId;
}

/**
 * Durable enqueue: `enqueue` returns only once the job is on at least `replicas` Redis replicas (Redis `WAIT` on
 * the connection that wrote it), else throws `DurabilityError` after `timeoutMs`. Without it, an acknowledged
 * enqueue is on the Redis master only, and a master that fails before its replicas have the write loses it.
 */
export interface DurableEnqueue {
  /** replicas that must have the job (default 1) */
  readonly replicas?: number;
  /** how long to wait for them (default 1000 ms) */
  readonly timeoutMs?: number;
}

export interface LifecycleProducerOptions {
  /** a Redis URL (a fail-fast connection is made and owned) or an existing ioredis connection (not closed by us) */
  readonly connection: string | RedisConnection;
  /** BullMQ key prefix (default `fleet`) */
  readonly prefix?: string;
  /** overrides of DEFAULT_JOB_OPTIONS */
  readonly defaultJobOptions?: DefaultJobOptions;
  /** FLEET_ENDPOINT_ALLOW: endpoints outside it are refused before anything is enqueued (default: any) */
  readonly endpointAllow?: EndpointAllowList | null;
  /** wait for Redis replicas before an enqueue returns (default: off; see DurableEnqueue) */
  readonly durable?: DurableEnqueue | null;
  /**
   * BullMQ's telemetry (`new BullMQOtel()` from bullmq-otel, or the fleet's `Tracing.bullmq`): BullMQ's producer
   * span, and the trace context carried in the job for the worker to continue (default: none, BullMQ traces
   * nothing). The SDK's own `enqueue <name>` span goes to whatever OpenTelemetry SDK the process registered (none:
   * the API's no-op tracer).
   */
  readonly telemetry?: Telemetry;
}

/** One method per event whose catalog entry names one (`createDeployment` for deployment.create, ...): `enqueue` of that event. */
export type EventMethods = { readonly [M in ProducerMethodName]: (input: EventInput<EventOfMethod<M>>) => Promise<EnqueueResult> };

// The class declares the catalog's methods through this interface and gets them on its prototype below: an event
// added to the catalog with a method has it here too, typed, with no second list to keep.
// eslint-disable-next-line @typescript-eslint/no-unsafe-declaration-merging, @typescript-eslint/no-empty-object-type
export interface LifecycleProducer extends EventMethods {}

// eslint-disable-next-line @typescript-eslint/no-unsafe-declaration-merging -- see the interface above
export class LifecycleProducer {
  readonly queue: Queue;
  private readonly ownedConnection: RedisConnection | null;
  private readonly endpointAllow: EndpointAllowList | null;
  private readonly connection: RedisConnection;
  private readonly prefix: string;
  /** on a cluster: the slot of the queue's keys (asked once) */
  private readonly slots = new Map<string, number>();
  private readonly durable: { readonly replicas: number; readonly timeoutMs: number } | null;
  private closing: Promise<void> | null = null;

  constructor(options: LifecycleProducerOptions) {
    requireSlotPrefix(options.connection, options.prefix ?? 'fleet', 'LifecycleProducer');
    this.ownedConnection = typeof options.connection === 'string' ? createRedis(options.connection, 'producer') : null;
    this.connection = this.ownedConnection ?? (options.connection as RedisConnection);
    this.prefix = options.prefix ?? 'fleet';
    this.endpointAllow = options.endpointAllow ?? null;
    const durable = options.durable ?? null;
    this.durable = durable === null ? null : { replicas: Math.max(1, durable.replicas ?? 1), timeoutMs: Math.max(1, durable.timeoutMs ?? 1000) };
    const commandTimeout = commandTimeoutOf(this.connection);
    if (this.durable !== null && commandTimeout !== undefined && this.durable.timeoutMs > commandTimeout - 1000) {
      this.ownedConnection?.disconnect();
      throw new RangeError(
        `durable.timeoutMs: must be at least 1000 ms under the connection's commandTimeout (${commandTimeout} ms), so that Redis answers the WAIT before the client gives up on it; got ${this.durable.timeoutMs}`,
      );
    }
    this.queue = new Queue(LIFECYCLE_QUEUE, {
      connection: this.ownedConnection ?? (options.connection as RedisConnection),
      prefix: options.prefix ?? 'fleet',
      defaultJobOptions: { ...DEFAULT_JOB_OPTIONS, ...options.defaultJobOptions },
      // fail fast while Redis is unreachable rather than waiting for it to come back
      skipWaitingForReady: true,
      ...(options.telemetry === undefined ? {} : { telemetry: options.telemetry }),
    });
    // Connection errors surface on the calls that hit them; the queue's own event would be unhandled otherwise.
    this.queue.on('error', () => undefined);
  }

  /**
   * Validates and enqueues one event. Throws `ValidationError` (naming the field and rule) before touching Redis.
   * The jobId is the eventId, and BullMQ answers an add for a jobId it holds with the job it holds: so the job
   * found under the id is read back, and if it is a different event (another name, or another payload), this one
   * was not enqueued and `EventIdConflictError` says so. The same event enqueued again is `duplicate: true`.
   */
  async enqueue<K extends EventName>(name: K, payload: EventInput<K>, jobOptions?: JobsOptions): Promise<EnqueueResult>;
  async enqueue(name: string, payload: unknown, jobOptions?: JobsOptions): Promise<EnqueueResult>;
  async enqueue(name: string, payload: unknown, jobOptions: JobsOptions = {}): Promise<EnqueueResult> {
    return this.enqueueValidated(validateEvent(name, payload), jobOptions);
  }

  /**
   * Enqueues an event validated already (`validateEvent`, as the HTTP intake does) as it is, without parsing it
   * again; the endpoint allow-list still applies. Otherwise as `enqueue`.
   */
  async enqueueValidated(event: ValidatedEvent, jobOptions: JobsOptions = {}): Promise<EnqueueResult> {
    assertEndpointAllowed(event.data, this.endpointAllow);
    const { name: eventName, data } = event;
    const eventId = data.eventId;
    const attributes = {
      'fleet.event.name': eventName,
      'fleet.event.id': eventId,
      'fleet.deployment.id': data.deploymentId,
      ...('attemptId' in data ? { 'fleet.attempt.id': data.attemptId } : {}),
    };
    // one trace per event starts here (or under the caller's span: the HTTP intake's request): BullMQ's producer
    // span and the job's trace context come under it
    return tracer().startActiveSpan(`enqueue ${eventName}`, { kind: SpanKind.INTERNAL, attributes }, async (span) => {
      try {
        const result = await this.add(eventName, data, jobOptions);
        span.setAttribute('fleet.duplicate', result.duplicate);
        return result;
      } catch (err) {
        failSpan(span, err);
        throw err;
      } finally {
        span.end();
      }
    });
  }

  private async add(eventName: EventName, ours: EventPayloads[EventName] & { eventId: string }, jobOptions: JobsOptions): Promise<EnqueueResult> {
    const eventId = ours.eventId;
    const jobId = jobIdFor(eventId);
    // Read back what the id holds. Found nothing means the job under the id finished and was removed between the
    // add and the read (ours, or an earlier one that made the add a no-op): add again, so that the event is really
    // there (the worker's processed_events then tells a redelivery from another event with this id).
    for (let attempt = 1; ; attempt++) {
      const added = await this.queue.add(eventName, ours, { ...jobOptions, jobId });
      const held = await this.queue.getJob(jobId);
      if (held === undefined || held === null) {
        if (attempt < 3) continue;
        await this.awaitReplicas(eventId);
        return { name: eventName, eventId, jobId, duplicate: false }; // added each time and done at once: it is in
      }
      const differs = held.name !== eventName ? 'name' : holdsPayload(held.name, held.data, canonicalPayload(ours)) ? null : 'payload';
      if (differs !== null) {
        throw new EventIdConflictError(eventId, { name: held.name, state: await held.getState() }, differs);
      }
      await this.awaitReplicas(eventId);
      return { name: eventName, eventId, jobId, duplicate: held.timestamp !== added.timestamp };
    }
  }

  /**
   * Durable enqueue: Redis `WAIT` on the connection that wrote the job, which returns how many replicas have every
   * write this connection made so far (ours included). Fewer than asked when the time is up: `DurabilityError`.
   */
  private async awaitReplicas(eventId: string): Promise<void> {
    if (this.durable === null) return;
    const { replicas, timeoutMs } = this.durable;
    const writer = await connectionForKey(this.connection, `${this.prefix}:${LIFECYCLE_QUEUE}`, this.slots);
    const acknowledged = Number(await writer.call('WAIT', replicas, timeoutMs));
    if (acknowledged < replicas) throw new DurabilityError(eventId, replicas, acknowledged, timeoutMs);
  }

  /** Closes the queue and the connection it owns. Safe to call twice. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const owned = this.ownedConnection;
      // QUIT needs an answer: with Redis away, drop the connection at once instead
      if (owned !== null && owned.status !== 'ready') owned.disconnect();
      await this.queue.close();
      if (owned !== null && owned.status === 'ready') await owned.quit().catch(() => owned.disconnect());
    })();
    return this.closing;
  }
}

for (const [method, name] of Object.entries(PRODUCER_METHODS)) {
  Object.defineProperty(LifecycleProducer.prototype, method, {
    value(this: LifecycleProducer, input: unknown): Promise<EnqueueResult> {
      return this.enqueue(name, input);
    },
    writable: true,
    configurable: true,
  });
}
