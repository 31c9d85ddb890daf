/**
 * The audit consumer: records every transition stream entry (duplicates included) as a consumer sees it, so that the
 * stream check at the end covers entries that a fault trimmed away after the audit had read them. When it stops
 * (a wiped Redis loses its group; a failover loses entries it had read) it is started again from 0 in a new group.
 */
import { ResyncRequiredError } from '../src/errors';
import { createRedis } from '../src/queues/redis';
import { compareIds, streamCounts, TransitionConsumer, type TransitionEntry, type VersionStore } from '../src/streams/consumer';
import { sleep } from '../src/util';

/** A version store that forgets: every entry reaches the handler. */
export const KEEP_ALL: VersionStore = { get: () => undefined, set: () => undefined };

export class AuditConsumer {
  readonly entries: TransitionEntry[] = [];
  /** times the consumer stopped and was started again */
  restarts = 0;
  /**
   * why it stopped: `resync` (its position is gone: entries it had read were lost in a failover or trimmed, or Redis
   * lost its data and the stream or group with it), `other` (anything else, e.g. a Redis outage the consumer should
   * have waited out)
   */
  readonly stops = { resync: 0, other: 0 };
  private consumer: TransitionConsumer | null = null;
  private stopped = false;

  constructor(
    private readonly redisUrl: string,
    private readonly streamKey: string,
    private readonly log: (line: string) => void,
  ) {}

  start(): void {
    const consumer = new TransitionConsumer({
      redis: this.redisUrl,
      streamKey: this.streamKey,
      // a group of its own per start: one that stopped for a hole (entries it read lost in a failover) would
      // report the same hole again; the audit reads everything again instead (it records duplicates anyway)
      group: this.group,
      consumer: 'audit',
      startId: '0',
      batchSize: 500,
      blockMs: 200,
      versions: KEEP_ALL,
      handler: (entry) => void this.entries.push(entry),
    });
    this.consumer = consumer;
    consumer.run().then(
      () => undefined,
      async (err: unknown) => {
        await consumer.close();
        if (this.stopped) return;
        this.restarts++;
        const why = err instanceof ResyncRequiredError ? 'resync' : 'other';
        this.stops[why]++;
        this.log(`audit consumer stopped (${err instanceof Error ? err.message.slice(0, 120) : String(err)}); starting it again from 0`);
        await sleep(500);
        if (this.stopped) return;
        await this.prepareGroup().catch(() => undefined); // else the consumer makes it, from 0
        if (!this.stopped) this.start();
      },
    );
  }

  private get group(): string {
    return `chaos-audit-${this.restarts}`;
  }

  /**
   * Creates the next group at the start of what the stream still holds, counting what was trimmed before it as read
   * (ENTRIESREAD): a group made at 0 on a trimmed stream has "missed" those entries and would stop at once.
   */
  private async prepareGroup(): Promise<void> {
    const redis = createRedis(this.redisUrl, 'producer', 'lifecycle-fleet-chaos-audit');
    try {
      const { added, length } = await streamCounts(redis, this.streamKey);
      const removed = added - length;
      await redis.xgroup('CREATE', this.streamKey, this.group, '0', 'ENTRIESREAD', Math.max(0, removed));
    } finally {
      redis.disconnect();
    }
  }

  /** Whether the audit has read up to stream id `id`. */
  reached(id: string): boolean {
    const last = this.entries[this.entries.length - 1];
    return last !== undefined && compareIds(last.streamId, id) >= 0;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.consumer?.close();
  }
}
