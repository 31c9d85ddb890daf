import type { Worker } from 'bullmq';

/**
 * BullMQ's `worker.close()` waits for active jobs with no time limit of its own. This waits at most `graceMs`
 * and says whether the worker closed in time; past that the caller stops waiting and closes its connections, and
 * the jobs' locks expire so that another worker runs them again.
 */
export async function closeWithin(worker: Worker, graceMs: number): Promise<'closed' | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), graceMs);
  });
  try {
    return await Promise.race([worker.close().then(() => 'closed' as const), timedOut]);
  } finally {
    clearTimeout(timer);
  }
}
