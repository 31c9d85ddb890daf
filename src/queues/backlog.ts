/**
 * What waits in a BullMQ queue for a worker, and whether a worker may take it now: the lifecycle worker's fetch
 * watchdog (src/workers/lifecycle-worker.ts) must not take jobs an operator or a limit holds back for a stuck fetch.
 */
import type { Queue } from 'bullmq';
import type { RedisConnection } from '../redis/connection';

/**
 * Why no worker may take a queue's waiting jobs now, by the rules of BullMQ's `moveToActive` script (its
 * `getQueueMetadata` and `getRateLimitTTL`): the queue is paused (Bull Board's pause, `Queue.pause`), at its global
 * concurrency (`Queue.setGlobalConcurrency`: that many jobs active), or at its global rate limit
 * (`Queue.setGlobalRateLimit`: that many jobs started in the window).
 */
export type BacklogHeld = 'paused' | 'at_concurrency' | 'rate_limited';

export interface QueueBacklog {
  /** jobs in the wait and prioritized lists (a paused queue's jobs included: BullMQ 6 keeps them in `wait`) */
  readonly waiting: number;
  /** why no worker may take them now; null: a worker with a free slot takes one at once */
  readonly held: BacklogHeld | null;
}

/**
 * Reads a queue's backlog on `redis` in one MULTI (its keys share a slot: `requireSlotPrefix`): the counts and the
 * pause, concurrency and rate-limit state come from one moment, so a resume between two reads cannot pass a paused
 * queue's jobs off as free ones. (`Queue.getWaitingCount` counts a paused queue's jobs as waiting, and `isPaused`
 * would be a second read.)
 */
export async function readBacklog(redis: RedisConnection, queue: Pick<Queue, 'name' | 'toKey'>): Promise<QueueBacklog> {
  const key = queue.toKey;
  const replies = await redis
    .multi()
    .hmget(key('meta'), 'paused', 'concurrency', 'max')
    .llen(key('wait'))
    .zcard(key('prioritized'))
    .llen(key('active'))
    .get(key('limiter'))
    .pttl(key('limiter'))
    .exec();
  if (replies === null) throw new Error(`the backlog of queue ${queue.name} was not read (its transaction was discarded)`);
  for (const [err] of replies) if (err !== null) throw err;
  const [meta, wait, prioritized, active, limited, limitTtlMs] = replies.map(([, value]) => value) as [
    Array<string | null>,
    number,
    number,
    number,
    string | null,
    number,
  ];
  const [paused, concurrency, max] = meta;
  let held: BacklogHeld | null = null;
  if (paused != null) held = 'paused';
  else if (concurrency != null && active >= Number(concurrency)) held = 'at_concurrency';
  else if (max != null && Number(limited ?? 0) >= Number(max) && limitTtlMs > 0) held = 'rate_limited';
  return { waiting: wait + prioritized, held };
}
