/**
 * The outbox relay (docs/architecture.md, "the outbox"): moves committed outbox rows to the Redis stream
 * `<prefix>:transitions`, in id order, at least once.
 *
 * - One active relay fleet-wide: the leader holds a session-level PostgreSQL advisory lock on a dedicated
 *   connection; standbys try to take it every `standbyRetryMs`. When the leader dies its session ends and the lock
 *   goes with it. The leader publishes through that same session, so a leader that lost its lock cannot go on
 *   marking rows.
 * - A cycle reads unpublished rows in id order and XADDs them with one script call (`MAXLEN ~`); their mark
 *   (published, with their stream ids) goes with the next cycle's read, in one statement, or on its own when no
 *   commit comes within `markDelayMs`: one statement and one Redis call per cycle. A crash between the XADD and
 *   the mark republishes them: consumers drop versions they have seen.
 * - Woken after each commit that wrote rows: by a NOTIFY the transition service sends after the commit, or
 *   directly (`notifyCommitted`) by a transition service in the same process; polls every `pollIntervalMs` as the
 *   fallback.
 * - Redis with `appendfsync everysec` can lose its last second of writes when it crashes, or a failover can lose
 *   more. So every batch is appended by a script that first checks that the stream still ends with the last
 *   entry this relay appended; if it does not (Redis lost entries, or this relay just became leader), the relay
 *   reconciles before appending anything: every row whose stream id is beyond the stream's last entry is marked
 *   unpublished and goes out again, in id order. No entry can land after a gap.
 * - Published rows older than `retentionMs` are pruned by the leader, and `processed_events` rows older than
 *   `processedRetentionMs`.
 */
import { createHash } from 'node:crypto';
import { Client } from 'pg';
import { SpanKind, type Span } from '@opentelemetry/api';
import type { RedisConnection } from '../queues/redis';
import { silentLogger, type Logger } from '../log';
import { connectionForKey, createRedis, describeRedis, logReport, ServerWatch } from '../queues/redis';
import { ADMIN_SQL, OUTBOX_SQL, RELAY_LOCK_KEY, sessionOf, type Session } from '../entities/sql';
import { failSpan, formatTraceparent, traceparentContext, tracer } from '../telemetry';

/** The advisory lock the active relay holds. */
export { RELAY_LOCK_KEY };

/**
 * Appends a batch to the stream only if the stream still ends with the entry the relay appended last
 * (ARGV[1]; `0-0` for an empty stream). ARGV[2] is MAXLEN; then each entry is a field count followed by its
 * fields. Returns the new entry ids, or the error `TAIL_MOVED <actual tail>`. One round trip, atomic.
 */
const APPEND_IF_TAIL = `
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local tail = '0-0'
if #last > 0 then tail = last[1][1] end
if tail ~= ARGV[1] then return redis.error_reply('TAIL_MOVED ' .. tail) end
local ids = {}
local i = 3
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
  /** the stream key, `<prefix>:transitions` */
  readonly streamKey: string;
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
  /** the id of the last stream entry this relay appended; null: unknown, reconcile before appending */
  private lastStreamId: string | null = null;
  /**
   * Bumped by every (re)connection to Redis. A cycle remembers it before its reads and checks it after each: if a
   * reconnect happened meanwhile, the server may be another one (restarted empty, a failover), and `lastStreamId`
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
  private unreplicated: { ids: string[]; streamIds: string[] } | null = null;
  /** on a cluster: the stream key's slot (asked once) */
  private readonly slots = new Map<string, number>();
  /** the last WAIT fell short (one warning per episode) */
  private replicasBehind = false;
  private published = 0;

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
    this.redis.on('ready', () => {
      // a new connection may be a new (or restarted) server: reconcile before appending anything
      this.generation++;
      this.lastStreamId = null;
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
        const count = await this.cycle();
        if (failures > 0) this.log.info({ failures }, 'relay cycle works again');
        this.options.pgWatch?.back();
        failures = 0;
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
      client.on('notification', () => this.poke());
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
      this.lastStreamId = null;
      this.leader = true;
      this.log.info('became the active outbox relay');
    }
  }

  /** One cycle: publish a batch. Returns the number of rows published. */
  private async cycle(): Promise<number> {
    const client = this.client;
    if (client === null) throw new Error('no database session');
    if (this.redis.status !== 'ready') return 0; // its 'ready' event wakes the loop
    const generation = this.generation;
    if (this.lastStreamId === null) await this.reconcile(client);

    if (this.unreplicated !== null) {
      // durable: the last batch is on the master only; nothing more goes out until the replicas have it
      if (!(await this.replicated())) return 0;
      if (generation !== this.generation) return 0;
      this.unmarked = this.unreplicated;
      this.unreplicated = null;
      this.published += this.unmarked.ids.length;
      this.options.onPublished?.(this.unmarked.ids.length);
    }

    // the previous batch's mark and this batch's read in one statement; the read cannot see the mark (one snapshot),
    // so it leaves those rows out by id
    const marks = this.unmarked ?? { ids: [], streamIds: [] };
    const { rows } = await sessionOf(client).run(OUTBOX_SQL.markAndRead, [marks.ids, marks.streamIds, this.options.batchSize ?? 500]);
    this.unmarked = null;
    if (generation !== this.generation || this.lastStreamId === null) {
      // Redis reconnected while this cycle read: never append against a tail learnt from another connection. The
      // rows just read stay unpublished; the marks just committed, if they name entries the new server lacks, are
      // undone by the reconcile that comes first next cycle.
      this.poke();
      return 0;
    }
    if (rows.length > 0) {
      const expected = this.lastStreamId;
      const args: string[] = [expected, String(this.options.maxLen ?? 1_000_000)];
      const spans: Array<Span | null> = [];
      for (const row of rows) {
        const { fields, span } = startPublish(row.fields, this.options.streamKey);
        spans.push(span);
        const flat = Object.entries(fields).flat();
        args.push(String(flat.length), ...flat);
      }
      let streamIds: string[];
      try {
        streamIds = await this.appendIfTail(args);
        spans.forEach((span, i) => span?.setAttribute('messaging.message.id', streamIds[i] ?? ''));
      } catch (err) {
        for (const span of spans) if (span !== null) failSpan(span, err);
        if (err instanceof Error && err.message.includes('TAIL_MOVED')) {
          this.log.warn({ expected, found: err.message.split('TAIL_MOVED ')[1] }, 'the stream does not end where this relay left it');
          this.lastStreamId = null; // reconcile on the next cycle, before appending anything
          return 0;
        }
        throw err;
      } finally {
        for (const span of spans) span?.end();
      }
      const ids = rows.map((r) => r.id);
      if (generation !== this.generation) {
        // appended to a server this relay reconnected to during the call: leave the rows unmarked (republished
        // after the reconcile; duplicates are allowed, gaps are not)
        this.lastStreamId = null;
        return 0;
      }
      this.lastStreamId = streamIds[streamIds.length - 1] ?? expected;
      await this.options.afterXadd?.(ids);
      if (this.options.durable != null && !(await this.replicated())) {
        this.unreplicated = { ids, streamIds };
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
  private async replicated(): Promise<boolean> {
    const durable = this.options.durable;
    if (durable == null) return true;
    const writer = await connectionForKey(this.redis, this.options.streamKey, this.slots);
    const acknowledged = Number(await writer.call('WAIT', durable.replicas, durable.timeoutMs));
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
  private async appendIfTail(args: readonly string[]): Promise<string[]> {
    try {
      return (await this.redis.evalsha(APPEND_IF_TAIL_SHA, 1, this.options.streamKey, ...args)) as string[];
    } catch (err) {
      if (!(err instanceof Error && err.message.startsWith('NOSCRIPT'))) throw err;
      return (await this.redis.eval(APPEND_IF_TAIL, 1, this.options.streamKey, ...args)) as string[];
    }
  }

  /**
   * Makes the outbox agree with the stream before anything is appended: rows marked published whose entries the
   * stream no longer holds past its last entry (a Redis that lost writes, a restored snapshot, a failover) are
   * marked unpublished, so they go out again in id order. Duplicates are allowed; gaps are not.
   */
  private async reconcile(client: Client): Promise<void> {
    // whatever was appended and not marked may be what the stream lost: leave it unpublished, so it goes out again
    this.unmarked = null;
    this.unreplicated = null;
    const generation = this.generation;
    const tail = (await this.redis.xrevrange(this.options.streamKey, '+', '-', 'COUNT', 1))[0]?.[0] ?? '0-0';
    const [ms, seq] = tail.split('-');
    const { affected } = await sessionOf(client).run(OUTBOX_SQL.unpublishAfter, [ms ?? '0', seq ?? '0']);
    if (affected > 0) this.log.warn({ republish: affected, streamTail: tail }, 'the stream lost entries: republishing them');
    // a reconnect during the reconcile may have brought another server: its tail is unknown, reconcile again
    this.lastStreamId = generation === this.generation ? tail : null;
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
