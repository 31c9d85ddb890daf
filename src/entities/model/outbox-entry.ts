import { Column, Entity, Index, PrimaryGeneratedColumn } from 'typeorm';
import type { DeploymentState } from '../../machine';

/**
 * A transition waiting to be published on the stream, written in the same transaction as the transition.
 * `fields` holds the stream entry's fields exactly as docs/contract.md lists them (`transitionEntryFields`).
 */
@Entity({ name: 'outbox' })
// the relay reads unpublished rows in id order; pruning reads published rows by age
@Index('outbox_unpublished_idx', ['id'], { where: 'published_at IS NULL' })
@Index('outbox_published_at_idx', ['publishedAt'], { where: 'published_at IS NOT NULL' })
export class OutboxEntry {
  @PrimaryGeneratedColumn({ type: 'bigint' })
  id!: string;

  @Column({ name: 'deployment_id', type: 'uuid' })
  deploymentId!: string;

  @Column({ type: 'integer' })
  version!: number;

  @Column({ type: 'jsonb' })
  fields!: Record<string, string>;

  @Column({ name: 'created_at', type: 'timestamptz', default: () => 'now()' })
  createdAt!: Date;

  @Column({ name: 'published_at', type: 'timestamptz', nullable: true })
  publishedAt!: Date | null;

  @Column({ name: 'stream_id', type: 'varchar', length: 64, nullable: true })
  streamId!: string | null;
}

/** What a transition's stream entry is made of: the applied transition, as its history row records it. */
export interface TransitionEntrySource {
  readonly deploymentId: string;
  readonly attemptId: string | null;
  readonly from: DeploymentState | null;
  readonly to: DeploymentState;
  /** the deployment's version after the transition */
  readonly version: number;
  readonly reason: string;
  readonly eventId: string;
  /** the transition's time (the fleet clock) */
  readonly at: Date;
  readonly actor: string;
  /** the W3C trace context of the event's `transition` span when it is traced, else null (no field) */
  readonly traceparent: string | null;
}

/**
 * A transition's stream entry (docs/contract.md, "The transition stream"), all strings, as its outbox row's `fields`
 * hold it and the relay publishes it, but for `transitionId`: that is the history row's id, known only once the row
 * is inserted, so the write statement adds it (src/entities/sql/transition-write.ts). The one place the entry is made.
 */
export interface TransitionEntryFields {
  readonly type: 'state_transition';
  readonly deploymentId: string;
  /** empty when none */
  readonly attemptId: string;
  /** empty for creation */
  readonly from: string;
  readonly to: string;
  readonly version: string;
  readonly reason: string;
  readonly eventId: string;
  readonly at: string;
  readonly actor: string;
  readonly traceparent?: string;
}

export function transitionEntryFields(t: TransitionEntrySource): TransitionEntryFields {
  return {
    type: 'state_transition',
    deploymentId: t.deploymentId,
    attemptId: t.attemptId ?? '',
    from: t.from ?? '',
    to: t.to,
    version: String(t.version),
    reason: t.reason,
    eventId: t.eventId,
    at: t.at.toISOString(),
    actor: t.actor,
    ...(t.traceparent === null ? {} : { traceparent: t.traceparent }),
  };
}
