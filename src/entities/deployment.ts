import { Column, CreateDateColumn, Entity, PrimaryColumn, UpdateDateColumn } from 'typeorm';
import type { DeploymentState, EndpointKind } from '../machine';

/** A deployment's current state. Written only by the transition service's version-checked UPDATE. */
@Entity({ name: 'deployments' })
export class Deployment {
  @PrimaryColumn({ type: 'uuid' })
  id!: string;

  @Column({ type: 'varchar', length: 63 })
  name!: string;

  @Column({ type: 'varchar', length: 16 })
  state!: DeploymentState;

  /** Bumped by every applied transition; never by heartbeat stamps. Checked explicitly in the UPDATE's WHERE. */
  @Column({ type: 'integer' })
  version!: number;

  @Column({ name: 'current_attempt_id', type: 'uuid', nullable: true })
  currentAttemptId!: string | null;

  @Column({ name: 'endpoint_url', type: 'text', nullable: true })
  endpointUrl!: string | null;

  @Column({ name: 'endpoint_kind', type: 'varchar', length: 16, nullable: true })
  endpointKind!: EndpointKind | null;

  @Column({ name: 'last_ready_at', type: 'timestamptz', nullable: true })
  lastReadyAt!: Date | null;

  @Column({ name: 'state_changed_at', type: 'timestamptz' })
  stateChangedAt!: Date;

  @CreateDateColumn({ name: 'created_at', type: 'timestamptz' })
  createdAt!: Date;

  @UpdateDateColumn({ name: 'updated_at', type: 'timestamptz' })
  updatedAt!: Date;
}
