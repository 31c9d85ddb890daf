/**
 * The audit consumer: records every transition stream entry (duplicates included) as a consumer sees it, so that the
 * stream check at the end covers entries that a fault trimmed away after the audit had read them. When it stops
 * (a wiped Redis loses its group; a failover loses entries it had read) it is started again from 0 in a new group.
 */
import { compareIds, TransitionConsumer, type TransitionEntry, type VersionStore } from '../src/streams/consumer';
import { sleep } from '../src/util';

/** A version store that forgets: every entry reaches the handler. */
export const KEEP_ALL: VersionStore = { get: () => undefined, set: () => undefined };

export class AuditConsumer {
  readonly entries: TransitionEntry[] = [];
  /** times the consumer stopped and was started again */
  restarts = 0;
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
      group: `chaos-audit-${this.restarts}`,
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
        this.log(`audit consumer stopped (${err instanceof Error ? err.message.slice(0, 120) : String(err)}); starting it again from 0`);
        await sleep(500);
        if (!this.stopped) this.start();
      },
    );
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
