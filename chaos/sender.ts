/**
 * The producer side of the workload: sends every event it intends (and records it), sends some again, and keeps
 * retrying through outages until the run is aborted. Work that may go on in the background is tracked, so that the
 * drain can wait for it.
 */
import { jobIdFor, type LifecycleProducer } from '../src/queues/producer';
import { sleep } from '../src/util';
import { CHAOS_ORPHAN_AFTER_S } from './fleet';
import type { Expectation, PlannedEvent, Random } from './workload';

/** Thrown into the workload when the drain times out. */
export class Aborted extends Error {}

/** An event the generator intends, by eventId: what it is and what must become of it. */
export interface Tracked {
  readonly name: string;
  readonly data: PlannedEvent['data'];
  readonly expect: Expectation;
  readonly replayable: boolean;
}

/**
 * The workload declares its orphans itself. A worker applies an orphan only if the attempt has shown no sign of
 * life since the declaration's time minus the threshold (the job's timestamp), so the workload dates its
 * declarations a threshold ahead: "this runner has been silent for a day". Other events keep the real time.
 */
export function declaredAt(name: string): { timestamp?: number } {
  return name === 'attempt.orphaned' ? { timestamp: Date.now() + (CHAOS_ORPHAN_AFTER_S + 60) * 1000 } : {};
}

export class Sender {
  /** every distinct event intended so far, by eventId */
  readonly sent = new Map<string, Tracked>();
  /** eventId -> when the producer's enqueue first returned (the event was acknowledged) */
  readonly acked = new Map<string, number>();
  readonly counters = { resent: 0, redelivered: 0, replayed: 0 };
  private readonly background = new Set<Promise<void>>();
  private abortedFlag = false;

  /** intended events sent through each producer, in the order of `producers` */
  readonly sentBy: number[];

  /**
   * `producers`: the first is the current release's; a mixed-version run adds the previous one's, and each event
   * goes through one of them, always the same for an eventId (a resend comes from the producer that sent it).
   */
  constructor(
    private readonly producers: readonly LifecycleProducer[],
    private readonly timing: Random,
  ) {
    if (producers.length === 0) throw new Error('Sender: no producer');
    this.sentBy = producers.map(() => 0);
  }

  /** The producer of an eventId (a stable choice by its characters). */
  private producerIndex(eventId: string): number {
    let h = 0;
    for (let i = 0; i < eventId.length; i++) h = (h * 31 + eventId.charCodeAt(i)) >>> 0;
    return h % this.producers.length;
  }

  private producerOf(eventId: string): LifecycleProducer {
    const producer = this.producers[this.producerIndex(eventId)];
    if (producer === undefined) throw new Error('Sender: no producer');
    return producer;
  }

  get aborted(): boolean {
    return this.abortedFlag;
  }

  /** From now on every retry gives up with Aborted. */
  abort(): void {
    this.abortedFlag = true;
  }

  /** Runs `what` until it succeeds (a ValidationError is thrown at once), pausing 200-500 ms between tries. */
  async retrying(what: () => Promise<unknown>): Promise<void> {
    for (;;) {
      if (this.abortedFlag) throw new Aborted();
      try {
        await what();
        return;
      } catch (err) {
        if (err instanceof Error && err.name === 'ValidationError') throw err;
        await sleep(200 + this.timing.int(0, 300));
      }
    }
  }

  /** Runs `task` without waiting for it; its failure is ignored. */
  inBackground(task: () => Promise<void>): void {
    const p = task().catch(() => undefined);
    this.background.add(p);
    void p.finally(() => this.background.delete(p));
  }

  /** Waits until no background task is left, or the run is aborted. */
  async settleBackground(): Promise<void> {
    while (this.background.size > 0 && !this.abortedFlag) await Promise.race([...this.background]);
  }

  /** Records `event` as intended and enqueues it (its jobId derived from its eventId). */
  async sendIntended(event: Tracked): Promise<void> {
    const producer = this.producerOf(event.data.eventId);
    if (!this.sent.has(event.data.eventId)) {
      const index = this.producerIndex(event.data.eventId);
      this.sentBy[index] = (this.sentBy[index] ?? 0) + 1;
    }
    this.sent.set(event.data.eventId, event);
    await this.retrying(() => producer.enqueue(event.name, event.data, declaredAt(event.name)));
    if (!this.acked.has(event.data.eventId)) this.acked.set(event.data.eventId, Date.now());
  }

  /** Enqueues an event again with its own eventId and jobId (dated as `declaredAt` says when `dated`). */
  async resend(event: Tracked, dated: boolean): Promise<void> {
    const producer = this.producerOf(event.data.eventId);
    await this.retrying(() => (dated ? producer.enqueue(event.name, event.data, declaredAt(event.name)) : producer.enqueue(event.name, event.data)));
    this.counters.resent++;
  }

  /** The same eventId under a new jobId: a redelivery the queue cannot deduplicate. */
  async redeliver(event: Tracked, n: number | string): Promise<string> {
    const jobId = `${jobIdFor(event.data.eventId)}.redelivery${n}`;
    const producer = this.producerOf(event.data.eventId);
    await this.retrying(() => producer.queue.add(event.name, event.data, { jobId, ...declaredAt(event.name) }));
    this.counters.redelivered++;
    return jobId;
  }

  /** An earlier event under a new eventId: an out-of-order replay, intended like any other. */
  async replay(event: Tracked, eventId: string): Promise<void> {
    await this.sendIntended({ ...event, data: { ...event.data, eventId } });
    this.counters.replayed++;
  }
}
