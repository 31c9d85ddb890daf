/**
 * The outbox relay (docs/architecture.md, "the outbox"): moves committed outbox rows to the Redis stream
 * `<prefix>:transitions`, at least once, per deployment in version order; with `partitions` P > 1 each row goes to
 * its deployment's partition (`partitionOf`). What it reads goes out in id order; rows of other deployments may
 * come in between (a row committed after a read that passed its id, a hand-off).
 *
 * - One active relay fleet-wide: the leader holds a session-level PostgreSQL advisory lock on a dedicated
 *   connection; standbys try to take it every `standbyRetryMs`. When the leader dies its session ends and the lock
 *   goes with it. The leader publishes through that same session, so a leader that lost its lock cannot go on
 *   marking rows.
 * - A cycle reads unpublished rows in id order and XADDs them with one script call per partition (`MAXLEN ~`),
 *   the partitions' calls sent together; their mark
 *   (published, with their stream ids) goes with the next cycle's read, in one statement, or on its own when no
 *   commit comes within `markDelayMs`: one statement and one Redis call per cycle. A crash between the XADD and
 *   the mark republishes them: consumers drop versions they have seen.
 * - Woken after each commit that wrote rows: by a NOTIFY the transition service sends after the commit, or
 *   directly (`notifyCommitted`) by a transition service in the same process; polls every `pollIntervalMs` as the
 *   fallback. A write of that service whose snapshot had no row waiting for the relay hands over the rows it wrote,
 *   and they go out without being read back (one round trip less to PostgreSQL between a commit and its entry:
 *   the low-load path; relay-publisher.ts).
 * - Redis with `appendfsync everysec` can lose its last second of writes when it crashes, or a failover can lose
 *   more. So every batch is appended by a script that first checks that the stream still ends with the last
 *   entry this relay appended (per partition); if it does not (Redis lost entries, or this relay just became
 *   leader), the relay reconciles before appending anything: every row whose stream id is beyond its partition's
 *   last entry is marked unpublished and goes out again, in id order. No entry can land after a gap.
 * - It records the number of partitions where consumers read it each time it reconciles (when nothing is recorded
 *   yet), and publishes to as many partitions as the record names, whatever it was configured with: `fleet streams
 *   repartition` changes the record while it holds the relays' lock, so a relay follows it when it next leads. Each
 *   append also checks the key's layout (`layoutKey`): a relay left with the old number (one that lost its lock
 *   between its read and its append) cannot append to a key written under the new one.
 * - Asked to hand over (a NOTIFY on `RELAY_HANDOVER_CHANNEL`, sent by `fleet streams repartition`), the leader marks
 *   what it appended and releases the lock, then stands by.
 * - Published rows older than `retentionMs` are pruned by the leader, and `processed_events` rows older than
 *   `processedRetentionMs`.
 *
 * This file is the leadership (the lock, standing by, handing over, waking up); what the leader does is in
 * ./relay-publisher.ts, the fenced append in ./relay-append.ts, the PostgreSQL session in ./relay-session.ts.
 */
import type { Client } from 'pg';
import type { RedisConnection } from '../redis/connection';
import { silentLogger, type Logger } from '../log';
import { createRedis, describeRedis, logReport, ServerWatch } from '../redis/connection';
import { OUTBOX_SQL, RELAY_HANDOVER_CHANNEL, RELAY_LOCK_KEY, sessionOf, type HandedOffRow, type Session } from '../entities/sql';
import type { OutboxRelayOptions } from './relay-options';
import { RelayPublisher } from './relay-publisher';
import { connectRelaySession, isReadOnly, takeRelayLock } from './relay-session';

/** The advisory lock the active relay holds. */
export { RELAY_LOCK_KEY };
export type { OutboxRelayOptions } from './relay-options';

export function transitionStreamKey(prefix: string): string {
  return `${prefix}:transitions`;
}

export class OutboxRelay {
  private readonly log: Logger;
  private readonly redis: RedisConnection;
  private readonly ownsRedis: boolean;
  private client: Client | null = null;
  private leader = false;
  private stopped = false;
  private wake: (() => void) | null = null;
  private pending = false;
  private loop: Promise<void> | null = null;
  /** `fleet streams repartition` asked the leader to hand its lock over */
  private handoverAsked = false;
  /** what it does while it leads: the cycles, the reconcile, the marks */
  private readonly publisher: RelayPublisher;

  constructor(private readonly options: OutboxRelayOptions) {
    this.log = (options.logger ?? silentLogger).child({ component: 'outbox-relay' });
    this.ownsRedis = typeof options.redis === 'string';
    // fail fast: a command issued while Redis is away errors at once instead of waiting in memory, so a cycle (and
    // close()) never hangs on an outage and nothing queued can reach a restarted Redis before the reconcile
    this.redis =
      typeof options.redis === 'string'
        ? createRedis(options.redis, 'producer', 'lifecycle-fleet-relay', { enableOfflineQueue: false })
        : options.redis;
    // connection errors once per outage; anything else (a refused AUTH) as it comes
    const other = (err: Error) => this.log.warn({ err }, 'redis error');
    (options.redisWatch ?? new ServerWatch(describeRedis(this.redis), logReport(this.log))).attach(this.redis, other);
    this.publisher = new RelayPublisher(this.redis, options, this.log, () => this.poke());
    this.redis.on('ready', () => {
      // a new connection may be a new (or restarted) server: reconcile before appending anything
      this.publisher.reconnected();
      this.poke();
    });
  }

  /** true while this relay holds the lock and publishes */
  get isLeader(): boolean {
    return this.leader;
  }

  /** rows this relay has published since it started */
  get publishedCount(): number {
    return this.publisher.publishedCount;
  }

  start(): void {
    this.loop ??= this.run();
  }

  /** Stops after the current cycle, publishes what is left if it leads, and releases the lock. Safe to call twice. */
  async close(): Promise<void> {
    this.stopped = true;
    this.poke();
    await this.loop;
    if (this.leader) {
      // publish what the last transitions committed, rather than leave it to the next leader
      try {
        for (let i = 0; i < 20 && (await this.publisher.cycle(this.client)) > 0; i++);
        await this.publisher.flushMarks(this.client);
      } catch (err) {
        this.log.warn({ err }, 'final publish failed; the next active relay will publish the rest');
      }
    }
    await this.dropSession();
    if (this.ownsRedis) this.redis.disconnect();
  }

  /** rows published as the writes of this process handed them over, without reading them back */
  get handedOffCount(): number {
    return this.publisher.handedOffCount;
  }

  /** it leads, and its last cycle was a read that found nothing: every row committed before that read is out */
  get caughtUp(): boolean {
    return this.leader && this.publisher.isCaughtUp;
  }

  /** while it leads, it takes the rows writes of its process hand over */
  get takesHandoff(): boolean {
    return this.leader && !this.stopped;
  }

  /**
   * Rows were just committed: wakes the loop if this relay is the active one (a standby ignores it). A transition
   * service in the same process calls this instead of sending a NOTIFY, with the rows its write handed over, if any
   * (appended without reading them back; relay-publisher.ts).
   */
  notifyCommitted(handoff?: readonly HandedOffRow[] | null): void {
    if (!this.leader) return;
    if (handoff != null) this.publisher.handOff(handoff);
    this.poke();
  }

  private poke(): void {
    this.pending = true;
    this.wake?.();
  }

  private async run(): Promise<void> {
    let failures = 0;
    while (!this.stopped) {
      try {
        if (this.leader && this.handoverAsked) {
          await this.handOver();
          continue;
        }
        if (!this.leader) {
          // a poke means "rows to publish": only the leader acts on it, a standby must not spin on it
          this.pending = false;
          await this.tryLead();
          if (!this.leader) {
            failures = 0;
            await this.idle(this.options.standbyRetryMs ?? 1000);
            continue;
          }
        }
        this.pending = false;
        const wasFenced = this.publisher.fencedOff;
        const count = await this.publisher.cycle(this.client);
        if (failures > 0) this.log.info({ failures }, 'relay cycle works again');
        this.options.pgWatch?.back();
        failures = 0;
        if (wasFenced && this.publisher.fencedOff) {
          // refused again after reading the record anew: a repartition stopped half-way, until it is run again. Try
          // at the standbys' pace, not at every commit's wake-up (each try reconciles every partition)
          const until = performance.now() + (this.options.standbyRetryMs ?? 1000);
          while (!this.stopped && performance.now() < until) {
            this.pending = false;
            await this.idle(until - performance.now());
          }
          continue;
        }
        // Fewer rows than a batch is everything that was committed when the batch was read, and every commit
        // after that read is followed by a wake-up (a NOTIFY sent after the commit, or notifyCommitted()): wait for
        // one rather than read again at once; poll as the fallback.
        if (count < (this.options.batchSize ?? 500) && !this.pending) {
          await this.idle(this.publisher.marksPending ? (this.options.markDelayMs ?? 20) : (this.options.pollIntervalMs ?? 1000));
        }
      } catch (err) {
        failures++;
        // one warning per outage, then quieter, and backing off (0.5 s doubling to 5 s) while it lasts
        const brief = { code: (err as { code?: unknown }).code, reason: err instanceof Error ? err.message : String(err) };
        if (failures === 1) this.log.warn({ ...brief, leader: this.leader }, 'relay cycle failed; retrying');
        else this.log.debug({ err, failures }, 'relay cycle failed again');
        if (this.client === null || !(await this.sessionUsable())) {
          this.options.pgWatch?.error(err); // its session to PostgreSQL is gone, or its server takes no writes
          await this.dropSession();
        }
        this.pending = false;
        await this.idle(Math.min(5000, 500 * 2 ** (failures - 1)));
      }
    }
  }

  private async tryLead(): Promise<void> {
    if (this.client === null) {
      this.client = await connectRelaySession(
        this.options.databaseUrl,
        (err) => {
          this.log.warn({ code: (err as { code?: unknown }).code, reason: err.message }, 'relay database session lost');
          this.leader = false;
        },
        (message) => {
          if (message.channel === RELAY_HANDOVER_CHANNEL) this.handoverAsked = true;
          this.poke();
        },
      );
    }
    if (await takeRelayLock(sessionOf(this.client))) {
      this.publisher.leading();
      this.handoverAsked = false;
      this.leader = true;
      this.log.info('became the active outbox relay');
    }
  }

  /**
   * Hands the lock over to `fleet streams repartition`, which waits for it (a waiter is granted a released advisory
   * lock before any standby's try): marks what this relay appended, so that nothing of it goes out again, and ends
   * its session, which releases the lock. It stands by from then on, trying again after `standbyRetryMs`.
   */
  private async handOver(): Promise<void> {
    this.handoverAsked = false;
    try {
      await this.publisher.flushMarks(this.client);
    } catch (err) {
      this.log.warn({ err }, 'marking the last rows before handing over failed; they go out again after the repartition');
    }
    this.log.info('handing the outbox relay lock over (fleet streams repartition)');
    await this.dropSession();
    this.pending = false;
    await this.idle(this.options.standbyRetryMs ?? 1000);
  }

  /** its session still answers, on a server that takes writes (one that turned read-only is no place to lead from) */
  private async sessionUsable(): Promise<boolean> {
    try {
      return this.client !== null && !(await isReadOnly(sessionOf(this.client)));
    } catch {
      return false;
    }
  }

  private async dropSession(): Promise<void> {
    const client = this.client;
    this.client = null;
    this.publisher.sessionLost();
    if (this.leader) this.log.info('stepped down as the active outbox relay');
    this.leader = false;
    if (client !== null) await client.end().catch(() => undefined);
  }

  private idle(ms: number): Promise<void> {
    if (this.stopped || this.pending) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.wake = null;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.wake = done;
    });
  }
}

/** Age in seconds of the oldest unpublished outbox row (0 when none): the relay's lag, for metrics. */
export async function relayLagSeconds(db: Session): Promise<number> {
  const { rows } = await db.run(OUTBOX_SQL.lag);
  return Number(rows[0]?.age ?? 0);
}
