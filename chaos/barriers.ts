/**
 * The workload's barriers: a script waits after each step until its deployment reached the step's state, the step's
 * events a decision is expected for are decided, and the step's expected rejections failed. One poller checks them
 * all, every 250 ms.
 */
import type { Pool } from 'pg';
import { jobIdFor, type LifecycleProducer } from '../src/queues/producer';
import { sleep } from '../src/util';
import { Aborted } from './sender';
import type { Barrier } from './workload';

interface Waiter {
  readonly barrier: Barrier;
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
}

interface DeploymentRow {
  id: string;
  state: string;
  current_attempt_id: string | null;
}

export class Barriers {
  /** rejections the barriers saw (job failed, with its reason): the job may be gone by the end (a wiped Redis) */
  readonly rejectionsSeen = new Map<string, string>();
  private readonly waiting = new Map<string, Waiter>();
  private aborted = false;
  private polling = true;
  private readonly poller: Promise<void>;

  constructor(
    private readonly pool: Pool,
    private readonly producer: LifecycleProducer,
  ) {
    this.poller = this.poll();
  }

  /** Resolves once `deploymentId` has passed `barrier`; rejects with Aborted when the run is aborted. */
  wait(deploymentId: string, barrier: Barrier): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      if (this.aborted) reject(new Aborted());
      else this.waiting.set(deploymentId, { barrier, resolve, reject });
    });
  }

  /** Rejects every waiting script, and every later wait, with Aborted. */
  abort(): void {
    this.aborted = true;
    for (const w of this.waiting.values()) w.reject(new Aborted());
    this.waiting.clear();
  }

  /** Stops the poller. */
  async stop(): Promise<void> {
    this.polling = false;
    await this.poller;
  }

  private async poll(): Promise<void> {
    while (this.polling) {
      await sleep(250);
      if (this.waiting.size === 0) continue;
      try {
        await this.check();
      } catch {
        // a service is down: poll again
      }
    }
  }

  private async check(): Promise<void> {
    const ids = [...this.waiting.entries()].filter(([, w]) => w.barrier.state !== null).map(([id]) => id);
    const rows =
      ids.length === 0
        ? []
        : (await this.pool.query<DeploymentRow>(`SELECT id, state, current_attempt_id FROM deployments WHERE id = ANY($1)`, [ids])).rows;
    const stateOf = new Map(rows.map((r) => [r.id, r]));
    const expected = [...this.waiting.values()].flatMap((w) => w.barrier.decided);
    const decided =
      expected.length === 0
        ? new Set<string>()
        : new Set(
            (await this.pool.query<{ event_id: string }>(`SELECT event_id FROM processed_events WHERE event_id = ANY($1)`, [expected])).rows.map(
              (r) => r.event_id,
            ),
          );
    for (const [id, w] of [...this.waiting]) {
      const want = w.barrier.state;
      const row = stateOf.get(id);
      if (want !== null && (row?.state !== want.state || row.current_attempt_id !== want.currentAttemptId)) continue;
      if (!w.barrier.decided.every((e) => decided.has(e))) continue;
      if (!(await this.rejectedAll(w.barrier))) continue;
      this.waiting.delete(id);
      w.resolve();
    }
  }

  /** Whether every rejection `barrier` expects has failed (each one seen is recorded). */
  private async rejectedAll(barrier: Barrier): Promise<boolean> {
    for (const r of barrier.rejected) {
      const job = await this.producer.queue.getJob(jobIdFor(r.eventId));
      if (job === undefined || typeof job.failedReason !== 'string' || job.finishedOn === undefined) return false;
      this.rejectionsSeen.set(r.eventId, job.failedReason);
    }
    return true;
  }
}
