import { Column, Entity, JoinColumn, ManyToOne, PrimaryGeneratedColumn, Unique } from 'typeorm';
import type { DeploymentState } from '../../machine';
import type { Deployment } from './deployment';

/** Append-only history: one row per applied transition, unique per (deployment, version). */
@Entity({ name: 'state_transitions' })
@Unique('state_transitions_deployment_id_version_key', ['deploymentId', 'version'])
export class StateTransition {
  /** bigint: returned as a string by pg */
  @PrimaryGeneratedColumn({ type: 'bigint' })
  id!: string;

  @Column({ name: 'deployment_id', type: 'uuid' })
  deploymentId!: string;

  /** The relation behind `deploymentId` (never loaded by the fleet; it declares the foreign key). */
  @ManyToOne('Deployment', { nullable: false })
  @JoinColumn({ name: 'deployment_id', foreignKeyConstraintName: 'state_transitions_deployment_id_fkey' })
  deployment?: Deployment;

  @Column({ name: 'attempt_id', type: 'uuid', nullable: true })
  attemptId!: string | null;

  @Column({ name: 'from_state', type: 'varchar', length: 16, nullable: true })
  fromState!: DeploymentState | null;

  @Column({ name: 'to_state', type: 'varchar', length: 16 })
  toState!: DeploymentState;

  @Column({ type: 'integer' })
  version!: number;

  @Column({ type: 'varchar', length: 64 })
  reason!: string;

  @Column({ name: 'event_id', type: 'varchar', length: 200 })
  eventId!: string;

  /** who caused it: an API token's name, `sweep`, or the producer's `actor` (`unrecorded` before it was kept) */
  @Column({ type: 'varchar', length: 100, default: 'unrecorded' })
  actor!: string;

  @Column({ name: 'created_at', type: 'timestamptz', default: () => 'now()' })
  createdAt!: Date;
}
