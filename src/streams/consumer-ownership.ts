/**
 * Partition ownership for a `TransitionConsumer` (docs/architecture.md, "The stream consumer", Leases): the leases one
 * run holds, and the round (`tick`, every `leaseMs / 5`) that heartbeats the group's membership, renews every lease
 * held, and moves only what must move toward this consumer's fair share: a surplus partition given up once its worker
 * acknowledged what it read, a free one taken (and its worker started). A partition whose lease is lost, or whose
 * deadline passed, is not handled any more (`holds`). The scripts and the fair share are in ./leases.ts.
 */
import { randomUUID } from 'node:crypto';
import type { RedisConnection } from '../redis/connection';
import { isTransient } from '../errors';
import type { Logger } from '../log';
import type { ConsumerContext, TransitionConsumerOptions } from './consumer-options';
import { ACQUIRE, HEARTBEAT, RELEASE, RENEW, fairShare, leaseKey, membersKey, preferredPartitions } from './leases';
import { readPartitions } from './partitions';

/** A partition this consumer holds the lease of, while it does. */
export interface Owned {
  readonly n: number;
  readonly key: string;
  readonly leaseKey: string;
  /** this holding's lease value: another holding (this consumer's, later) has another */
  readonly token: string;
  /** monotonic ms until which it may handle the partition's entries: the lease's expiry minus the safety margin */
  deadline: number;
  /** asked to give the partition up once what it read is handled and acknowledged */
  releasing: boolean;
  /** the lease is another's or gone: stop at once */
  lost: boolean;
  /** the group's last delivered id on the partition as of the last read: where a wait for new entries starts */
  position: string;
  worker: Promise<void>;
}

/** One run of the consumer over the stream's partitions (a new one after an outage ends a run). */
export interface Session {
  readonly partitions: number;
  readonly keys: readonly string[];
  readonly owned: Map<number, Owned>;
  /** what ends the run: the first error (a resync, a non-transient error), a change of partitions, the stop */
  failure: unknown;
  /** the recorded number of partitions is no longer this run's */
  repartitioned: boolean;
  fail: (err: unknown) => void;
}

/** The leases of one consumer: taken, renewed, lost and given up. */
export class PartitionOwnership {
  private readonly redis: RedisConnection;
  private readonly options: TransitionConsumerOptions;
  private readonly log: Logger;
  private readonly leaseMs: number;
  private readonly now: () => number;
  /** this instance's lease tokens start with it: a restarted consumer of the same name holds nothing of its past */
  private readonly instance = randomUUID();
  /** wakes the renewal loop (on close, on a released partition) */
  private wakeTick: (() => void) | null = null;
  /** partitions this consumer took over (including at start) */
  acquisitions = 0;

  constructor(
    private readonly consumer: ConsumerContext,
    /** wakes partition n's worker if it waits for new entries (NewEntryWaiter) */
    private readonly waiter: { wake(n: number): void },
    /** what the round asks of its consumer: wake every wait (the partitions changed), run a partition just taken */
    private readonly run: { readonly wakeAll: () => void; readonly work: (session: Session, o: Owned) => Promise<void> },
  ) {
    ({ redis: this.redis, options: this.options, log: this.log } = consumer);
    this.leaseMs = consumer.options.leaseMs ?? 10_000;
    this.now = consumer.options.monotonicNow ?? (() => performance.now());
  }

  private get stopped(): boolean {
    return this.consumer.isStopped();
  }

  /** Heartbeats, renews, rebalances every `leaseMs / 5` until the run ends. */
  async tickLoop(session: Session): Promise<void> {
    while (!this.stopped && session.failure === null) {
      try {
        await this.tick(session);
      } catch (err) {
        if (!isTransient(err)) throw err;
        // a renewal that did not get through leaves the deadlines to pass: the workers stop on their own
        this.log.debug({ reason: err instanceof Error ? err.message : String(err) }, 'lease renewal failed; trying again');
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, this.leaseMs / 5);
        function done(): void {
          clearTimeout(timer);
          resolve();
        }
        this.wakeTick = done;
      });
      this.wakeTick = null;
    }
  }

  /**
   * One round: heartbeat (the live members), renew every lease held, then move only what must move: give up the
   * surplus over this consumer's fair share (cooperatively: its worker finishes and acknowledges what it read
   * first) or take free partitions up to it.
   */
  private async tick(session: Session): Promise<void> {
    if (this.options.beforeRenew?.() === false) return;
    const { streamKey, group, consumer } = this.options;
    const sentAt = this.now();
    // by name: every member must see the same order (the set's own order is by expiry, which each heartbeat moves)
    const recorded = await readPartitions(this.redis, streamKey);
    if (recorded !== session.partitions) {
      this.log.info({ from: session.partitions, to: recorded }, "the stream's number of partitions changed: starting over on the new partitions");
      session.repartitioned = true;
      session.failure = 'repartitioned';
      this.run.wakeAll();
      return;
    }
    const members = ((await this.redis.eval(HEARTBEAT, 1, membersKey(streamKey, group), String(this.leaseMs), consumer, '1')) as string[]).sort();
    await Promise.all(
      [...session.owned.values()].map(async (o) => {
        if (o.lost) return;
        const renewed = Number(await this.redis.eval(RENEW, 1, o.leaseKey, o.token, String(this.leaseMs)));
        if (renewed === 1) o.deadline = Math.max(o.deadline, this.deadlineFrom(sentAt));
        else this.lose(o, 'its lease was not renewed: another consumer owns the partition, or it expired');
      }),
    );
    if (session.failure !== null || this.stopped) return;
    const target = fairShare(members, consumer, session.partitions);
    const active = [...session.owned.values()].filter((o) => !o.lost && !o.releasing);
    if (active.length > target) {
      const preferred = preferredPartitions(members, consumer, session.partitions).slice(0, target);
      const surplus = active.filter((o) => !preferred.includes(o.n)).slice(0, active.length - target);
      for (const o of surplus.length > 0 ? surplus : active.slice(target)) {
        o.releasing = true;
        this.waiter.wake(o.n);
      }
      this.log.info({ release: surplus.map((o) => o.n), members: members.length }, 'giving up partitions to other consumers');
    } else if (active.length < target) {
      let held = active.length;
      for (const n of preferredPartitions(members, consumer, session.partitions)) {
        if (held >= target || this.stopped || session.failure !== null) break;
        if (session.owned.has(n)) continue;
        if (await this.acquire(session, n)) held++;
      }
    }
  }

  private deadlineFrom(sentAt: number): number {
    return sentAt + this.leaseMs - this.leaseMs / 4;
  }

  /** Takes partition n's lease if it is free (or still this instance's), and starts its worker. */
  private async acquire(session: Session, n: number): Promise<boolean> {
    const key = session.keys[n] ?? this.options.streamKey;
    const lease = leaseKey(key, this.options.group);
    const mine = `${this.options.consumer}:${this.instance}:`;
    const token = `${mine}${randomUUID().slice(0, 8)}`;
    const sentAt = this.now();
    const taken = Number(await this.redis.eval(ACQUIRE, 1, lease, token, mine, String(this.leaseMs)));
    if (taken !== 1) return false;
    const owned: Owned = {
      n,
      key,
      leaseKey: lease,
      token,
      deadline: this.deadlineFrom(sentAt),
      releasing: false,
      lost: false,
      position: '0-0',
      worker: Promise.resolve(),
    };
    session.owned.set(n, owned);
    this.acquisitions++;
    this.log.info({ partition: n, stream: key }, 'took over a partition');
    this.options.onPartitionChange?.({ partition: n, change: 'acquired' });
    owned.worker = this.run.work(session, owned).finally(() => session.owned.delete(n));
    return true;
  }

  /** Whether this consumer may handle partition o's entries now. */
  holds(session: Session, o: Owned): boolean {
    return !this.stopped && session.failure === null && !o.lost && this.now() < o.deadline;
  }

  lose(o: Owned, why: string): void {
    if (o.lost) return;
    o.lost = true;
    this.options.onPartitionChange?.({ partition: o.n, change: 'lost' });
    this.waiter.wake(o.n);
    this.log.warn({ partition: o.n, stream: o.key }, `stopped handling a partition: ${why}`);
  }

  /**
   * Gives up the lease of a partition whose worker stopped (handed over, or stopping), unless it was lost: everything
   * it read is acknowledged by then, or pending for the next owner.
   */
  async release(o: Owned): Promise<void> {
    if (o.lost) return;
    // handed over (or stopping): everything it read is acknowledged, or pending for the next owner. A lease that is
    // no longer its own by then was lost, not given up: it stopped at its deadline (cut off, paused) and the lease
    // expired, or another consumer took the partition meanwhile
    const released = await this.redis.eval(RELEASE, 1, o.leaseKey, o.token).then(Number, () => null);
    if (released === 0) this.lose(o, 'its lease had expired when it stopped');
    // not given up (Redis away): the lease is left to expire, as a lost one is
    else if (released === null) this.lose(o, 'its lease could not be given up (Redis away): it expires');
    else if (!o.lost) {
      if (o.releasing) this.log.info({ partition: o.n }, 'gave up a partition');
      this.options.onPartitionChange?.({ partition: o.n, change: 'released' });
    }
    this.wakeTick?.();
  }

  /** Wakes the round (on close, on a released partition). */
  wake(): void {
    this.wakeTick?.();
  }

  /** Leaves the group's members (on close), so the others rebalance at once rather than after `leaseMs`. */
  async leave(): Promise<void> {
    if (!this.stopped) return;
    const { streamKey, group, consumer } = this.options;
    await this.redis.eval(HEARTBEAT, 1, membersKey(streamKey, group), String(this.leaseMs), consumer, '0');
  }
}
