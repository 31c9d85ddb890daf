import { Check, Column, Entity, Index, JoinColumn, ManyToOne, PrimaryColumn, Unique } from 'typeorm';
import type { AttemptStatus } from '../../machine';
import type { Deployment } from './deployment';

/** One try at deploying a deployment. `number` counts from 1 per deployment. */
@Entity({ name: 'attempts' })
@Check('attempts_number_check', `number >= 1`)
@Check('attempts_status_check', `status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'abandoned', 'superseded')`)
@Unique('attempts_deployment_id_number_key', ['deploymentId', 'number'])
// the sweep's deadline scan: running attempts by start
@Index('attempts_running_started_idx', ['startedAt'], { where: `status = 'running'` })
// The sweep's orphan scan, on the liveness expression (ATTEMPT_LIVENESS, sql/liveness.ts) WHERE status = 'running':
// TypeORM cannot declare an expression index, so the migration owns it and the schema diff leaves it alone
// (synchronize: false).
@Index('attempts_running_liveness_idx', { synchronize: false })
export class Attempt {
  @PrimaryColumn({ type: 'uuid' })
  id!: string;

  @Column({ name: 'deployment_id', type: 'uuid' })
  deploymentId!: string;

  /** The relation behind `deploymentId` (never loaded by the fleet; it declares the foreign key). */
  @ManyToOne('Deployment', { nullable: false })
  @JoinColumn({ name: 'deployment_id', foreignKeyConstraintName: 'attempts_deployment_id_fkey' })
  deployment?: Deployment;

  @Column({ type: 'integer' })
  number!: number;

  @Column({ type: 'varchar', length: 16 })
  status!: AttemptStatus;

  @Column({ name: 'started_at', type: 'timestamptz', nullable: true })
  startedAt!: Date | null;

  @Column({ name: 'ended_at', type: 'timestamptz', nullable: true })
  endedAt!: Date | null;

  @Column({ name: 'last_heartbeat_at', type: 'timestamptz', nullable: true })
  lastHeartbeatAt!: Date | null;

  @Column({ type: 'text', nullable: true })
  reason!: string | null;

  @Column({ name: 'created_at', type: 'timestamptz', default: () => 'now()' })
  createdAt!: Date;
}
