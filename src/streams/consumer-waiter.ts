/**
 * How the workers of a `TransitionConsumer` wait for new entries (docs/architecture.md, "The stream consumer"): a
 * worker whose partition has nothing new registers as idle, and one loop waits for entries on every idle partition at
 * once, on a connection of its own, and wakes the workers of those that got some. A blocking wait never holds up the
 * lease renewals on the main connection.
 */
import type { RedisConnection } from '../redis/connection';
import type { Logger } from '../log';
import { isCluster } from '../redis/connection';
import type { ConsumerContext, TransitionConsumerOptions } from './consumer-options';
import type { Owned, Session } from './consumer-ownership';

/** The idle partitions of one consumer, and the loop that waits for their new entries. */
export class NewEntryWaiter {
  private readonly redis: RedisConnection;
  private readonly options: TransitionConsumerOptions;
  private readonly log: Logger;
  /** the connection that waits for new entries (a blocking read), so that renewals never queue behind it */
  private waiterRedis: RedisConnection | null = null;
  /** partitions whose worker waits for new entries: their position, and how to wake the worker */
  private readonly idle = new Map<number, { key: string; position: string; wake: () => void }>();
  private wakeWaiter: (() => void) | null = null;

  constructor(private readonly consumer: ConsumerContext) {
    ({ redis: this.redis, options: this.options, log: this.log } = consumer);
  }

  private get stopped(): boolean {
    return this.consumer.isStopped();
  }

  /** Waits (at most `blockMs`) for an entry after the partition's position, or to be woken (released, lost, closed). */
  waitForNew(o: Owned): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(wake, this.options.blockMs ?? 2000);
      const idle = this.idle;
      function wake(): void {
        clearTimeout(timer);
        if (idle.get(o.n)?.wake === wake) idle.delete(o.n);
        resolve();
      }
      this.idle.set(o.n, { key: o.key, position: o.position, wake });
      this.wakeWaiter?.();
    });
  }

  /**
   * Waits for new entries on every partition whose worker is idle, on a connection of its own (a plain XREAD, which
   * moves nothing), and wakes the workers of those that got some. One partition, or one server: one blocking XREAD
   * over them all; a partition that turns idle meanwhile is included in the next (within 100 ms). On a Redis Cluster
   * with several partitions (their keys in different slots, which one XREAD cannot span) it polls every 100 ms.
   */
  async waitLoop(session: Session): Promise<void> {
    const blockMs = this.options.blockMs ?? 2000;
    const poll = isCluster(this.redis) && session.partitions > 1;
    while (!this.stopped && session.failure === null) {
      if (this.idle.size === 0) {
        await new Promise<void>((resolve) => (this.wakeWaiter = resolve));
        this.wakeWaiter = null;
        continue;
      }
      const waiting = [...this.idle];
      if (poll) {
        await this.consumer.pause(100);
        for (const [, w] of waiting) w.wake();
        continue;
      }
      if (this.waiterRedis === null) {
        this.waiterRedis = this.redis.duplicate();
        // its outages are the main connection's, which its watch reports once: never "Unhandled error event"
        this.waiterRedis.on('error', () => undefined);
      }
      try {
        const block = session.partitions === 1 ? blockMs : Math.min(blockMs, 100);
        const reply = (await this.waiterRedis.call(
          'XREAD',
          'COUNT',
          '1',
          'BLOCK',
          String(block),
          'STREAMS',
          ...waiting.map(([, w]) => w.key),
          ...waiting.map(([, w]) => w.position),
        )) as Array<[string, unknown]> | null;
        const ready = new Set((reply ?? []).map(([key]) => key));
        for (const [, w] of waiting) if (ready.has(w.key)) w.wake();
      } catch (err) {
        if (this.stopped || session.failure !== null) return;
        // the wait is only a hint: the workers read on their own after blockMs
        this.log.debug({ reason: err instanceof Error ? err.message : String(err) }, 'waiting for new entries failed');
        await this.consumer.pause(250);
      }
    }
  }

  /** Wakes the worker of partition n if it waits for new entries. */
  wake(n: number): void {
    this.idle.get(n)?.wake();
  }

  /** Wakes the loop and every waiting worker (the run ends, or the consumer closes). */
  wakeAll(): void {
    this.wakeWaiter?.();
    for (const w of [...this.idle.values()]) w.wake();
  }

  /** Drops the waiting connection (close(): a wait in flight ends at once). */
  disconnect(): void {
    this.waiterRedis?.disconnect();
  }

  /** Drops the waiting connection for good (the run is over): a next run opens another. */
  end(): void {
    this.waiterRedis?.disconnect();
    this.waiterRedis = null;
  }
}
