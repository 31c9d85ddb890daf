/**
 * The package's root: the client (src/client.ts: the producer SDK, the stream consumer, the event contract, the
 * errors), and what a program that runs a fleet itself builds it from: the state machine, the transition service,
 * the workers, the outbox relay, the configuration, the database and the composition root (`startFleet`). Internals
 * that only the fleet wires (the sweeper, the stamp buffer, the HTTP server) are not exported.
 */
export * from './client';
export { decide } from './machine';
export type * from './machine';
export { TransitionService } from './services/transitions';
export type { ApplyResult, ApplyOptions, TransitionServiceOptions } from './services/transitions';
export { LifecycleWorker } from './workers/lifecycle-worker';
export type { LifecycleWorkerOptions } from './workers/lifecycle-worker';
export { OutboxRelay, relayLagSeconds, transitionStreamKey } from './streams/outbox-relay';
export type { OutboxRelayOptions } from './streams/outbox-relay';
export { ConfigError } from './errors';
export { loadConfig } from './config';
export type { FleetConfig } from './config';
export { createDataSource } from './entities/schema/data-source';
export { migrate } from './entities/schema/migrate';
export { startFleet } from './app';
export { resolveEndpoint, DEFAULT_READY_WINDOW_S } from './services/dispatch/resolve-endpoint';
export type { DispatchInput, DispatchOptions, DispatchReason, DispatchSource, ResolvedEndpoint } from './services/dispatch/resolve-endpoint';
export { SweepWorker, ensureSweepScheduler, SWEEP_SCHEDULER_ID } from './workers/sweep-worker';
export type { SweepWorkerOptions, EnsureSweepSchedulerOptions, EnsureSweepSchedulerResult } from './workers/sweep-worker';
export { FleetMetrics } from './metrics';
export { startTracing, TRACING_OFF, formatTraceparent, traceparentContext } from './telemetry';
export type { Tracing, TracingSettings, TracingStartOptions } from './telemetry';
