/**
 * Heartbeat and readiness stamps: observations that change no state, so they bypass the machine and the version
 * check. With a stamp buffer, each is absorbed in Redis (one command, no PostgreSQL: the noop `buffered`) and the
 * buffer's flush writes them in batches and decides `not_running` / `not_ready` / `not_found` there. Without one,
 * each is one monotonic UPDATE; when it stamps nothing, a lookup tells "not there yet" (a retryable NotYetError) from
 * "there, but not running / not ready" (a noop).
 *
 * Whose time a stamp records (docs/contract.md, "Times"): a heartbeat's is the fleet clock when the worker processes
 * it, never the producer's (a producer host whose clock runs minutes behind would otherwise make a live attempt look
 * orphaned). A readiness stamp with an explicit `observedAt` keeps it, capped at the fleet clock (a producer clock
 * behind only makes the stamp older, the safe direction for dispatch); without one, the processing time.
 */
import { NotYetError } from '../../errors';
import { STAMP_SQL, type Database } from '../../entities/sql';
import type { LifecycleEvent } from '../../events/schemas';
import type { StampBuffer } from '../stamps';
import type { ApplyResult } from './outcomes';

export class Stamps {
  constructor(
    private readonly db: Database,
    private readonly now: () => Date,
    private readonly buffer: StampBuffer | null = null,
  ) {}

  async heartbeat(event: Extract<LifecycleEvent, { name: 'attempt.heartbeat' }>): Promise<ApplyResult> {
    const { deploymentId, attemptId } = event.data;
    const base = { eventId: event.eventId, deploymentId, outcome: 'noop' } as const;
    // the fleet clock now, not the job's timestamp (the producer's clock)
    const at = this.now();
    if (this.buffer !== null) {
      await this.buffer.absorbHeartbeat(attemptId, deploymentId, at);
      return { ...base, reason: 'buffered' };
    }
    const result = await this.db.run(STAMP_SQL.heartbeat, [attemptId, deploymentId, at]);
    if (result.affected === 1) return { ...base, reason: 'stamped' };
    await this.requireExists(deploymentId, attemptId);
    return { ...base, reason: 'not_running' };
  }

  async readiness(event: Extract<LifecycleEvent, { name: 'deployment.readiness' }>): Promise<ApplyResult> {
    const { deploymentId } = event.data;
    const at = this.observedAt(event.data.observedAt === undefined ? undefined : new Date(event.data.observedAt));
    const base = { eventId: event.eventId, deploymentId, outcome: 'noop' } as const;
    if (this.buffer !== null) {
      await this.buffer.absorbReadiness(deploymentId, at);
      return { ...base, reason: 'buffered' };
    }
    const result = await this.db.run(STAMP_SQL.readiness, [deploymentId, at]);
    if (result.affected === 1) return { ...base, reason: 'stamped' };
    await this.requireExists(deploymentId, null);
    return { ...base, reason: 'not_ready' };
  }

  /** A readiness observation's time: the producer's `observedAt`, never in the future of the fleet clock; else now. */
  private observedAt(observed: Date | undefined): Date {
    const now = this.now();
    return observed === undefined || observed.getTime() > now.getTime() ? now : observed;
  }

  private async requireExists(deploymentId: string, attemptId: string | null): Promise<void> {
    const row = (await this.db.run(STAMP_SQL.exists, [deploymentId, attemptId])).rows[0];
    if (row?.d == null) throw new NotYetError('deployment_not_found', deploymentId);
    if (attemptId !== null && row.a == null) throw new NotYetError('attempt_not_found', deploymentId, attemptId);
  }
}
