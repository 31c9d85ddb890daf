import { Check, Column, CreateDateColumn, Entity, Index, JoinColumn, ManyToOne, PrimaryColumn, UpdateDateColumn } from 'typeorm';
import type { DeploymentState, EndpointKind } from '../../machine';
import type { Attempt } from './attempt';

/** A deployment's current state. Written only by the transition service's version-checked UPDATE. */
@Entity({ name: 'deployments' })
@Check('deployments_state_check', `state IN ('pending', 'deploying', 'ready', 'failed', 'unknown')`)
@Check('deployments_version_check', `version >= 1`)
@Check('deployments_endpoint_kind_check', `endpoint_kind IN ('node_port', 'cluster_dns')`)
@Check('deployments_check', `(endpoint_url IS NULL) = (endpoint_kind IS NULL)`)
// paged listing by state
@Index('deployments_state_id_idx', ['state', 'id'])
// the sweep's readiness set
@Index('deployments_ready_node_port_idx', ['id'], { where: `state = 'ready' AND endpoint_kind = 'node_port'` })
// the summary's attention list, newest first (the migration builds it on state_changed_at DESC: TypeORM cannot say so)
@Index('deployments_attention_idx', ['stateChangedAt', 'id'], { where: `state IN ('unknown', 'failed')` })
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

  /** The relation behind `currentAttemptId` (never loaded by the fleet; it declares the deferred foreign key). */
  @ManyToOne('Attempt', { nullable: true, deferrable: 'INITIALLY DEFERRED' })
  @JoinColumn({ name: 'current_attempt_id', foreignKeyConstraintName: 'deployments_current_attempt_fk' })
  currentAttempt?: Attempt | null;

  @Column({ name: 'endpoint_url', type: 'text', nullable: true })
  endpointUrl!: string | null;

  @Column({ name: 'endpoint_kind', type: 'varchar', length: 16, nullable: true })
  endpointKind!: EndpointKind | null;

  @Column({ name: 'last_ready_at', type: 'timestamptz', nullable: true })
  lastReadyAt!: Date | null;

  /** when the sweep last probed the endpoint, whatever the answer (round-robin order of the readiness probes) */
  @Column({ name: 'last_probed_at', type: 'timestamptz', nullable: true })
  lastProbedAt!: Date | null;

  @Column({ name: 'state_changed_at', type: 'timestamptz' })
  stateChangedAt!: Date;

  @CreateDateColumn({ name: 'created_at', type: 'timestamptz' })
  createdAt!: Date;

  @UpdateDateColumn({ name: 'updated_at', type: 'timestamptz' })
  updatedAt!: Date;
}
