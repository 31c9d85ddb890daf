/** The package's public API: the producer SDK, the event contract, the state machine and the building blocks. */
export { LifecycleProducer, DEFAULT_JOB_OPTIONS, deriveEventId, jobIdFor } from './queues/producer';
export type { EnqueueResult, EventInput, LifecycleProducerOptions } from './queues/producer';
export { LIFECYCLE_QUEUE, MAINTENANCE_QUEUE } from './queues/names';
export { EVENT_NAMES, EVENT_SCHEMAS, MAX_PAYLOAD_BYTES, parseEvent, parsePayload, isEventName } from './events/schemas';
export type { EventName, EventPayloads, LifecycleEvent } from './events/schemas';
export { decide } from './machine';
export type * from './machine';
export { TransitionService } from './services/transition-service';
export type { ApplyResult, ApplyOptions, TransitionServiceOptions } from './services/transition-service';
export { LifecycleWorker } from './workers/lifecycle-worker';
export type { LifecycleWorkerOptions } from './workers/lifecycle-worker';
export { ConfigError, ConflictError, FleetError, NotYetError, ValidationError, isTransient } from './errors';
export type { FieldIssue } from './errors';
export { loadConfig } from './config';
export type { FleetConfig } from './config';
export { createDataSource } from '../ormconfig';
export { migrate } from './entities/migrate';
export { startFleet } from './app';
