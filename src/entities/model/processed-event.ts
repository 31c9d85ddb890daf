import { Column, Entity, Index, PrimaryColumn } from 'typeorm';

/** One row per decided eventId: a redelivered event finds its row and becomes a recorded noop. */
@Entity({ name: 'processed_events' })
// pruning by age
@Index('processed_events_processed_at_idx', ['processedAt'])
export class ProcessedEvent {
  @PrimaryColumn({ name: 'event_id', type: 'varchar', length: 200 })
  eventId!: string;

  @Column({ name: 'event_name', type: 'varchar', length: 64 })
  eventName!: string;

  @Column({ name: 'deployment_id', type: 'uuid' })
  deploymentId!: string;

  /** `applied` or `noop` */
  @Column({ type: 'varchar', length: 16 })
  outcome!: string;

  @Column({ type: 'varchar', length: 64 })
  reason!: string;

  /** the deployment version the event produced (applied) or saw (noop) */
  @Column({ type: 'integer', nullable: true })
  version!: number | null;

  /** SHA-256 of the canonical payload (null for rows written before it was kept): another payload is another event */
  @Column({ name: 'payload_sha256', type: 'char', length: 64, nullable: true })
  payloadSha256!: string | null;

  @Column({ name: 'processed_at', type: 'timestamptz', default: () => 'now()' })
  processedAt!: Date;
}
