/**
 * Group commit's front (docs/architecture.md, "Group commit"): the events of a worker's concurrently running jobs
 * queue here and go to `TransitionService.applyMany` in batches. A batch forms only from what is already waiting:
 * when no batch is being written, whatever waits (up to `maxBatch` events) goes at once, so an event that arrives
 * alone, at low load, goes alone and at once, on the one-event path. Under load, events arrive while a batch is
 * written and the next batch takes them all; a second batch (up to `maxBatches`) goes alongside only when a full
 * one waits.
 *
 * A deployment has events in at most one batch being written: its later events wait for that batch (they would
 * only lose its version check), which also keeps one deployment's events in the order they arrived.
 */
import { canonicalId, STAMP_EVENTS } from '../../events/schemas';
import type { ApplyOptions } from './options';
import type { TransitionService } from './service';
import type { ApplyResult } from './outcomes';

export interface CoalescerOptions {
  /** most events in one batch (default 32; 1 turns group commit off: every event on its own) */
  readonly maxBatch?: number;
  /** batches written at once, the second and later ones only when a full batch waits (default 2) */
  readonly maxBatches?: number;
}

interface Waiting {
  readonly name: string;
  readonly data: unknown;
  readonly options: ApplyOptions;
  /**
   * as the payload says, in its canonical spelling (validated later, in the service): only for keeping a deployment
   * in one batch at a time, whatever the casing each of its events spells it in
   */
  readonly deploymentId: string | null;
  readonly resolve: (result: ApplyResult) => void;
  readonly reject: (err: unknown) => void;
}

export class TransitionCoalescer {
  readonly maxBatch: number;
  readonly maxBatches: number;
  private readonly queue: Waiting[] = [];
  private writing = 0;
  /** deployments with events in a batch being written, and how many such batches */
  private readonly busy = new Map<string, number>();
  /** batch sizes so far (for tests and the bench's report) */
  readonly sizes = new Map<number, number>();

  constructor(
    private readonly service: TransitionService,
    options: CoalescerOptions = {},
  ) {
    this.maxBatch = Math.max(1, options.maxBatch ?? 32);
    this.maxBatches = Math.max(1, options.maxBatches ?? 2);
  }

  /** Events and batches so far (events that went alone count as batches of one). */
  totals(): { events: number; batches: number } {
    let events = 0;
    let batches = 0;
    for (const [size, n] of this.sizes) {
      events += size * n;
      batches += n;
    }
    return { events, batches };
  }

  /** Applies one event, with whatever else is waiting; the outcome is this event's own, as `service.apply` gives it. */
  apply(name: string, data: unknown, options: ApplyOptions = {}): Promise<ApplyResult> {
    if (this.maxBatch === 1 || STAMP_EVENTS.has(name)) return this.service.apply(name, data, options);
    return new Promise<ApplyResult>((resolve, reject) => {
      this.queue.push({ name, data, options, deploymentId: deploymentIdOf(data), resolve, reject });
      this.pump();
    });
  }

  private pump(): void {
    // one batch at a time makes the largest batches (the cheapest per event); a second one starts only when a full
    // batch waits, so that a slow batch (a lock wait, a redo after a lost version check) holds up no more than that
    while (this.queue.length > 0 && (this.writing === 0 || (this.writing < this.maxBatches && this.queue.length >= this.maxBatch))) {
      const batch = this.take();
      if (batch.length === 0) return;
      this.writing++;
      for (const w of batch) if (w.deploymentId !== null) this.busy.set(w.deploymentId, (this.busy.get(w.deploymentId) ?? 0) + 1);
      this.sizes.set(batch.length, (this.sizes.get(batch.length) ?? 0) + 1);
      void this.write(batch);
    }
  }

  /** Up to maxBatch waiting events, in arrival order, leaving those of deployments in a batch being written. */
  private take(): Waiting[] {
    const batch: Waiting[] = [];
    const kept: Waiting[] = [];
    for (const w of this.queue) {
      if (batch.length < this.maxBatch && (w.deploymentId === null || !this.busy.has(w.deploymentId))) batch.push(w);
      else kept.push(w);
    }
    this.queue.splice(0, this.queue.length, ...kept);
    return batch;
  }

  private async write(batch: readonly Waiting[]): Promise<void> {
    let results: Array<PromiseSettledResult<ApplyResult>> | null = null;
    let failure: unknown = null;
    try {
      results = await this.service.applyMany(batch.map((w) => ({ name: w.name, data: w.data, options: w.options })));
    } catch (err) {
      failure = err;
    }
    // the books first, then the outcomes: a job that gets its outcome and sends its next event at once finds no
    // batch being written, and its event goes at once
    this.writing--;
    for (const w of batch) {
      if (w.deploymentId === null) continue;
      const n = (this.busy.get(w.deploymentId) ?? 1) - 1;
      if (n === 0) this.busy.delete(w.deploymentId);
      else this.busy.set(w.deploymentId, n);
    }
    batch.forEach((w, i) => {
      const r = results?.[i];
      if (r === undefined) w.reject(failure ?? new Error('applyMany returned fewer results than events'));
      else if (r.status === 'fulfilled') w.resolve(r.value);
      else w.reject(r.reason);
    });
    this.pump();
  }
}

function deploymentIdOf(data: unknown): string | null {
  if (typeof data !== 'object' || data === null) return null;
  const id = (data as { deploymentId?: unknown }).deploymentId;
  return typeof id === 'string' ? canonicalId(id) : null;
}
