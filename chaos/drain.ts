/**
 * After the fault window: wait until every script finished, the queue is idle and the outbox is published, or give
 * up at the drain deadline (then every waiting script and retry is aborted).
 */
import { sleep } from '../src/util';
import type { Barriers } from './barriers';
import type { Fleet } from './fleet';
import type { ScriptPlayer } from './scripts';
import type { Sender } from './sender';

export interface DrainParts {
  readonly fleet: Fleet;
  readonly sender: Sender;
  readonly barriers: Barriers;
  readonly scripts: ScriptPlayer;
  /** the scripts' promises */
  readonly scriptRuns: ReadonlyArray<Promise<void>>;
  readonly scriptCount: number;
}

/** Whether nothing is left to do: no job waiting, active or delayed, and no unpublished outbox row. */
async function idle(fleet: Fleet): Promise<boolean> {
  const counts = await fleet.producer.queue.getJobCounts('waiting', 'active', 'delayed', 'prioritized', 'waiting-children');
  const busy = Object.values(counts).reduce((a, b) => a + b, 0);
  const { rows } = await fleet.pool.query<{ n: string }>(`SELECT count(*) AS n FROM outbox WHERE published_at IS NULL`);
  return busy === 0 && Number(rows[0]?.n) === 0;
}

/** Drains within `timeoutS`; returns when it was drained (ms since the epoch), or null when it timed out. */
export async function drain(parts: DrainParts, timeoutS: number, log: (line: string) => void): Promise<number | null> {
  const { fleet, sender, barriers, scripts } = parts;
  // the deadline aborts the workload: the scripts and the background sends end, and the loop below gives up
  const abortAt = setTimeout(() => {
    sender.abort();
    barriers.abort();
  }, timeoutS * 1000);
  const progress = setInterval(() => log(`draining: ${scripts.finished}/${parts.scriptCount} scripts done, ${sender.sent.size} events`), 10_000);
  try {
    await Promise.all(parts.scriptRuns);
    await sender.settleBackground();
    while (!sender.aborted) {
      try {
        if (await idle(fleet)) return Date.now();
      } catch {
        // a service is still coming back
      }
      await sleep(250);
    }
    return null;
  } finally {
    clearTimeout(abortAt);
    clearInterval(progress);
  }
}
