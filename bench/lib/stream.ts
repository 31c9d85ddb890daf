/**
 * Watches the transition stream the way a consumer does (blocking XREAD on a connection of its own, over every
 * partition) and records when each entry became visible, by eventId.
 */
import IORedis from 'ioredis';
import { now } from './common';

/** Wall-clock milestones of one entry, in performance.now() time: the decision (`at` field) and the XADD (its id). */
export interface EntryStages {
  readonly decidedAt: number;
  readonly appendedAt: number;
}

export class StreamWatcher {
  /** eventId -> performance.now() when the entry was read */
  readonly arrivals = new Map<string, number>();
  /** eventId -> when the service decided the transition and when the relay appended it (ms precision) */
  readonly stages = new Map<string, EntryStages>();
  /** eventIds the caller waits for: entries of other events (a relay republishing older rows) are not counted */
  private readonly expected = new Set<string>();
  private matched = 0;
  private readonly redis: IORedis;
  private stopped = false;
  private loop: Promise<void> | null = null;
  private waiters: Array<{ count: number; resolve: () => void }> = [];
  private lastArrival = 0;
  private failure: Error | null = null;

  constructor(
    redisUrl: string,
    private readonly keys: readonly string[],
  ) {
    this.redis = new IORedis(redisUrl, { maxRetriesPerRequest: null, connectionName: 'bench-stream-watcher' });
  }

  /** expected events that have arrived */
  get count(): number {
    return this.matched;
  }

  /** Counts `eventId` towards `waitFor` (whether its entry has arrived already or arrives later). */
  expect(eventId: string): void {
    if (this.expected.has(eventId)) return;
    this.expected.add(eventId);
    if (this.arrivals.has(eventId)) this.matched++;
  }

  /** performance.now() of the latest arrival */
  get lastArrivalAt(): number {
    return this.lastArrival;
  }

  start(): void {
    this.loop ??= this.run();
  }

  private async run(): Promise<void> {
    const lastIds = new Map(this.keys.map((key) => [key, '0-0']));
    try {
      while (!this.stopped) {
        const reply = (await this.redis.call(
          'XREAD',
          'COUNT',
          '10000',
          'BLOCK',
          '200',
          'STREAMS',
          ...this.keys,
          ...this.keys.map((k) => lastIds.get(k) ?? '0-0'),
        )) as Array<[string, Array<[string, string[]]>]> | null;
        if (reply === null) continue;
        const at = now();
        for (const [key, entries] of reply) {
          for (const [id, fields] of entries) {
            lastIds.set(key, id);
            const i = fields.indexOf('eventId');
            const eventId = i >= 0 ? fields[i + 1] : undefined;
            if (eventId !== undefined && !this.arrivals.has(eventId)) {
              this.arrivals.set(eventId, at);
              const j = fields.indexOf('at');
              const decided = j >= 0 ? Date.parse(fields[j + 1] ?? '') : Number.NaN;
              this.stages.set(eventId, {
                decidedAt: decided - performance.timeOrigin,
                appendedAt: Number(id.split('-')[0]) - performance.timeOrigin,
              });
              if (this.expected.has(eventId)) this.matched++;
            }
          }
        }
        this.lastArrival = at;
        this.notify();
      }
    } catch (err) {
      if (!this.stopped) {
        this.failure = err instanceof Error ? err : new Error(String(err));
        this.notify();
      }
    }
  }

  private notify(): void {
    const ready = this.waiters.filter((w) => this.matched >= w.count || this.failure !== null);
    this.waiters = this.waiters.filter((w) => !ready.includes(w));
    for (const w of ready) w.resolve();
  }

  /** Resolves once `count` distinct expected events have arrived. */
  async waitFor(count: number): Promise<void> {
    if (this.matched < count) await new Promise<void>((resolve) => this.waiters.push({ count, resolve }));
    if (this.failure !== null) throw this.failure;
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.redis.disconnect();
    await this.loop;
  }
}
