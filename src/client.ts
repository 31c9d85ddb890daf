/**
 * `lifecycle-fleet/client`: what a service needs to enqueue lifecycle events or consume transitions, and nothing of
 * the server: importing it loads no HTTP framework, ORM, Bull Board or OpenTelemetry SDK (test/unit/client-entry.test.ts
 * keeps it so). The package root (`lifecycle-fleet`) exports all of this too, with what it takes to run a fleet.
 */
export { LifecycleProducer, DEFAULT_JOB_OPTIONS, deriveEventId, jobIdFor } from './queues/producer';
export type { DurableEnqueue, EnqueueResult, EventInput, EventMethods, LifecycleProducerOptions } from './queues/producer';
export { LIFECYCLE_QUEUE, MAINTENANCE_QUEUE } from './queues/names';
export { EVENT_NAMES, EVENT_SCHEMAS, MAX_PAYLOAD_BYTES, isEventName, parseEvent, parsePayload, validateEvent } from './events/schemas';
export type { EventName, EventPayloads, LifecycleEvent, ValidatedEvent } from './events/schemas';
export { STREAM_ENTRY_SCHEMA, TransitionConsumer, memoryVersionStore, parseEntry } from './streams/consumer';
export type { TransitionConsumerOptions, TransitionEntry, VersionStore } from './streams/consumer';
export { partitionOf, partitionKey, partitionKeys, partitionsRecordKey, readPartitions, MAX_STREAM_PARTITIONS } from './streams/partitions';
export {
  ConflictError,
  DurabilityError,
  EventIdConflictError,
  FleetError,
  NotYetError,
  ResyncRequiredError,
  ValidationError,
  isTransient,
} from './errors';
export type { FieldIssue } from './errors';
export type { AttemptStatus, DeploymentState, Endpoint, EndpointKind, MachineEvent, TransitionReason } from './machine';
