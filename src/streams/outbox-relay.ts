/**
 * The outbox relay (docs/architecture.md, "the outbox"): moves committed outbox rows to the Redis stream
 * `<prefix>:transitions`, in id order, at least once; with `partitions` P > 1 each row goes to its deployment's
 * partition (`partitionOf`), in id order per partition, so per deployment in version order.
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
 *   fallback.
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
 */
import { createHash } from 'node:crypto';
import { Client } from 'pg';
import { SpanKind, type Span } from '@opentelemetry/api';
import type { RedisConnection } from '../redis/connection';
import { silentLogger, type Logger } from '../log';
import { connectionForKey, createRedis, describeRedis, logReport, ServerWatch } from '../redis/connection';
import { compareIds, layoutKey, partitionKey, partitionOf, readLayout, recordOrRead } from './partitions';
import { ADMIN_SQL, OUTBOX_SQL, RELAY_HANDOVER_CHANNEL, RELAY_LOCK_KEY, sessionOf, type Session } from '../entities/sql';
import { failSpan, formatTraceparent, traceparentContext, tracer } from '../telemetry';

/** The advisory lock the active relay holds. */
export { RELAY_LOCK_KEY };

/**
 * Appends a batch to the stream KEYS[1] only if the stream still ends with the entry the relay appended last
 * (ARGV[1]; `0-0` for an empty stream) and the key's layout (KEYS[2]) does not name another number of partitions
 * than the relay's (ARGV[3]). ARGV[2] is MAXLEN; then each entry is a field count followed by its fields. Returns the
 * new entry ids, or the error `TAIL_MOVED <actual tail>` or `REPARTITIONED <the layout's number>`. One round trip,
 * atomic.
 */
const APPEND_IF_TAIL = `
local layout = redis.call('HGET', KEYS[2], 'partitions')
if layout and layout ~= ARGV[3] then return redis.error_reply('REPARTITIONED ' .. layout) end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local tail = '0-0'
if #last > 0 then tail = last[1][1] end
if tail ~= ARGV[1] then return redis.error_reply('TAIL_MOVED ' .. tail) end
local ids = {}
local i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local args = {KEYS[1], 'MAXLEN', '~', ARGV[2], '*'}
  for j = 1, n do args[#args + 1] = ARGV[i + j] end
  ids[#ids + 1] = redis.call('XADD', unpack(args))
  i = i + n + 1
end
return ids
`;
const APPEND_IF_TAIL_SHA = createHash('sha1').update(APPEND_IF_TAIL).digest('hex');

export function transitionStreamKey(prefix: string): string {
  return `${prefix}:transitions`;
}

export interface OutboxRelayOptions {
  /** PostgreSQL URL: the relay opens one dedicated session for its lock, LISTEN and its queries */
  readonly databaseUrl: string;
  /** Redis URL (a connection is made and owned) or an ioredis connection */
  readonly redis: string | RedisConnection;
  /** the stream's base key, `<prefix>:transitions` (the stream itself with one partition) */
  readonly streamKey: string;
  /**
   * partitions of the stream (`FLEET_STREAM_PARTITIONS`, default 1): see `partitionKey` for their keys. Recorded
   * when nothing is; when the record names another number (changed by `fleet streams repartition`), the relay
   * publishes to that many and warns that this one is stale.
   */
  readonly partitions?: number;
  /** approximate stream retention (`MAXLEN ~`), default 1,000,000 */
  readonly maxLen?: number;
  /** rows per cycle (default 500) */
  readonly batchSize?: number;
  /** fallback polling when no NOTIFY arrives (default 1000 ms) */
  readonly pollIntervalMs?: number;
  /**
   * how long appended rows may stay unmarked while no new commit comes (default 20 ms): their mark rides on the
   * next cycle's read, in one statement, when one comes sooner
   */
  readonly markDelayMs?: number;
  /** how often a standby tries to become the leader (default 1000 ms) */
  readonly standbyRetryMs?: number;
  /** published rows are deleted after this long (default 24 h) */
  readonly retentionMs?: number;
  /** processed_events rows are deleted after this long (default 7 days): the window in which a redelivered
   * eventId is still recognised as a duplicate */
  readonly processedRetentionMs?: number;
  readonly logger?: Logger;
  /**
   * The process's view of its Redis: connection errors are reported once per outage through it (default: a watch
   * of this component's own, logging to `logger`).
   */
  readonly redisWatch?: ServerWatch;
  /** the process's view of PostgreSQL: connection errors reported once per outage, and its return (default: none) */
  readonly pgWatch?: ServerWatch;
  /** metrics hook: rows published by one cycle */
  readonly onPublished?: (count: number) => void;
  /**
   * Durable appends (FLEET_DURABLE_ENQUEUE): a batch's rows are marked published only once its stream entries are
   * on this many Redis replicas (`WAIT`); until then the relay appends nothing more, and waits again each cycle
   * (default: off, rows are marked once the master has the entries)
   */
  readonly durable?: { readonly replicas: number; readonly timeoutMs: number } | null;
  /** test hook: after a cycle read its rows and chose their partitions, before it appends them */
  readonly beforeXadd?: (ids: readonly string[]) => void | Promise<void>;
  /** test hook: after the XADD pipeline succeeded, before the rows are marked published */
  readonly afterXadd?: (ids: readonly string[]) => void | Promise<void>;
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
  /** `fleet streams repartition` asked the leader to hand its lock over */
  private handoverAsked = false;
  /** an append met a layout for another number of partitions (one warning per episode) */
  private fenced = false;

  constructor(private readonly options: OutboxRelayOptions) {
    this.log = (options.logger ?? silentLogger).child({ component: 'outbox-relay' });
    this.partitions = options.partitions ?? 1;
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
    this.redis.on('ready', () => {
      // a new connection may be a new (or restarted) server: reconcile before appending anything
      this.generation++;
      this.tails = null;
      this.unreplicated = null;
      this.poke();
    });
  }

  /** true while this relay holds the lock and publishes */
  get isLeader(): boolean {
    return this.leader;
  }

  /** rows this relay has published since it started */
  get publishedCount(): number {
    return this.published;
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
        for (let i = 0; i < 20 && (await this.cycle()) > 0; i++);
        await this.flushMarks();
      } catch (err) {
        this.log.warn({ err }, 'final publish failed; the next active relay will publish the rest');
      }
    }
    await this.dropSession();
    if (this.ownsRedis) this.redis.disconnect();
  }

  /**
   * Rows were just committed: wakes the loop if this relay is the active one (a standby ignores it). A transition
   * service in the same process calls this instead of sending a NOTIFY.
   */
  notifyCommitted(): void {
    if (this.leader) this.poke();
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
        const wasFenced = this.fenced;
        const count = await this.cycle();
        if (failures > 0) this.log.info({ failures }, 'relay cycle works again');
        this.options.pgWatch?.back();
        failures = 0;
        if (wasFenced && this.fenced) {
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
          await this.idle(this.unmarked !== null ? (this.options.markDelayMs ?? 20) : (this.options.pollIntervalMs ?? 1000));
        }
      } catch (err) {
        failures++;
        // one warning per outage, then quieter, and backing off (0.5 s doubling to 5 s) while it lasts
        const brief = { code: (err as { code?: unknown }).code, reason: err instanceof Error ? err.message : String(err) };
        if (failures === 1) this.log.warn({ ...brief, leader: this.leader }, 'relay cycle failed; retrying');
        else this.log.debug({ err, failures }, 'relay cycle failed again');
        if (this.client === null || !(await this.sessionAlive())) {
          this.options.pgWatch?.error(err); // its session to PostgreSQL is gone
          await this.dropSession();
        }
        this.pending = false;
        await this.idle(Math.min(5000, 500 * 2 ** (failures - 1)));
      }
    }
  }

  private async tryLead(): Promise<void> {
    if (this.client === null) {
      const client = new Client({
        connectionString: this.options.databaseUrl,
        application_name: 'lifecycle-fleet-relay',
        connectionTimeoutMillis: 5000,
        // a partitioned leader must notice, and lose its session (and lock), in seconds, not at TCP's leisure
        keepAlive: true,
        keepAliveInitialDelayMillis: 5000,
        statement_timeout: 30_000,
        query_timeout: 35_000,
      });
      client.on('error', (err) => {
        this.log.warn({ code: (err as { code?: unknown }).code, reason: err.message }, 'relay database session lost');
        this.leader = false;
      });
      client.on('notification', (message) => {
        if (message.channel === RELAY_HANDOVER_CHANNEL) this.handoverAsked = true;
        this.poke();
      });
      await client.connect();
      this.client = client;
    }
    const session = sessionOf(this.client);
    const result = await session.run(OUTBOX_SQL.tryLock, [RELAY_LOCK_KEY]);
    if (result.rows[0]?.locked === true) {
      await session.run(OUTBOX_SQL.listen);
      // the server side notices a vanished leader too, and frees the lock for a standby
      await session.run(OUTBOX_SQL.keepalives);
      // The relay's own writes (marks, reconcile, prune) do not wait for their WAL flush: a mark lost in a
      // PostgreSQL crash only republishes its rows (duplicates are allowed; gaps are not), and the next leader
      // reconciles again. Waiting for the fsync of every mark held up the next batch by its duration.
      await session.run(OUTBOX_SQL.asyncCommit);
      this.tails = null;
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
      await this.flushMarks();
    } catch (err) {
      this.log.warn({ err }, 'marking the last rows before handing over failed; they go out again after the repartition');
    }
    this.log.info('handing the outbox relay lock over (fleet streams repartition)');
    await this.dropSession();
    this.pending = false;
    await this.idle(this.options.standbyRetryMs ?? 1000);
  }

  /** One cycle: publish a batch. Returns the number of rows published. */
  private async cycle(): Promise<number> {
    const client = this.client;
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
    if (rows.length > 0) {
      // per partition, its rows in id order: one append each, all sent together
      const batches = new Map<number, { args: string[]; rows: number[]; spans: Array<Span | null> }>();
      for (const [i, row] of rows.entries()) {
        const n = this.partitions === 1 ? 0 : partitionOf(row.fields.deploymentId ?? '', this.partitions);
        let batch = batches.get(n);
        if (batch === undefined) {
          batch = { args: [tails.get(n) ?? '0-0', String(this.options.maxLen ?? 1_000_000), String(this.partitions)], rows: [], spans: [] };
          batches.set(n, batch);
        }
        const { fields, span } = startPublish(row.fields, this.keyOf(n));
        batch.spans.push(span);
        batch.rows.push(i);
        const flat = Object.entries(fields).flat();
        batch.args.push(String(flat.length), ...flat);
      }
      await this.options.beforeXadd?.(rows.map((r) => r.id));
      const results = await Promise.allSettled(
        [...batches].map(async ([n, batch]) => {
          try {
            const ids = await this.appendIfTail(this.keyOf(n), batch.args);
            batch.spans.forEach((span, i) => span?.setAttribute('messaging.message.id', ids[i] ?? ''));
            return { n, batch, ids };
          } catch (err) {
            for (const span of batch.spans) if (span !== null) failSpan(span, err);
            throw err;
          } finally {
            for (const span of batch.spans) span?.end();
          }
        }),
      );
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed !== undefined) {
        const err: unknown = failed.reason;
        if (err instanceof Error && err.message.includes('TAIL_MOVED')) {
          this.log.warn({ found: err.message.split('TAIL_MOVED ')[1] }, 'the stream does not end where this relay left it');
          // reconcile on the next cycle, before appending anything; what other partitions took stays unmarked and
          // goes out again (duplicates are allowed, gaps are not)
          this.tails = null;
          return 0;
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
          return 0;
        }
        // the appends that did go through moved their tails: the next cycle meets TAIL_MOVED there and reconciles
        throw err;
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
        return 0;
      }
      await this.options.afterXadd?.(ids);
      if (this.options.durable != null && !(await this.replicated([...batches.keys()]))) {
        this.unreplicated = { ids, streamIds, partitions: [...batches.keys()] };
        return 0;
      }
      this.unmarked = { ids, streamIds };
      this.published += rows.length;
      this.options.onPublished?.(rows.length);
    }
    await this.prune(client);
    return rows.length;
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
  private async flushMarks(): Promise<void> {
    const marks = this.unmarked;
    if (marks === null || this.client === null) return;
    await sessionOf(this.client).run(OUTBOX_SQL.markPublished, [marks.ids, marks.streamIds]);
    this.unmarked = null;
  }

  /** Runs APPEND_IF_TAIL by its SHA (the script is not resent every cycle), loading it when Redis lacks it. */
  private async appendIfTail(key: string, args: readonly string[]): Promise<string[]> {
    try {
      return (await this.redis.evalsha(APPEND_IF_TAIL_SHA, 2, key, layoutKey(key), ...args)) as string[];
    } catch (err) {
      if (!(err instanceof Error && err.message.startsWith('NOSCRIPT'))) throw err;
      return (await this.redis.eval(APPEND_IF_TAIL, 2, key, layoutKey(key), ...args)) as string[];
    }
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

  private async sessionAlive(): Promise<boolean> {
    try {
      if (this.client !== null) await sessionOf(this.client).run(ADMIN_SQL.ping);
      return this.client !== null;
    } catch {
      return false;
    }
  }

  private async dropSession(): Promise<void> {
    const client = this.client;
    this.client = null;
    this.unmarked = null;
    this.unreplicated = null;
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

/**
 * A traced row (its fields carry the `traceparent` of its transition span) gets a `publish` span, child of that
 * span, around the append (one script call for the whole batch, so every entry's span covers the same call), and
 * its entry carries the publish span's context instead, so that a consumer's `handle transition` span is its child.
 * In a process that does not trace, the span is the API's no-op, whose context is the parent's: the field goes out
 * as it was written. An untraced row (tracing off where it was written) has no field and gets no span.
 */
function startPublish(fields: Record<string, string>, streamKey: string): { fields: Record<string, string>; span: Span | null } {
  const parent = traceparentContext(fields.traceparent);
  if (parent === null) return { fields, span: null };
  const span = tracer().startSpan(
    'publish',
    {
      kind: SpanKind.PRODUCER,
      attributes: {
        'messaging.system': 'redis',
        'messaging.operation.type': 'send',
        'messaging.destination.name': streamKey,
        'fleet.deployment.id': fields.deploymentId ?? '',
        'fleet.event.id': fields.eventId ?? '',
        'fleet.version': Number(fields.version ?? 0),
      },
    },
    parent,
  );
  return { fields: { ...fields, traceparent: formatTraceparent(span.spanContext()) ?? fields.traceparent ?? '' }, span };
}

/** Age in seconds of the oldest unpublished outbox row (0 when none): the relay's lag, for metrics. */
export async function relayLagSeconds(db: Session): Promise<number> {
  const { rows } = await db.run(OUTBOX_SQL.lag);
  return Number(rows[0]?.age ?? 0);
}
