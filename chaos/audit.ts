/**
 * The audit consumer: records every transition stream entry (duplicates included) as a consumer sees it, so that the
 * stream check at the end covers entries that a fault trimmed away after the audit had read them. It is a group of
 * one, so it owns every partition. When it stops (a wiped Redis loses its group; a failover loses entries it had
 * read) it is started again from 0 in a new group.
 */
import { ResyncRequiredError } from '../src/errors';
import { createRedis } from '../src/redis/connection';
import { compareIds, streamCounts, TransitionConsumer, type TransitionEntry, type VersionStore } from '../src/streams/consumer';
import { partitionKeys, partitionOf } from '../src/streams/partitions';
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
  /** per partition, the highest stream id read */
  private readonly highest = new Map<number, string>();

  constructor(
    private readonly redisUrl: string,
    private readonly streamKey: string,
    /** the stream's partitions, as the fleet is configured */
    private readonly partitions: number,
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
      handler: (entry) => this.record(entry),
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
        await this.prepareGroup().catch(() => undefined); // else the consumer makes them, from 0
        if (!this.stopped) this.start();
      },
    );
  }

  private record(entry: TransitionEntry): void {
    this.entries.push(entry);
    const n = partitionOf(entry.deploymentId, this.partitions);
    const top = this.highest.get(n);
    if (top === undefined || compareIds(entry.streamId, top) > 0) this.highest.set(n, entry.streamId);
  }

  private get group(): string {
    return `chaos-audit-${this.restarts}`;
  }

  /**
   * Creates the next group on every partition at the start of what it still holds, counting what was trimmed before
   * it as read (ENTRIESREAD): a group made at 0 on a trimmed stream has "missed" those entries and would stop at once.
   * (A partition that does not exist yet, e.g. after a wipe, is left to the consumer, which makes the group at 0.)
   */
  private async prepareGroup(): Promise<void> {
    const redis = createRedis(this.redisUrl, 'producer', 'lifecycle-fleet-chaos-audit');
    try {
      for (const key of partitionKeys(this.streamKey, this.partitions)) {
        try {
          const { added, length } = await streamCounts(redis, key);
          await redis.xgroup('CREATE', key, this.group, '0', 'ENTRIESREAD', Math.max(0, added - length));
        } catch {
          // no such stream yet: the consumer makes the group, from 0
        }
      }
    } finally {
      redis.disconnect();
    }
  }

  /** Whether the audit has read up to stream id `id` of partition `partition`. */
  reached(partition: number, id: string): boolean {
    const top = this.highest.get(partition);
    return top !== undefined && compareIds(top, id) >= 0;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.consumer?.close();
  }
}
