/**
 * The consumer-group client for the transition stream, for services that react to transitions.
 *
 * - Finds the stream's partitions (`<streamKey>:partitions`, 1 when absent) and creates the group on each if
 *   missing (at `startId`, default `$`: only new transitions; never before a key's layout boundary), and starts
 *   over on the new partitions when the record changes (`fleet streams repartition`).
 * - Within the group each partition is owned by one live consumer at a time, under a lease in Redis that it renews
 *   (docs/architecture.md, "The stream consumer"): consumers joining or leaving move only the partitions they must,
 *   each handed over after its owner acknowledged what it read; a consumer that cannot renew stops handling before
 *   its lease can expire, and every read and acknowledgement is checked against the lease (fencing). With one
 *   partition one consumer of the group is active and the others are hot standbys.
 * - A new owner first handles every entry left pending on the partition (what the previous owner, or this consumer
 *   before a restart, read but did not acknowledge), in id order, then reads new entries.
 * - Acknowledges an entry only after the handler succeeded; a failing handler is retried in place with backoff,
 *   so later entries of the same deployment never overtake it.
 * - Drops an entry whose version it has already seen for that deployment (the stream is at-least-once).
 * - When the position it must read from on a partition has been trimmed away, it stops with `ResyncRequiredError`
 *   (like a Kubernetes watch's 410 Gone): read the history from `GET /api/deployments/:id/transitions?afterVersion=`,
 *   then start again from `$`.
 *
 * The parts: ./consumer-ownership.ts (the leases), ./consumer-reader.ts (the group, pending and new entries),
 * ./consumer-waiter.ts (waiting for new entries), ./consumer-handling.ts (the handler, dedup, acknowledgements).
 */
import { isTransient, ResyncRequiredError } from '../errors';
import { silentLogger, type Logger } from '../log';
import type { RedisConnection } from '../redis/connection';
import { createRedis, describeRedis, logReport, ServerWatch } from '../redis/connection';
import { settleWithin } from '../util';
import { EntryHandling } from './consumer-handling';
import type { ConsumerContext, TransitionConsumerOptions } from './consumer-options';
import { PartitionOwnership, type Owned, type Session } from './consumer-ownership';
import { PartitionReader, ReadInterrupted } from './consumer-reader';
import { NewEntryWaiter } from './consumer-waiter';
import { compareIds, partitionKeys, readPartitions } from './partitions';

export { compareIds };
export { memoryVersionStore, type TransitionConsumerOptions, type VersionStore } from './consumer-options';
export { pairs, streamCounts } from './consumer-reader';
export { parseEntry, STREAM_ENTRY_SCHEMA, type TransitionEntry } from './stream-entry';

export class TransitionConsumer {
  private readonly redis: RedisConnection;
  private readonly ownsRedis: boolean;
  private readonly log: Logger;
  private stopped = false;
  /** resolves on close(): a backoff waiting between retries ends at once */
  private readonly closed: Promise<void>;
  private onClose: () => void = () => undefined;
  private running: Promise<void> | null = null;
  private session: Session | null = null;
  private readonly waiter: NewEntryWaiter;
  private readonly ownership: PartitionOwnership;
  private readonly handling: EntryHandling;
  private readonly reader: PartitionReader;

  constructor(private readonly options: TransitionConsumerOptions) {
    this.ownsRedis = typeof options.redis === 'string';
    this.redis =
      typeof options.redis === 'string' ? createRedis(options.redis, 'worker', `lifecycle-fleet-consumer-${options.consumer}`) : options.redis;
    this.closed = new Promise((resolve) => (this.onClose = resolve));
    this.log = (options.logger ?? silentLogger).child({ component: 'transition-consumer', group: options.group, consumer: options.consumer });
    // its connection lost and back, once per outage, to its logger (or the watch it was given)
    (options.redisWatch ?? new ServerWatch(describeRedis(this.redis), logReport(this.log))).attach(this.redis);
    const parts: ConsumerContext = { options, redis: this.redis, log: this.log, isStopped: () => this.stopped, pause: (ms) => this.pause(ms) };
    this.waiter = new NewEntryWaiter(parts);
    this.ownership = new PartitionOwnership(parts, this.waiter, { wakeAll: () => this.wakeAll(), work: (session, o) => this.work(session, o) });
    this.handling = new EntryHandling(parts, this.ownership);
    this.reader = new PartitionReader(parts, this.ownership, this.handling);
  }

  /** entries handled (not dropped) since start */
  get handled(): number {
    return this.handling.handled;
  }

  /** entries dropped as already seen */
  get dropped(): number {
    return this.handling.dropped;
  }

  /** partitions this consumer took over (including at start) */
  get acquisitions(): number {
    return this.ownership.acquisitions;
  }

  /** Runs until `close()`; rejects with `ResyncRequiredError` when a partition's position was trimmed away. */
  run(): Promise<void> {
    this.running ??= this.loop()
      .catch((err: unknown) => {
        // a command cut short by close() (the connection dropped at once while Redis was away) is the stop, not an error
        if (this.stopped) return;
        // the last versions as the run ends: a handler call in flight on another partition when one partition's
        // resync was found has finished (and been acknowledged) since
        if (err instanceof ResyncRequiredError) throw new ResyncRequiredError(err.streamKey, err.from, err.firstRetained, this.lastHandledVersions());
        throw err;
      })
      .finally(() => {
        // the run is over (stopped, or ended by an error the caller gets): the waiting connection is this consumer's
        // own even when the caller lent the main one, and must not outlive the run
        this.waiter.end();
      });
    return this.running;
  }

  /**
   * Stops after the current read (at most `blockMs`) and the current handler, gives up its leases, and leaves the
   * group's members, waiting at most `graceMs` (default `blockMs` + 5 s) for them; past that (Redis frozen: the read
   * never returns) it stops waiting and drops the connection it owns. A backoff between retries ends at once. Safe
   * to call twice.
   */
  async close(graceMs = (this.options.blockMs ?? 2000) + 5000): Promise<void> {
    this.stopped = true;
    this.onClose();
    this.wakeAll();
    // with the server away nothing in flight can finish: drop the connection now rather than wait for the timeout
    if (this.ownsRedis && this.redis.status !== 'ready') this.redis.disconnect();
    this.waiter.disconnect();
    if (this.running)
      await settleWithin(
        this.running.catch(() => undefined),
        graceMs,
      );
    if (this.ownsRedis) this.redis.disconnect();
    else this.reader.detach();
  }

  /** Waits `ms`, or less when closed meanwhile. */
  private async pause(ms: number): Promise<void> {
    await settleWithin(this.closed, ms);
  }

  /** The partitions this consumer owns now (for tests and metrics). */
  ownedPartitions(): number[] {
    return [...(this.session?.owned.keys() ?? [])].sort((a, b) => a - b);
  }

  /**
   * Consumes until stopped. Redis going away (a restart, a Redis Cluster failing over: commands meet closed
   * connections, CLUSTERDOWN or redirections until the replica has taken over) is waited out, from the group's
   * position, with backoff up to 5 s; the outage itself is logged once by the connection's watch. Only a resync
   * (the position trimmed away, or the stream or group gone with Redis's data) or a non-transient error ends the run.
   */
  private async loop(): Promise<void> {
    for (let failures = 0; ;) {
      const handled = this.handled;
      try {
        if ((await this.consume()) === 'stopped') return;
        // the stream's partitions changed under it (a consumer started before the fleet first recorded them, or
        // `fleet streams repartition`, which changes the record only once every group has acknowledged everything on
        // the old partitions): every entry of the new layout came after this consumer started, so its group starts
        // there from the beginning of the layout (a key's entries from an earlier layout are skipped: readerStart)
        this.reader.startNewGroupsAt('0');
      } catch (err) {
        if (this.stopped || err instanceof ResyncRequiredError || !isTransient(err)) throw err;
        failures = this.handled > handled ? 1 : failures + 1;
        this.log.debug({ reason: err instanceof Error ? err.message : String(err), failures }, 'stream read failed; reading again');
        await this.pause(Math.min(5000, 250 * 2 ** (failures - 1)));
        if (this.stopped) return;
      }
    }
  }

  /**
   * One run: finds the partitions, makes sure the group exists on each, then keeps its membership and leases
   * (`tick`) while a worker per owned partition handles its entries; ends on close or on the first fatal error.
   */
  private async consume(): Promise<'stopped' | 'repartitioned'> {
    const { streamKey, group } = this.options;
    const partitions = await readPartitions(this.redis, streamKey);
    const keys = partitionKeys(streamKey, partitions);
    await Promise.all(keys.map((key) => this.reader.ensureGroup(key)));
    let fail: (err: unknown) => void = () => undefined;
    const failed = new Promise<never>((_, reject) => (fail = reject));
    failed.catch(() => undefined);
    const session: Session = {
      partitions,
      keys,
      owned: new Map(),
      failure: null,
      repartitioned: false,
      fail: (err) => {
        if (session.failure !== null) return;
        session.failure = err;
        fail(err);
        this.wakeAll();
      },
    };
    this.session = session;
    const waiter = this.waiter.waitLoop(session).catch((err: unknown) => session.fail(err));
    try {
      await Promise.race([this.ownership.tickLoop(session), failed]);
    } finally {
      // stop every worker (they finish the handler in flight), give up what is still held, leave the members
      session.failure ??= 'stopped';
      this.wakeAll();
      await Promise.all([...session.owned.values()].map((o) => o.worker));
      await waiter;
      await this.ownership.leave().catch(() => undefined);
      this.log.debug({ streamKey, group }, 'consumer stopped');
    }
    return session.repartitioned && !this.stopped ? 'repartitioned' : 'stopped';
  }

  /**
   * A partition's worker: checks its position was not trimmed, handles every entry pending in the group on it (what
   * a previous owner read and did not acknowledge), in id order, then new entries; stops when the lease is lost or
   * past its deadline, when asked to give the partition up (after acknowledging what it read), or at the end of the
   * run. Redis going away (or the version store) is waited out, and then what it had read and not acknowledged is
   * taken over again before anything newer; a resync or any other error ends the run.
   */
  private async work(session: Session, o: Owned): Promise<void> {
    for (let failures = 0, pendingDone = false; this.ownership.holds(session, o) && !o.releasing;) {
      try {
        if (!pendingDone) {
          await this.reader.checkTrimmed(o.key);
          await this.reader.takeOverPending(session, o);
          pendingDone = true;
          continue;
        }
        const entries = await this.reader.readNew(session, o);
        if (entries === null) continue;
        if (entries.length === 0) await this.waiter.waitForNew(o);
        else await this.handling.handleAll(session, o, entries);
        failures = 0;
      } catch (err) {
        if (this.stopped || session.failure !== null) break;
        if (err instanceof ReadInterrupted) {
          this.log.info({ partition: o.n }, "connection to Redis reset during a read: taking over the partition's pending entries again");
          pendingDone = false;
          continue;
        }
        // the stream or the group vanished under it: Redis lost its data (a restart without its AOF, a failover to a
        // replica that never had them): what this consumer had not read is gone, as when trimmed
        if (err instanceof Error && /NOGROUP|no such key/i.test(err.message)) {
          session.fail(this.reader.resync(o.key, o.position, '0-0'));
          break;
        }
        if (err instanceof ResyncRequiredError || !isTransient(err)) {
          session.fail(err);
          break;
        }
        failures++;
        // a batch cut short (its version store or an acknowledgement failed) left the rest pending for this consumer:
        // take that over again, in id order, before reading anything newer
        pendingDone = false;
        this.log.debug({ partition: o.n, reason: err instanceof Error ? err.message : String(err), failures }, 'stream read failed; reading again');
        await this.pause(Math.min(5000, 250 * 2 ** (failures - 1)));
      }
    }
    await this.ownership.release(o);
  }

  /** The last version this consumer handled per deployment since it started (a copy). */
  lastHandledVersions(): Map<string, number> {
    return this.handling.lastHandledVersions();
  }

  private wakeAll(): void {
    this.ownership.wake();
    this.waiter.wakeAll();
  }
}
