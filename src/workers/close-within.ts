import type { Worker } from 'bullmq';
import { settleWithin } from '../util';

/**
 * BullMQ's `worker.close()` waits for active jobs with no time limit of its own. This waits at most `graceMs`
 * and says whether the worker closed in time; past that the caller stops waiting and closes its connections, and
 * the jobs' locks expire so that another worker runs them again. `force` does not wait for active jobs at all (for
 * a Redis that is away: nothing in flight could be acknowledged anyway).
 */
export async function closeWithin(worker: Worker, graceMs: number, force = false): Promise<'closed' | 'timeout'> {
  return (await settleWithin(worker.close(force), graceMs)) === 'done' ? 'closed' : 'timeout';
}
