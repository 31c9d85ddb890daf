/**
 * What the active relay does (docs/architecture.md, "the outbox"): the publish cycle (the previous batch's mark with
 * this batch's read, one fenced append per partition (./relay-append.ts), the durable wait for replicas), the
 * reconcile that makes the outbox agree with the stream before anything is appended (after a refused append, a
 * reconnect to Redis, or taking the lead), and the pruning of old rows. It runs on the leader's session, which
 * `OutboxRelay` holds.
 */
import type { Client } from 'pg';
import type { Logger } from '../log';
import type { RedisConnection } from '../redis/connection';
import { connectionForKey } from '../redis/connection';
import { OUTBOX_SQL, sessionOf, type HandedOffRow } from '../entities/sql';
import { compareIds, partitionKey, readLayout, recordOrRead } from './partitions';
import { appendBatches, partitionBatches } from './relay-append';
import type { OutboxRelayOptions } from './relay-options';

/** the most handed-over rows that wait for a cycle; beyond, they are left to a read */
const MAX_HANDED = 10_000;

/** The publishing state of one relay: what it appended, where the stream ends, what is not marked yet. */
export class RelayPublisher {
  /**
   * Per partition, the id of the last stream entry this relay appended (`0-0`: the partition is empty); null:
   * unknown, reconcile before appending
   */
  private tails: Map<number, string> | null = null;
  /**
   * Bumped by every (re)connection to Redis. A cycle remembers it before its reads and checks it after each: if a
   * reconnect happened meanwhile, the server may be another one (restarted empty, a failover), and `tails`
   * from before may match its tail by accident (`0-0` on an empty stream), so the cycle appends nothing and the next
   * one reconciles first.
   */
  private generation = 0;
  private lastPrune = 0;
  /**
   * Rows appended to the stream and not yet marked published: their mark is sent with the next cycle's read (one
   * statement for both) or, when no commit comes within `markDelayMs`, on its own. Until then a crash only
   * republishes them. Dropped (so republished) whenever the stream is reconciled or the session is lost.
   */
  private unmarked: { ids: string[]; streamIds: string[] } | null = null;
  /**
   * Durable appends: rows appended whose entries are not yet on the replicas. Neither marked nor followed by more
   * appends until they are; dropped like `unmarked` (so republished) on a reconnect or a reconcile.
   */
  private unreplicated: { ids: string[]; streamIds: string[]; partitions: number[] } | null = null;
  /** on a cluster: each partition key's slot (asked once) */
  private readonly slots = new Map<string, number>();
  /** the last WAIT fell short (one warning per episode) */
  private replicasBehind = false;
  private published = 0;
  /** the number of partitions it publishes to: the recorded one, read at each reconcile */
  private partitions: number;
  /** the recorded number this relay last warned differs from its configuration (one warning per change) */
  private staleWarned: number | null = null;
  /** an append met a layout for another number of partitions (one warning per episode) */
  private fenced = false;
  /** outbox rows writes of this process handed over since the last read, in the order given */
  private handed: HandedOffRow[] = [];
  /**
   * The last cycle was a read that found nothing (or a hand-off after one): every row committed before it is on the
   * stream. Hand-offs go out only then (`publishHanded`).
   */
  private caughtUp = false;
  private handedOff = 0;

  constructor(
    private readonly redis: RedisConnection,
    private readonly options: OutboxRelayOptions,
    private readonly log: Logger,
    /** wakes the relay's loop: the rows just read go out with the next cycle */
    private readonly poke: () => void,
  ) {
    this.partitions = options.partitions ?? 1;
  }

  /** rows published since the relay started */
  get publishedCount(): number {
    return this.published;
  }

  /** the last append met a layout for another number of partitions */
  get fencedOff(): boolean {
    return this.fenced;
  }

  /** rows appended and not yet marked published wait for the next cycle's read */
  get marksPending(): boolean {
    return this.unmarked !== null;
  }

  /** the last cycle was a read that found nothing (or a hand-off after one): every row committed before it is out */
  get isCaughtUp(): boolean {
    return this.caughtUp;
  }

  /** rows published as writes handed them over, without a read (since the relay started) */
  get handedOffCount(): number {
    return this.handedOff;
  }

  /**
   * A write of this process committed these outbox rows and saw no row waiting for the relay (transition-write.ts):
   * every earlier version of their deployments was on the stream, so they may go out without being read back, in
   * the next cycle that has nothing to mark (`publishHanded`). Beyond `MAX_HANDED` rows waiting, they are dropped:
   * they are in the outbox, and a read finds them.
   */
  handOff(rows: readonly HandedOffRow[]): void {
    if (this.handed.length + rows.length > MAX_HANDED) this.handed = [];
    else this.handed.push(...rows);
  }

  /** A new connection to Redis may be a new (or restarted) server: reconcile before appending anything. */
  reconnected(): void {
    this.generation++;
    this.tails = null;
    this.unreplicated = null;
  }

  /** The relay just took the lead: reconcile before appending anything. */
  leading(): void {
    this.tails = null;
    this.handed = [];
  }

  /** The session is gone: what was appended and not marked goes out again. */
  sessionLost(): void {
    this.unmarked = null;
    this.unreplicated = null;
    this.handed = [];
  }

  /** One cycle: publish a batch. Returns the number of rows published. */
  async cycle(client: Client | null): Promise<number> {
    if (client === null) throw new Error('no database session');
    if (this.redis.status !== 'ready') return 0; // its 'ready' event wakes the loop
    const generation = this.generation;
    if (this.tails === null) await this.reconcile(client);

    if (this.unreplicated !== null) {
      // durable: the last batch is on the master only; nothing more goes out until the replicas have it
      if (!(await this.replicated(this.unreplicated.partitions))) return 0;
      if (generation !== this.generation) return 0;
      this.unmarked = { ids: this.unreplicated.ids, streamIds: this.unreplicated.streamIds };
      this.unreplicated = null;
      this.published += this.unmarked.ids.length;
      this.options.onPublished?.(this.unmarked.ids.length);
    }

    if (this.caughtUp && this.unmarked === null && this.handed.length > 0) return this.publishHanded(generation);
    this.caughtUp = false;
    // what was handed over so far is committed: this read, or the next ones, find it, in id order with the rest
    this.handed = [];

    // the previous batch's mark and this batch's read in one statement; the read cannot see the mark (one snapshot),
    // so it leaves those rows out by id
    const marks = this.unmarked ?? { ids: [], streamIds: [] };
    const { rows } = await sessionOf(client).run(OUTBOX_SQL.markAndRead, [marks.ids, marks.streamIds, this.options.batchSize ?? 500]);
    this.unmarked = null;
    const tails = this.tails;
    if (generation !== this.generation || tails === null) {
      // Redis reconnected while this cycle read: never append against a tail learnt from another connection. The
      // rows just read stay unpublished; the marks just committed, if they name entries the new server lacks, are
      // undone by the reconcile that comes first next cycle.
      this.poke();
      return 0;
    }
    if (rows.length > 0 && !(await this.publish(rows, tails, generation))) return 0;
    await this.prune(client);
    this.caughtUp = rows.length === 0;
    return rows.length;
  }

  /**
   * The rows writes handed over, appended without a read, when nothing waits to be marked (their mark goes with the
   * next cycle's read, as a read's would). Every read drops what was handed over before it (it, or the reads after
   * it, find those rows), so a hand-off goes out in the first cycle after it or not at all. Never twice: a row
   * handed over after the read that returned it (its hand-off came late) waits for a cycle that reads, as a read that
   * appended rows leaves them to mark, and that read drops it.
   *
   * Why they cannot overtake an earlier version of their deployment: their write saw no row waiting for the relay,
   * so every earlier version was marked, so appended, before it. A row unpublished since (a reconcile, after Redis
   * lost entries) is read back before any hand-off goes out: hand-offs go out only when the last cycle was a read that
   * found nothing (`caughtUp`), and a reconcile, a read that found rows, or a failed cycle clears it. And appends are
   * fenced (relay-append.ts): one after entries the stream lost is refused, and the reconcile comes first.
   */
  private async publishHanded(generation: number): Promise<number> {
    const tails = this.tails;
    const rows = this.handed;
    this.handed = [];
    if (rows.length === 0 || tails === null) return 0;
    this.caughtUp = false;
    if (!(await this.publish(rows, tails, generation))) return 0;
    this.caughtUp = true;
    this.handedOff += rows.length;
    return rows.length;
  }

  /**
   * Appends a cycle's rows, each partition's with one fenced append (./relay-append.ts), all sent together, and leaves
   * them to be marked with the next cycle's read. False when none may be marked: an append was refused (the next
   * cycle reconciles first), Redis reconnected meanwhile, or (durable) the entries are not on the replicas yet.
   */
  private async publish(
    rows: ReadonlyArray<{ readonly id: string; readonly fields: Record<string, string> }>,
    tails: Map<number, string>,
    generation: number,
  ): Promise<boolean> {
    const batches = partitionBatches(rows, this.partitions, tails, this.options.maxLen ?? 1_000_000, (n) => this.keyOf(n));
    await this.options.beforeXadd?.(rows.map((r) => r.id));
    const results = await appendBatches(this.redis, batches, (n) => this.keyOf(n));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed !== undefined) {
      this.appendFailed(failed.reason);
      return false;
    }
    this.fenced = false;
    const streamIds = new Array<string>(rows.length).fill('');
    for (const r of results) {
      if (r.status !== 'fulfilled') continue;
      const { n, batch, ids } = r.value;
      batch.rows.forEach((row, i) => (streamIds[row] = this.partitions === 1 ? (ids[i] ?? '') : `${ids[i] ?? ''}@${n}`));
      tails.set(n, ids[ids.length - 1] ?? tails.get(n) ?? '0-0');
    }
    const ids = rows.map((r) => r.id);
    if (generation !== this.generation) {
      // appended to a server this relay reconnected to during the call: leave the rows unmarked (republished
      // after the reconcile; duplicates are allowed, gaps are not)
      this.tails = null;
      return false;
    }
    await this.options.afterXadd?.(ids);
    if (this.options.durable != null && !(await this.replicated([...batches.keys()]))) {
      this.unreplicated = { ids, streamIds, partitions: [...batches.keys()] };
      return false;
    }
    this.unmarked = { ids, streamIds };
    this.published += rows.length;
    this.options.onPublished?.(rows.length);
    return true;
  }

  /**
   * An append failed. Refused by its fence (the stream does not end where this relay left it, or the partitions
   * changed): the next cycle reconciles before appending anything. Anything else is thrown.
   */
  private appendFailed(err: unknown): void {
    if (err instanceof Error && err.message.includes('TAIL_MOVED')) {
      this.log.warn({ found: err.message.split('TAIL_MOVED ')[1] }, 'the stream does not end where this relay left it');
      // reconcile on the next cycle, before appending anything; what other partitions took stays unmarked and
      // goes out again (duplicates are allowed, gaps are not)
      this.tails = null;
      return;
    }
    if (err instanceof Error && err.message.includes('REPARTITIONED')) {
      // the partitions changed (`fleet streams repartition`) since this relay read the record: read it again
      // (reconcile) before appending anything. Still refused then, the record and the layouts disagree: a
      // repartition that stopped half-way.
      if (!this.fenced) {
        this.log.warn(
          { partitions: this.partitions, layout: err.message.split('REPARTITIONED ')[1] },
          'a partition of the stream is written with another number of partitions than this relay read: reading the record again (if this repeats, a `fleet streams repartition` stopped half-way: run it again)',
        );
      }
      this.fenced = true;
      this.tails = null;
      return;
    }
    // the appends that did go through moved their tails: the next cycle meets TAIL_MOVED there and reconciles
    throw err;
  }

  /** Durable appends: whether every entry this relay appended is on the asked number of replicas (Redis `WAIT`). */
  private async replicated(partitions: readonly number[]): Promise<boolean> {
    const durable = this.options.durable;
    if (durable == null) return true;
    // on a cluster the partitions may live on several masters: each one's connection waits for its own writes
    const writers = new Set(await Promise.all(partitions.map((n) => connectionForKey(this.redis, this.keyOf(n), this.slots))));
    const answers = await Promise.all([...writers].map(async (writer) => Number(await writer.call('WAIT', durable.replicas, durable.timeoutMs))));
    const acknowledged = Math.min(...answers);
    if (acknowledged >= durable.replicas) {
      if (this.replicasBehind) this.log.info({ replicas: durable.replicas }, 'stream entries reach their replicas again: publishing resumes');
      this.replicasBehind = false;
      return true;
    }
    if (!this.replicasBehind) {
      this.log.warn(
        { replicas: durable.replicas, acknowledged, timeoutMs: durable.timeoutMs },
        'stream entries did not reach their replicas in time: nothing is marked published, and nothing more appended, until they do',
      );
    }
    this.replicasBehind = true;
    return false;
  }

  /** Marks the rows appended last, if any, on their own (when no cycle comes to carry the mark). */
  async flushMarks(client: Client | null): Promise<void> {
    const marks = this.unmarked;
    if (marks === null || client === null) return;
    await sessionOf(client).run(OUTBOX_SQL.markPublished, [marks.ids, marks.streamIds]);
    this.unmarked = null;
  }

  /** Partition n's stream key. */
  private keyOf(n: number): string {
    return partitionKey(this.options.streamKey, n, this.partitions);
  }

  /**
   * Makes the outbox agree with the stream before anything is appended: rows marked published whose entries the
   * stream no longer holds past its partition's last entry (a Redis that lost writes, a restored snapshot, a failover) are
   * marked unpublished, so they go out again in id order. Duplicates are allowed; gaps are not.
   *
   * First it reads the recorded number of partitions (recording its own when nothing is) and publishes to that many.
   * A row's stream id names its key (`@n`: `<base>:n` whatever P is; none: the base key), so rows published under an
   * earlier number are compared with the key they went to, when it is a key of this number too; and never past the
   * key's layout boundary (`since`): what an earlier layout wrote there was acknowledged by every group before the
   * switch, and published again now it would land on its deployment's new partition after newer versions.
   */
  private async reconcile(client: Client): Promise<void> {
    // whatever was appended and not marked may be what the stream lost: leave it unpublished, so it goes out again
    this.unmarked = null;
    this.unreplicated = null;
    this.caughtUp = false; // what it unpublishes is read back before any hand-off goes out
    const generation = this.generation;
    const configured = this.options.partitions ?? 1;
    const recorded = await recordOrRead(this.redis, this.options.streamKey, configured);
    if (recorded !== this.partitions) this.log.info({ from: this.partitions, to: recorded }, 'publishing to the recorded number of partitions');
    this.partitions = recorded;
    if (recorded !== configured && this.staleWarned !== recorded) {
      this.log.warn(
        { configured, recorded },
        `FLEET_STREAM_PARTITIONS of this process (${configured}) is stale: the stream is recorded with ${recorded} partition(s) (fleet streams repartition), and this relay publishes to ${recorded}; set FLEET_STREAM_PARTITIONS=${recorded} before it restarts`,
      );
    }
    this.staleWarned = recorded === configured ? null : recorded;
    const tails = new Map<number, string>();
    const found = await Promise.all(
      Array.from({ length: this.partitions }, async (_, n) => {
        const [last, layout] = await Promise.all([this.redis.xrevrange(this.keyOf(n), '+', '-', 'COUNT', 1), readLayout(this.redis, this.keyOf(n))]);
        return { tail: last[0]?.[0] ?? '0-0', since: layout.since };
      }),
    );
    found.forEach(({ tail }, n) => tails.set(n, tail));
    const [parts, ms, seq] = [[] as string[], [] as string[], [] as string[]];
    for (const [n, { tail, since }] of found.entries()) {
      const [m, q] = (since !== null && compareIds(since, tail) > 0 ? since : tail).split('-');
      parts.push(this.partitions === 1 ? '' : String(n));
      ms.push(m ?? '0');
      seq.push(q ?? '0');
    }
    const { affected } = await sessionOf(client).run(OUTBOX_SQL.unpublishPastTails, [parts, ms, seq]);
    if (affected > 0) this.log.warn({ republish: affected, streamTails: Object.fromEntries(tails) }, 'the stream lost entries: republishing them');
    // a reconnect during the reconcile may have brought another server: its tails are unknown, reconcile again
    this.tails = generation === this.generation ? tails : null;
  }

  private async prune(client: Client): Promise<void> {
    const now = Date.now();
    if (now - this.lastPrune < 60_000) return;
    this.lastPrune = now;
    const session = sessionOf(client);
    const outbox = await session.run(OUTBOX_SQL.prunePublished, [this.options.retentionMs ?? 24 * 3600_000]);
    const processed = await session.run(OUTBOX_SQL.pruneProcessed, [this.options.processedRetentionMs ?? 7 * 24 * 3600_000]);
    if (outbox.affected > 0 || processed.affected > 0) {
      this.log.info({ outbox: outbox.affected, processedEvents: processed.affected }, 'pruned published outbox rows and old processed events');
    }
  }
}
