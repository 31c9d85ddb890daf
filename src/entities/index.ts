/**
 * Persistence: in model/ the entity classes (the typed schema, proven equal to what the migrations build by
 * test/integration/migrate.test.ts), in schema/ the data source, the migrations and their runner, and in sql/ every
 * statement the product runs. Knows nothing of BullMQ or Redis.
 */
import { Attempt } from './model/attempt';
import { Deployment } from './model/deployment';
import { OutboxEntry } from './model/outbox-entry';
import { ProcessedEvent } from './model/processed-event';
import { StateTransition } from './model/state-transition';
import { Initial1763900000000 } from './schema/migrations/1763900000000-initial';
import { TransitionActor1764650000000 } from './schema/migrations/1764650000000-transition-actor';
import { ReadinessProbed1764700000000 } from './schema/migrations/1764700000000-readiness-probed';
import { SchemaFloor1765000000000 } from './schema/migrations/1765000000000-schema-floor';
import { AttentionIndex1765100000000 } from './schema/migrations/1765100000000-attention-index';

export { Attempt, Deployment, OutboxEntry, ProcessedEvent, StateTransition };

/** The explicit entity list: no globs, so a compiled or bundled build finds the same set. */
export const ENTITIES = [Deployment, Attempt, StateTransition, OutboxEntry, ProcessedEvent];

/** Migrations in order. */
export const MIGRATIONS = [
  Initial1763900000000,
  TransitionActor1764650000000,
  ReadinessProbed1764700000000,
  SchemaFloor1765000000000,
  AttentionIndex1765100000000,
];
