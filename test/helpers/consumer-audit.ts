/**
 * What the handlers of one consumer group saw, for the tests of the stream's guarantee (docs/contract.md, "The
 * transition stream"): every handler call and every change of partition ownership, in the order this process saw
 * them, and the checks of that guarantee over them.
 */
import { expect } from 'chai';
import type { TransitionConsumerOptions, TransitionEntry } from '../../src/streams/consumer';
import { partitionOf } from '../../src/streams/partitions';
import { sleep } from '../../src/util';

type Change = Parameters<NonNullable<TransitionConsumerOptions['onPartitionChange']>>[0]['change'];

export type AuditEvent =
  | {
      readonly kind: 'call';
      readonly consumer: string;
      readonly partition: number;
      readonly entry: TransitionEntry;
      /** the call returned (undefined while it runs; false: it threw) */
      ok?: boolean;
    }
  | { readonly kind: Change; readonly consumer: string; readonly partition: number };

export class ConsumerAudit {
  /** every handler call (logged when it starts) and every ownership change, in the order this process saw them */
  readonly log: AuditEvent[] = [];
  /** successful calls per consumer */
  readonly byConsumer = new Map<string, number>();
  /** two consumers in the handler for one partition at once, or one consumer in it for two entries at once */
  readonly overlaps: string[] = [];
  /** handler calls started, failed ones included */
  calls = 0;
  private readonly inflight = new Map<number, string>();

  constructor(
    private readonly partitions: number,
    private readonly delayMs: number,
  ) {}

  /**
   * The handler of consumer `name`: `fault` runs inside the call first (throw to fail it, await to hold it), then
   * the call takes `delayMs`.
   */
  handler(name: string, fault?: (entry: TransitionEntry) => void | Promise<void>): (entry: TransitionEntry) => Promise<void> {
    return async (entry) => {
      const partition = partitionOf(entry.deploymentId, this.partitions);
      const other = this.inflight.get(partition);
      if (other !== undefined)
        this.overlaps.push(`${name} handled partition ${partition} (${entry.deploymentId}:${entry.version}) while ${other} did`);
      // and one consumer's handler is called for one entry at a time, as before partitions
      if ([...this.inflight.values()].includes(name)) this.overlaps.push(`${name} handled two entries at once`);
      this.inflight.set(partition, name);
      const call: AuditEvent = { kind: 'call', consumer: name, partition, entry };
      this.log.push(call);
      this.calls++;
      try {
        await fault?.(entry);
        await sleep(this.delayMs);
        call.ok = true;
        this.byConsumer.set(name, (this.byConsumer.get(name) ?? 0) + 1);
      } catch (err) {
        call.ok = false;
        throw err;
      } finally {
        if (this.inflight.get(partition) === name) this.inflight.delete(partition);
      }
    };
  }

  /** consumer `name`'s `onPartitionChange` */
  changes(name: string): NonNullable<TransitionConsumerOptions['onPartitionChange']> {
    return ({ partition, change }) => void this.log.push({ kind: change, consumer: name, partition });
  }

  /** where the log stands now: events after it happened later */
  mark(): number {
    return this.log.length;
  }

  /** the successful calls, in the order they started (from log position `from`) */
  handled(from = 0): Array<Extract<AuditEvent, { kind: 'call' }>> {
    return this.log.slice(from).filter((e): e is Extract<AuditEvent, { kind: 'call' }> => e.kind === 'call' && e.ok === true);
  }

  /** per deployment, the versions handed to a handler that returned, in the order the calls started */
  versionsOf(deploymentId: string): number[] {
    return this.handled()
      .filter((c) => c.entry.deploymentId === deploymentId)
      .map((c) => c.entry.version);
  }

  /** how many distinct (deployment, version) were handled */
  count(deployments: readonly string[]): number {
    return deployments.reduce((sum, d) => sum + new Set(this.versionsOf(d)).size, 0);
  }

  /**
   * Every deployment got every version 1..last, never a lower one after a higher one (strictly: each exactly once);
   * `before` holds versions handled elsewhere (a consumer process that died) before any call logged here.
   */
  expectComplete(deployments: readonly string[], last: number, strictly: boolean, before: ReadonlyMap<string, readonly number[]> = new Map()): void {
    expect(this.overlaps).to.deep.equal([]);
    for (const d of deployments) {
      const seen = [...(before.get(d) ?? []), ...this.versionsOf(d)];
      for (let i = 1; i < seen.length; i++) {
        const [prev, cur] = [seen[i - 1] ?? 0, seen[i] ?? 0];
        expect(strictly ? cur > prev : cur >= prev, `${d}: ${seen.join(',')}`).to.equal(true);
      }
      expect([...new Set(seen)], `${d}: ${seen.join(',')}`).to.deep.equal(Array.from({ length: last }, (_, i) => i + 1));
    }
  }

  /**
   * Fencing: a consumer starts a handler call for a partition's entry only while it is the partition's last
   * acquirer, i.e. never after another consumer took the partition over (it stops before its lease can expire,
   * and what it lost stays lost until it acquires it again). The violations, as text.
   */
  fenceViolations(): string[] {
    const owner = new Map<number, string>();
    const violations: string[] = [];
    for (const [i, e] of this.log.entries()) {
      if (e.kind === 'acquired') owner.set(e.partition, e.consumer);
      else if (e.kind === 'call' && owner.get(e.partition) !== e.consumer) {
        violations.push(
          `#${i}: ${e.consumer} called the handler for partition ${e.partition} (${e.entry.deploymentId}:${e.entry.version}) while ${owner.get(e.partition) ?? 'nobody'} had acquired it last`,
        );
      }
    }
    return violations;
  }
}
