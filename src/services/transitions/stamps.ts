/**
 * Heartbeat and readiness stamps: observations that change no state, so they bypass the machine and the version
 * check. With a stamp buffer, each is absorbed in Redis (one command, no PostgreSQL: the noop `buffered`) and the
 * buffer's flush writes them in batches and decides `not_running` / `not_ready` / `not_found` there. Without one,
 * each is one monotonic UPDATE; when it stamps nothing, a lookup tells "not there yet" (a retryable NotYetError) from
 * "there, but not running / not ready" (a noop).
 */
import { NotYetError } from '../../errors';
import { STAMP_SQL, type Database } from '../../entities/sql';
import type { LifecycleEvent } from '../../events/schemas';
import type { StampBuffer } from '../stamp-buffer';
import type { ApplyResult } from './outcomes';

export class Stamps {
  constructor(
    private readonly db: Database,
    private readonly now: () => Date,
    private readonly buffer: StampBuffer | null = null,
  ) {}

  async heartbeat(event: Extract<LifecycleEvent, { name: 'attempt.heartbeat' }>, producedAt: Date | undefined): Promise<ApplyResult> {
    const { deploymentId, attemptId } = event.data;
    const base = { eventId: event.eventId, deploymentId, outcome: 'noop' } as const;
    if (this.buffer !== null) {
      await this.buffer.absorbHeartbeat(attemptId, deploymentId, this.observedAt(producedAt));
      return { ...base, reason: 'buffered' };
    }
    const result = await this.db.run(STAMP_SQL.heartbeat, [attemptId, deploymentId, this.observedAt(producedAt)]);
    if (result.affected === 1) return { ...base, reason: 'stamped' };
    await this.requireExists(deploymentId, attemptId);
    return { ...base, reason: 'not_running' };
  }

  async readiness(event: Extract<LifecycleEvent, { name: 'deployment.readiness' }>, producedAt: Date | undefined): Promise<ApplyResult> {
    const { deploymentId } = event.data;
    const observed = event.data.observedAt === undefined ? producedAt : new Date(event.data.observedAt);
    const base = { eventId: event.eventId, deploymentId, outcome: 'noop' } as const;
    if (this.buffer !== null) {
      await this.buffer.absorbReadiness(deploymentId, this.observedAt(observed));
      return { ...base, reason: 'buffered' };
    }
    const result = await this.db.run(STAMP_SQL.readiness, [deploymentId, this.observedAt(observed)]);
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
