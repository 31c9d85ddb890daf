/**
 * Heartbeat and readiness stamps: observations that change no state, so they bypass the machine and the version
 * check. Each is one monotonic UPDATE; when it stamps nothing, a lookup tells "not there yet" (a retryable
 * NotYetError) from "there, but not running / not ready" (a noop).
 */
import { NotYetError } from '../../errors';
import { STAMP_SQL, type Database } from '../../entities/sql';
import type { LifecycleEvent } from '../../events/schemas';
import type { ApplyResult } from './outcomes';

export class Stamps {
  constructor(
    private readonly db: Database,
    private readonly now: () => Date,
  ) {}

  async heartbeat(event: Extract<LifecycleEvent, { name: 'attempt.heartbeat' }>, producedAt: Date | undefined): Promise<ApplyResult> {
    const { deploymentId, attemptId } = event.data;
    const result = await this.db.run(STAMP_SQL.heartbeat, [attemptId, deploymentId, this.observedAt(producedAt)]);
    const base = { eventId: event.eventId, deploymentId, outcome: 'noop' } as const;
    if (result.affected === 1) return { ...base, reason: 'stamped' };
    await this.requireExists(deploymentId, attemptId);
    return { ...base, reason: 'not_running' };
  }

  async readiness(event: Extract<LifecycleEvent, { name: 'deployment.readiness' }>, producedAt: Date | undefined): Promise<ApplyResult> {
    const { deploymentId } = event.data;
    const observed = event.data.observedAt === undefined ? producedAt : new Date(event.data.observedAt);
    const result = await this.db.run(STAMP_SQL.readiness, [deploymentId, this.observedAt(observed)]);
    const base = { eventId: event.eventId, deploymentId, outcome: 'noop' } as const;
    if (result.affected === 1) return { ...base, reason: 'stamped' };
    await this.requireExists(deploymentId, null);
    return { ...base, reason: 'not_ready' };
  }

  /** An observation's time: when it was produced, but never in the future of our clock. */
  private observedAt(producedAt: Date | undefined): Date {
    const now = this.now();
    return producedAt === undefined || producedAt.getTime() > now.getTime() ? now : producedAt;
  }

  private async requireExists(deploymentId: string, attemptId: string | null): Promise<void> {
    const row = (await this.db.run(STAMP_SQL.exists, [deploymentId, attemptId])).rows[0];
    if (row?.d == null) throw new NotYetError('deployment_not_found', deploymentId);
    if (attemptId !== null && row.a == null) throw new NotYetError('attempt_not_found', deploymentId, attemptId);
  }
}
