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
 */
import { randomUUID } from 'node:crypto';
import { z } from 'zod';
import { context, SpanKind, trace } from '@opentelemetry/api';
import { Cluster, type default as IORedis } from 'ioredis';
import type { RedisConnection } from '../redis/connection';
import { isTransient, ResyncRequiredError } from '../errors';
import { ACTOR_PATTERN, EVENT_ID_PATTERN } from '../events/schemas';
import { DEPLOYMENT_STATES } from '../machine';
import { silentLogger, type Logger } from '../log';
import { createRedis, describeRedis, isCluster, logReport, ServerWatch } from '../redis/connection';
import { settleWithin } from '../util';
import { failSpan, traceparentContext, tracer } from '../telemetry';
import { ACQUIRE, FENCED_ACK, FENCED_CLAIM, HEARTBEAT, RELEASE, RENEW, fairShare, leaseKey, membersKey, preferredPartitions } from './leases';
import { compareIds, partitionKeys, readerStart, readPartitions } from './partitions';

export { compareIds };

/** One stream entry, parsed (docs/contract.md, "The transition stream"). */
export interface TransitionEntry {
  /** the Redis stream entry id */
  readonly streamId: string;
  readonly type: 'state_transition';
  readonly transitionId: string;
  readonly deploymentId: string;
  /** empty when none */
  readonly attemptId: string;
  /** empty for creation */
  readonly from: string;
  readonly to: string;
  readonly version: number;
  readonly reason: string;
  readonly eventId: string;
  readonly at: string;
  /** who caused it: an API token's name, `sweep`, or the producer's `actor` (empty in entries older than the field) */
  readonly actor: string;
  /**
   * The W3C trace context of the relay's `publish` span for this entry, when tracing was on where it was written
   * (docs/architecture.md, "Tracing"); the handler runs in a `handle transition` span continuing it
   */
  readonly traceparent?: string;
}

/** A UUID as the fleet writes it on the stream (PostgreSQL's text form: lower case). */
const STREAM_UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * One stream entry's fields as the fleet writes them (docs/contract.md, "The transition stream"): all strings. The
 * source of `docs/schemas/stream-entry.json` (`npm run schemas`), for consumers in other languages. Fields it does
 * not name are allowed (strings), since the contract may gain fields. `parseEntry` does not use it: a consumer must
 * not stop on an entry it can read, and entries older than a field lack it.
 */
export const STREAM_ENTRY_SCHEMA = z
  .object({
    type: z.literal('state_transition'),
    transitionId: z.string().min(1).meta({ description: 'the history row id: opaque, unique per transition' }),
    deploymentId: z.string().regex(STREAM_UUID),
    attemptId: z.union([z.literal(''), z.string().regex(STREAM_UUID)]).meta({ description: 'empty when none' }),
    from: z.enum(['', ...DEPLOYMENT_STATES]).meta({ description: 'empty for creation' }),
    to: z.enum(DEPLOYMENT_STATES),
    version: z
      .string()
      .regex(/^[1-9][0-9]*$/)
      .meta({ description: "the deployment's version after the transition (decimal): per deployment, entries arrive in increasing version; drop one whose version you have seen" }),
    reason: z.string().min(1),
    eventId: z.string().regex(EVENT_ID_PATTERN),
    at: z.iso.datetime({ offset: true }).meta({ description: 'when the transition happened (ISO 8601, the fleet clock)' }),
    actor: z
      .string()
      .regex(ACTOR_PATTERN)
      .optional()
      .meta({ description: "the API token's name, `sweep`, or the producer's `actor`; absent from entries written before the field existed" }),
    traceparent: z
      .string()
      .regex(/^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/)
      .optional()
      .meta({ description: 'W3C trace context of the transition, when tracing is on' }),
  })
  .catchall(z.string());

/** Remembers the highest version handled per deployment. The default keeps it in memory. */
export interface VersionStore {
  get(deploymentId: string): number | undefined | Promise<number | undefined>;
  /**
   * Records a handled version. It must never lower what is remembered (keep the maximum, e.g. `GREATEST` in SQL):
   * a handler call that outlived its consumer's lease records its version after the partition's next owner may
   * have recorded higher ones, and a lowered memory would let a republished copy of those through again.
   */
  set(deploymentId: string, version: number): void | Promise<void>;
}

export function memoryVersionStore(): VersionStore {
  const seen = new Map<string, number>();
  return { get: (id) => seen.get(id), set: (id, v) => void seen.set(id, Math.max(v, seen.get(id) ?? v)) };
}

export interface TransitionConsumerOptions {
  /** Redis URL (a connection is made and owned) or an ioredis connection with `maxRetriesPerRequest: null` */
  readonly redis: string | RedisConnection;
  /** `<FLEET_PREFIX>:transitions`: the stream's base key; the consumer finds the partitions itself */
  readonly streamKey: string;
  readonly group: string;
  readonly consumer: string;
  /** where a new group starts: `$` (default, new entries only), `0` (everything retained), or a stream id */
  readonly startId?: string;
  readonly handler: (entry: TransitionEntry) => Promise<void> | void;
  /** entries per read (default 100) */
  readonly batchSize?: number;
  /** how long a read blocks waiting for new entries (default 2000 ms); bounds how fast `close()` returns */
  readonly blockMs?: number;
  /** reports this consumer's connection lost and back (once per outage); default: a watch logging to `logger` */
  readonly redisWatch?: ServerWatch;
  /**
   * No longer used: a consumer that died leaves its partitions' leases to expire (`leaseMs`), and their next owner
   * takes over every entry it left pending, first. Accepted so that existing callers compile.
   */
  readonly claimIdleMs?: number;
  /**
   * How long a partition's lease lasts without renewal (default 10 s): how soon the partitions of a consumer that
   * died (or was cut off, or paused) go to another. It renews every `leaseMs / 5`, and stops handling a partition
   * `leaseMs / 4` before its lease could expire. A handler call should take less than that margin: one that outlives
   * it is not fenced.
   */
  readonly leaseMs?: number;
  readonly versions?: VersionStore;
  readonly logger?: Logger;
  /**
   * Called when this consumer takes a partition over (`acquired`, including at start), hands one over or stops
   * (`released`: everything it read is acknowledged or left pending), or stops handling one because its lease was
   * lost (`lost`): a hook for the caller's own metrics (e.g. a counter of rebalances); it must not throw.
   */
  readonly onPartitionChange?: (change: { readonly partition: number; readonly change: 'acquired' | 'released' | 'lost' }) => void;
  /** test hook: called before each renewal round; false skips it (a paused process, a cut-off host) */
  readonly beforeRenew?: () => boolean;
  /** a monotonic clock in ms for the lease deadlines (default `performance.now`); tests inject one */
  readonly monotonicNow?: () => number;
}

/**
 * Reads the next batch for the group only if the consumer still holds the partition's lease (KEYS[2] = ARGV[4]) and
 * the group cannot miss an entry by it: one atomic step, so nothing can be trimmed between the check and the read,
 * and no consumer that lost its lease reads on. Redis 7 counts the entries ever added to a stream and, per group, the
 * entries it has read (`entries-read`, which a read across a trimmed hole does not correct); the stream has dropped
 * `entries-added - length` entries, all from its head. If that is more than the group has read, some entry the group
 * never read is gone, and the next `>` read would silently skip it. A group whose count Redis does not know (created
 * at an id in the middle) counts as missing when its position is behind the first entry still held (conservative).
 * Returns `{'LOST'}`, `{'MISSED', last-delivered-id, first retained id}` or `{'OK', last-delivered-id, XREADGROUP reply}`.
 */
const READ_IF_CONTIGUOUS = `
if redis.call('GET', KEYS[2]) ~= ARGV[4] then return {'LOST'} end
local function field(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
  return nil
end
local stream = redis.call('XINFO', 'STREAM', KEYS[1])
local removed = field(stream, 'entries-added') - field(stream, 'length')
local first = field(stream, 'recorded-first-entry-id')
local last, read = '0-0', false
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(g, 'name') == ARGV[1] then
    last = field(g, 'last-delivered-id')
    read = field(g, 'entries-read')
  end
end
if removed > 0 then
  local missed
  if read then
    missed = removed > read
  else
    local lm, ls = string.match(last, '(%d+)-(%d+)')
    local fm, fs = string.match(first, '(%d+)-(%d+)')
    lm, ls, fm, fs = tonumber(lm), tonumber(ls), tonumber(fm), tonumber(fs)
    missed = lm < fm or (lm == fm and ls < fs)
  end
  if missed then return {'MISSED', last, first} end
end
return {'OK', last, redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')}
`;

/** A partition this consumer holds the lease of, while it does. */
interface Owned {
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
interface Session {
  readonly partitions: number;
  readonly keys: readonly string[];
  readonly owned: Map<number, Owned>;
  /** what ends the run: the first error (a resync, a non-transient error), a change of partitions, the stop */
  failure: unknown;
  /** the recorded number of partitions is no longer this run's */
  repartitioned: boolean;
  fail: (err: unknown) => void;
}

export class TransitionConsumer {
  private readonly redis: RedisConnection;
  private readonly ownsRedis: boolean;
  /** the connection that waits for new entries (a blocking read), so that renewals never queue behind it */
  private waiterRedis: RedisConnection | null = null;
  private readonly versions: VersionStore;
  private readonly log: Logger;
  private readonly leaseMs: number;
  private readonly now: () => number;
  /** this instance's lease tokens start with it: a restarted consumer of the same name holds nothing of its past */
  private readonly instance = randomUUID();
  private stopped = false;
  /** resolves on close(): a backoff waiting between retries ends at once */
  private readonly closed: Promise<void>;
  private onClose: () => void = () => undefined;
  private running: Promise<void> | null = null;
  private session: Session | null = null;
  /** where groups created from now on start, when not `startId` (after the partitions changed) */
  private startOverride: string | null = null;
  /** wakes the renewal loop (on close, on a released partition) */
  private wakeTick: (() => void) | null = null;
  /** partitions whose worker waits for new entries: their position, and how to wake the worker */
  private readonly idle = new Map<number, { key: string; position: string; wake: () => void }>();
  private wakeWaiter: (() => void) | null = null;
  /** the end of the last handler call queued: calls run one at a time */
  private handlerTurn: Promise<void> = Promise.resolve();
  /** entries handled (not dropped) since start */
  handled = 0;
  /** entries dropped as already seen */
  dropped = 0;
  /** partitions this consumer took over (including at start) */
  acquisitions = 0;
  /** the last version this consumer handled per deployment, since start (handed to the caller on a resync) */
  private readonly lastVersions = new Map<string, number>();
  /** partitions whose group this consumer made or found: from then on a missing group is a lost position */
  private readonly joined = new Set<string>();
  /**
   * Connections to Redis closed since start. ioredis sends a command that was in flight when its connection closed
   * again on the next one: a read whose reply was lost ran twice, and what the first run delivered waits unseen in
   * this consumer's pending list. A read that spans a close is therefore not trusted (see `delivering`).
   */
  private resets = 0;
  private readonly countReset = (): void => void this.resets++;
  private readonly watchNode = (node: IORedis): void => void node.on('close', this.countReset);

  constructor(private readonly options: TransitionConsumerOptions) {
    this.ownsRedis = typeof options.redis === 'string';
    this.redis =
      typeof options.redis === 'string' ? createRedis(options.redis, 'worker', `lifecycle-fleet-consumer-${options.consumer}`) : options.redis;
    this.closed = new Promise((resolve) => (this.onClose = resolve));
    this.versions = options.versions ?? memoryVersionStore();
    this.leaseMs = options.leaseMs ?? 10_000;
    this.now = options.monotonicNow ?? (() => performance.now());
    this.log = (options.logger ?? silentLogger).child({ component: 'transition-consumer', group: options.group, consumer: options.consumer });
    // its connection lost and back, once per outage, to its logger (or the watch it was given)
    (options.redisWatch ?? new ServerWatch(describeRedis(this.redis), logReport(this.log))).attach(this.redis);
    if (this.redis instanceof Cluster) {
      for (const node of this.redis.nodes('all')) this.watchNode(node);
      this.redis.on('+node', this.watchNode);
    } else {
      this.redis.on('close', this.countReset);
    }
  }

  /** Runs until `close()`; rejects with `ResyncRequiredError` when a partition's position was trimmed away. */
  run(): Promise<void> {
    this.running ??= this.loop().catch((err: unknown) => {
      // a command cut short by close() (the connection dropped at once while Redis was away) is the stop, not an error
      if (this.stopped) return;
      // the last versions as the run ends: a handler call in flight on another partition when one partition's
      // resync was found has finished (and been acknowledged) since
      if (err instanceof ResyncRequiredError) throw new ResyncRequiredError(err.streamKey, err.from, err.firstRetained, this.lastHandledVersions());
      throw err;
    }).finally(() => {
      // the run is over (stopped, or ended by an error the caller gets): the waiting connection is this consumer's
      // own even when the caller lent the main one, and must not outlive the run
      this.waiterRedis?.disconnect();
      this.waiterRedis = null;
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
    this.waiterRedis?.disconnect();
    if (this.running) await settleWithin(this.running.catch(() => undefined), graceMs);
    if (this.ownsRedis) this.redis.disconnect();
    else this.detach();
  }

  /** Stops counting the resets of a connection this consumer was lent. */
  private detach(): void {
    if (this.redis instanceof Cluster) {
      this.redis.off('+node', this.watchNode);
      for (const node of this.redis.nodes('all')) node.off('close', this.countReset);
    } else {
      this.redis.off('close', this.countReset);
    }
  }

  /**
   * Runs a command that delivers entries to this consumer (XREADGROUP `>`). If a connection closed while it ran,
   * ioredis may have run it twice: the first run's entries sit in the group's pending list and the reply carries the
   * second run's, which come after them. Rejects then with `ReadInterrupted`: the partition's worker takes over its
   * pending entries again, in stream order, before anything new.
   */
  private async delivering<T>(command: () => Promise<T>): Promise<T> {
    const resets = this.resets;
    const reply = await command();
    if (this.resets !== resets) throw new ReadInterrupted();
    return reply;
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
    for (let failures = 0; ; ) {
      const handled = this.handled;
      try {
        if ((await this.consume()) === 'stopped') return;
        // the stream's partitions changed under it (a consumer started before the fleet first recorded them, or
        // `fleet streams repartition`, which changes the record only once every group has acknowledged everything on
        // the old partitions): every entry of the new layout came after this consumer started, so its group starts
        // there from the beginning of the layout (a key's entries from an earlier layout are skipped: readerStart)
        this.startOverride = '0';
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
    await Promise.all(keys.map((key) => this.ensureGroup(key)));
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
    const waiter = this.waitLoop(session).catch((err: unknown) => session.fail(err));
    try {
      await Promise.race([this.tickLoop(session), failed]);
    } finally {
      // stop every worker (they finish the handler in flight), give up what is still held, leave the members
      session.failure ??= 'stopped';
      this.wakeAll();
      await Promise.all([...session.owned.values()].map((o) => o.worker));
      await waiter;
      await this.leave().catch(() => undefined);
      this.log.debug({ streamKey, group }, 'consumer stopped');
    }
    return session.repartitioned && !this.stopped ? 'repartitioned' : 'stopped';
  }

  /** Heartbeats, renews, rebalances every `leaseMs / 5` until the run ends. */
  private async tickLoop(session: Session): Promise<void> {
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
      this.wakeAll();
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
        this.idle.get(o.n)?.wake();
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
    const owned: Owned = { n, key, leaseKey: lease, token, deadline: this.deadlineFrom(sentAt), releasing: false, lost: false, position: '0-0', worker: Promise.resolve() };
    session.owned.set(n, owned);
    this.acquisitions++;
    this.log.info({ partition: n, stream: key }, 'took over a partition');
    this.options.onPartitionChange?.({ partition: n, change: 'acquired' });
    owned.worker = this.work(session, owned).finally(() => session.owned.delete(n));
    return true;
  }

  /** Whether this consumer may handle partition o's entries now. */
  private holds(session: Session, o: Owned): boolean {
    return !this.stopped && session.failure === null && !o.lost && this.now() < o.deadline;
  }

  private lose(o: Owned, why: string): void {
    if (o.lost) return;
    o.lost = true;
    this.options.onPartitionChange?.({ partition: o.n, change: 'lost' });
    this.idle.get(o.n)?.wake();
    this.log.warn({ partition: o.n, stream: o.key }, `stopped handling a partition: ${why}`);
  }

  /**
   * A partition's worker: checks its position was not trimmed, handles every entry pending in the group on it (what
   * a previous owner read and did not acknowledge), in id order, then new entries; stops when the lease is lost or
   * past its deadline, when asked to give the partition up (after acknowledging what it read), or at the end of the
   * run. Redis going away (or the version store) is waited out, and then what it had read and not acknowledged is
   * taken over again before anything newer; a resync or any other error ends the run.
   */
  private async work(session: Session, o: Owned): Promise<void> {
    for (let failures = 0, pendingDone = false; this.holds(session, o) && !o.releasing; ) {
      try {
        if (!pendingDone) {
          await this.checkTrimmed(o.key);
          await this.takeOverPending(session, o);
          pendingDone = true;
          continue;
        }
        const entries = await this.readNew(session, o);
        if (entries === null) continue;
        if (entries.length === 0) await this.waitForNew(o);
        else await this.handleAll(session, o, entries);
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
          session.fail(this.resync(o.key, o.position, '0-0'));
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
    if (!o.lost) {
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
  }

  /**
   * Every entry pending in the group on the partition, whoever read it, in id order: claimed, then handled before
   * anything newer. An entry that was trimmed before anyone acknowledged it is a resync.
   */
  private async takeOverPending(session: Session, o: Owned): Promise<void> {
    const { group, consumer } = this.options;
    const count = this.options.batchSize ?? 100;
    for (let from = '-'; this.holds(session, o); ) {
      const pending = (await this.redis.xpending(o.key, group, from, '+', count)) as Array<[string, string, number, number]>;
      if (pending.length === 0) return;
      const ids = pending.map(([id]) => id);
      const claimed = (await this.redis.eval(FENCED_CLAIM, 2, o.key, o.leaseKey, o.token, group, consumer, ...ids)) as Array<[string, string[]]> | number;
      if (typeof claimed === 'number') {
        this.lose(o, 'its lease was taken');
        return;
      }
      if (claimed.length < ids.length) {
        const held = new Set(claimed.map(([id]) => id));
        const gone = ids.filter((id) => !held.has(id));
        throw this.resync(o.key, gone[0] ?? from, gone[gone.length - 1] ?? from);
      }
      if (claimed.length > 0) this.log.info({ partition: o.n, claimed: claimed.length }, 'took over entries pending on the partition');
      await this.handleAll(session, o, claimed.map(([id, fields]) => parseEntry(id, fields)));
      from = `(${ids[ids.length - 1] ?? '0-0'}`;
    }
  }

  private async ensureGroup(key: string): Promise<void> {
    const { group } = this.options;
    const startId = this.startOverride ?? this.options.startId ?? '$';
    if (this.joined.has(key)) {
      // back after an error: a group that vanished meanwhile (Redis lost its data) is a lost position. Making it anew
      // at startId would skip, without a word, whatever the relay republished before it.
      const groups = await this.redis.xinfo('GROUPS', key).catch((err: unknown) => {
        if (err instanceof Error && /no such key/i.test(err.message)) return [];
        throw err;
      });
      if (!(groups as unknown[][]).map(pairs).some((g) => g.name === group)) throw this.resync(key, '0-0', '0-0');
      return;
    }
    try {
      // never before the key's layout boundary: what precedes it was written under an earlier number of partitions
      // (`fleet streams repartition`), and its deployments' later entries are on other partitions now. Where the
      // count of entries up to the start is known (from the beginning: 0), tell Redis, so it can count what the
      // group misses.
      const start = await readerStart(this.redis, key, startId);
      if (start.entriesRead !== null) await this.redis.xgroup('CREATE', key, group, start.id, 'MKSTREAM', 'ENTRIESREAD', start.entriesRead);
      else await this.redis.xgroup('CREATE', key, group, start.id, 'MKSTREAM');
      this.log.info({ startId: start.id, stream: key }, 'created consumer group');
    } catch (err) {
      if (!(err instanceof Error) || !err.message.includes('BUSYGROUP')) throw err;
    }
    this.joined.add(key);
  }

  /**
   * Has the partition trimmed entries this group never read? Redis 7 counts entries added to the stream and entries
   * read by the group; when the stream has dropped more entries than the group has read, the group missed some.
   * (A group created at a position in the middle of the stream has no count; then any trimmed entry after its
   * position counts as missed, which is conservative.)
   */
  private async checkTrimmed(key: string): Promise<void> {
    const { group } = this.options;
    const stream = pairs((await this.redis.xinfo('STREAM', key)) as unknown[]);
    const removed = Number(stream['entries-added'] ?? 0) - Number(stream.length ?? 0);
    if (removed <= 0) return;
    const firstRetained = typeof stream['recorded-first-entry-id'] === 'string' ? stream['recorded-first-entry-id'] : null;
    const mine = ((await this.redis.xinfo('GROUPS', key)) as unknown[][]).map(pairs).find((g) => g.name === group);
    const lastDelivered = typeof mine?.['last-delivered-id'] === 'string' ? mine['last-delivered-id'] : '0-0';
    if (firstRetained === null || compareIds(lastDelivered, firstRetained) >= 0) return;
    const entriesRead = mine?.['entries-read'];
    const missed = typeof entriesRead === 'number' || typeof entriesRead === 'string' ? removed - Number(entriesRead) : removed;
    if (missed > 0) throw this.resync(key, lastDelivered, firstRetained);
  }

  /** The last version this consumer handled per deployment since it started (a copy). */
  lastHandledVersions(): Map<string, number> {
    return new Map(this.lastVersions);
  }

  private resync(key: string, from: string, firstRetained: string): ResyncRequiredError {
    const err = new ResyncRequiredError(key, from, firstRetained, this.lastHandledVersions());
    this.log.error({ from, firstRetained }, err.message);
    return err;
  }

  /**
   * New entries of the partition for the group, read only under the lease and only if they follow on from what the
   * group has read (READ_IF_CONTIGUOUS): a position trimmed away while this consumer ran (a slow handler, a long
   * retry) rejects with `ResyncRequiredError` before anything past the hole is handled. Null when the lease is gone.
   */
  private async readNew(session: Session, o: Owned): Promise<TransitionEntry[] | null> {
    const { group, consumer } = this.options;
    const reply = (await this.delivering(() => this.redis.eval(READ_IF_CONTIGUOUS, 2, o.key, o.leaseKey, group, consumer, String(this.options.batchSize ?? 100), o.token))) as [
      string,
      string?,
      (Array<[string, Array<[string, string[]]>]> | null | string)?,
    ];
    const [status, last = '0-0', read] = reply;
    if (status === 'LOST') {
      this.lose(o, 'its lease was taken');
      return null;
    }
    if (status === 'MISSED') throw this.resync(o.key, last, typeof read === 'string' ? read : last);
    o.position = last;
    if (!this.holds(session, o)) return null;
    const raw = Array.isArray(read) ? (read[0]?.[1] ?? []) : [];
    return raw.map(([id, fields]) => parseEntry(id, fields));
  }

  /** Waits (at most `blockMs`) for an entry after the partition's position, or to be woken (released, lost, closed). */
  private waitForNew(o: Owned): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(wake, this.options.blockMs ?? 2000);
      const idle = this.idle;
      function wake(): void {
        clearTimeout(timer);
        if (idle.get(o.n)?.wake === wake) idle.delete(o.n);
        resolve();
      }
      this.idle.set(o.n, { key: o.key, position: o.position, wake });
      this.wakeWaiter?.();
    });
  }

  /**
   * Waits for new entries on every partition whose worker is idle, on a connection of its own (a plain XREAD, which
   * moves nothing), and wakes the workers of those that got some. One partition, or one server: one blocking XREAD
   * over them all; a partition that turns idle meanwhile is included in the next (within 100 ms). On a Redis Cluster
   * with several partitions (their keys in different slots, which one XREAD cannot span) it polls every 100 ms.
   */
  private async waitLoop(session: Session): Promise<void> {
    const blockMs = this.options.blockMs ?? 2000;
    const poll = isCluster(this.redis) && session.partitions > 1;
    while (!this.stopped && session.failure === null) {
      if (this.idle.size === 0) {
        await new Promise<void>((resolve) => (this.wakeWaiter = resolve));
        this.wakeWaiter = null;
        continue;
      }
      const waiting = [...this.idle];
      if (poll) {
        await this.pause(100);
        for (const [, w] of waiting) w.wake();
        continue;
      }
      if (this.waiterRedis === null) {
        this.waiterRedis = this.redis.duplicate();
        // its outages are the main connection's, which its watch reports once: never "Unhandled error event"
        this.waiterRedis.on('error', () => undefined);
      }
      try {
        const block = session.partitions === 1 ? blockMs : Math.min(blockMs, 100);
        const reply = (await this.waiterRedis.call(
          'XREAD',
          'COUNT',
          '1',
          'BLOCK',
          String(block),
          'STREAMS',
          ...waiting.map(([, w]) => w.key),
          ...waiting.map(([, w]) => w.position),
        )) as Array<[string, unknown]> | null;
        const ready = new Set((reply ?? []).map(([key]) => key));
        for (const [, w] of waiting) if (ready.has(w.key)) w.wake();
      } catch (err) {
        if (this.stopped || session.failure !== null) return;
        // the wait is only a hint: the workers read on their own after blockMs
        this.log.debug({ reason: err instanceof Error ? err.message : String(err) }, 'waiting for new entries failed');
        await this.pause(250);
      }
    }
  }

  private wakeAll(): void {
    this.wakeTick?.();
    this.wakeWaiter?.();
    for (const w of [...this.idle.values()]) w.wake();
  }

  /** Leaves the group's members (on close), so the others rebalance at once rather than after `leaseMs`. */
  private async leave(): Promise<void> {
    if (!this.stopped) return;
    const { streamKey, group, consumer } = this.options;
    await this.redis.eval(HEARTBEAT, 1, membersKey(streamKey, group), String(this.leaseMs), consumer, '0');
  }

  /**
   * Handles a batch of one partition in order, each entry only while the lease holds (checked before each handler
   * call), each acknowledged under the lease (FENCED_ACK). Stops at the first entry it may not handle: that one and
   * the rest stay pending for the partition's next owner.
   */
  private async handleAll(session: Session, o: Owned, entries: readonly TransitionEntry[]): Promise<void> {
    for (const entry of entries) {
      if (!this.holds(session, o)) return;
      const seen = await this.versions.get(entry.deploymentId);
      if (seen !== undefined && entry.version <= seen) {
        this.dropped++;
      } else {
        // closed, or the lease lost, while the handler kept failing: leave the entry pending
        if (!(await this.handleWithRetry(session, o, entry))) return;
        await this.versions.set(entry.deploymentId, entry.version);
        this.lastVersions.set(entry.deploymentId, entry.version);
        this.handled++;
      }
      const acked = Number(await this.redis.eval(FENCED_ACK, 2, o.key, o.leaseKey, o.token, this.options.group, entry.streamId));
      if (acked < 0) {
        this.lose(o, 'its lease was taken');
        return;
      }
    }
  }

  /**
   * Retries a failing handler in place (250 ms doubling to 10 s) so that later entries of the deployment never
   * overtake it. Returns false only when closed, or the lease lost, before the handler succeeded.
   */
  private async handleWithRetry(session: Session, o: Owned, entry: TransitionEntry): Promise<boolean> {
    // a traced entry's handler runs in a span that continues the event's trace (the API's no-op when this process
    // registered no OpenTelemetry SDK); an untraced one's runs as it is
    const parent = traceparentContext(entry.traceparent);
    if (parent === null) return this.retrying(session, o, entry);
    const span = tracer().startSpan(
      'handle transition',
      {
        kind: SpanKind.CONSUMER,
        attributes: {
          'messaging.system': 'redis',
          'messaging.operation.type': 'process',
          'messaging.destination.name': o.key,
          'messaging.consumer.group.name': this.options.group,
          'messaging.message.id': entry.streamId,
          'fleet.deployment.id': entry.deploymentId,
          'fleet.event.id': entry.eventId,
          'fleet.version': entry.version,
        },
      },
      parent,
    );
    try {
      const done = await context.with(trace.setSpan(parent, span), () =>
        this.retrying(session, o, entry, (err) => span.recordException(err instanceof Error ? err : String(err))),
      );
      if (!done) failSpan(span, new Error('closed before the handler succeeded'));
      return done;
    } finally {
      span.end();
    }
  }

  private async retrying(session: Session, o: Owned, entry: TransitionEntry, onFailure?: (err: unknown) => void): Promise<boolean> {
    for (let attempt = 0; ; attempt++) {
      // one handler call at a time per consumer, as with one stream: its partitions take turns (the lease is checked
      // once it is this entry's turn, right before the call)
      const outcome = await this.oneAtATime(async () => {
        if (!this.holds(session, o)) return 'stop' as const;
        try {
          await this.options.handler(entry);
          return 'done' as const;
        } catch (err) {
          return { err };
        }
      });
      if (outcome === 'stop') return false;
      if (outcome === 'done') return true;
      onFailure?.(outcome.err);
      if (this.stopped) return false;
      const delay = Math.min(10_000, 250 * 2 ** attempt);
      this.log.warn({ err: outcome.err, deploymentId: entry.deploymentId, version: entry.version, delayMs: delay }, 'handler failed; retrying');
      // the backoff lets the other partitions' entries go on; this partition's wait behind this entry
      await this.pause(delay);
      if (this.stopped) return false;
    }
  }

  /** Runs `fn` after every call queued before it has finished (FIFO). */
  private async oneAtATime<T>(fn: () => Promise<T>): Promise<T> {
    const before = this.handlerTurn;
    let done: () => void = () => undefined;
    this.handlerTurn = new Promise<void>((resolve) => (done = resolve));
    await before;
    try {
      return await fn();
    } finally {
      done();
    }
  }
}

/** A read that spanned a reset connection, which ioredis may have run twice: read the pending list again. */
class ReadInterrupted extends Error {
  constructor() {
    super('the connection to Redis was reset during a read');
    this.name = 'ReadInterrupted';
  }
}

/** A stream's counters (`XINFO STREAM`): entries ever added to it, and entries it holds now. */
export async function streamCounts(redis: RedisConnection, streamKey: string): Promise<{ readonly added: number; readonly length: number }> {
  const info = pairs((await redis.xinfo('STREAM', streamKey)) as unknown[]);
  return { added: Number(info['entries-added'] ?? 0), length: Number(info.length ?? 0) };
}

/** A flat `XINFO` reply (`[name, value, name, value, ...]`) as an object. */
export function pairs(flat: unknown[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (let i = 0; i + 1 < flat.length; i += 2) out[String(flat[i])] = flat[i + 1];
  return out;
}

export function parseEntry(streamId: string, fields: readonly string[]): TransitionEntry {
  const f: Record<string, string> = {};
  for (let i = 0; i + 1 < fields.length; i += 2) f[fields[i] ?? ''] = fields[i + 1] ?? '';
  return {
    streamId,
    type: 'state_transition',
    transitionId: f.transitionId ?? '',
    deploymentId: f.deploymentId ?? '',
    attemptId: f.attemptId ?? '',
    from: f.from ?? '',
    to: f.to ?? '',
    version: Number(f.version ?? 0),
    reason: f.reason ?? '',
    eventId: f.eventId ?? '',
    at: f.at ?? '',
    actor: f.actor ?? '',
    ...(f.traceparent === undefined ? {} : { traceparent: f.traceparent }),
  };
}

