import type { Worker } from 'bullmq';
import { settleWithin } from '../util';

/**
 * BullMQ's `worker.close()` waits for active jobs with no time limit of its own. This waits at most `graceMs`
 * and says whether the worker closed in time; past that the caller stops waiting and closes its connections, and
 * the jobs' locks expire so that another worker runs them again.
 */
export async function closeWithin(worker: Worker, graceMs: number): Promise<'closed' | 'timeout'> {
  return (await settleWithin(worker.close(), graceMs)) === 'done' ? 'closed' : 'timeout';
}
