import { Column, Entity, Index, PrimaryGeneratedColumn } from 'typeorm';

/**
 * A transition waiting to be published on the stream, written in the same transaction as the transition.
 * `fields` holds the stream entry's fields exactly as docs/contract.md lists them.
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
