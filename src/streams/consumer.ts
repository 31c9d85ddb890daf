/**
 * The consumer-group client for the transition stream, for services that react to transitions.
 *
 * - Creates the group if missing (at `startId`, default `$`: only new transitions).
 * - Handles its own pending entries first (what it read but did not acknowledge before a restart), then claims
 *   entries idle on other consumers for longer than `claimIdleMs` (XAUTOCLAIM: their consumer died), then reads new
 *   entries with a blocking XREADGROUP.
 * - Acknowledges an entry only after the handler succeeded; a failing handler is retried in place with backoff,
 *   so later entries of the same deployment never overtake it.
 * - Drops an entry whose version it has already seen for that deployment (the stream is at-least-once).
 * - When the position it must read from has been trimmed away, it stops with `ResyncRequiredError` (like a
 *   Kubernetes watch's 410 Gone): read the history from `GET /api/deployments/:id/transitions?afterVersion=`,
 *   then start again from `$`.
 */
import { z } from 'zod';
import { context, SpanKind, trace } from '@opentelemetry/api';
import { Cluster, type default as IORedis } from 'ioredis';
import type { RedisConnection } from '../queues/redis';
import { isTransient, ResyncRequiredError } from '../errors';
import { ACTOR_PATTERN, EVENT_ID_PATTERN } from '../events/schemas';
import { DEPLOYMENT_STATES } from '../machine';
import { silentLogger, type Logger } from '../log';
import { createRedis, describeRedis, logReport, ServerWatch } from '../queues/redis';
import { settleWithin } from '../util';
import { failSpan, traceparentContext, tracer } from '../telemetry';

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
  set(deploymentId: string, version: number): void | Promise<void>;
}

export function memoryVersionStore(): VersionStore {
  const seen = new Map<string, number>();
  return { get: (id) => seen.get(id), set: (id, v) => void seen.set(id, v) };
}

export interface TransitionConsumerOptions {
  /** Redis URL (a connection is made and owned) or an ioredis connection with `maxRetriesPerRequest: null` */
  readonly redis: string | RedisConnection;
  /** `<FLEET_PREFIX>:transitions` */
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
  /** entries idle this long on another consumer are claimed (default 30 s) */
  readonly claimIdleMs?: number;
  readonly versions?: VersionStore;
  readonly logger?: Logger;
}

/**
 * Reads the next batch for the group only if the group cannot miss an entry by it: one atomic step, so nothing can
 * be trimmed between the check and the read. Redis 7 counts the entries ever added to a stream and, per group, the
 * entries it has read (`entries-read`, which a read across a trimmed hole does not correct); the stream has dropped
 * `entries-added - length` entries, all from its head. If that is more than the group has read, some entry the group
 * never read is gone, and the next `>` read would silently skip it. A group whose count Redis does not know (created
 * at an id in the middle) counts as missing when its position is behind the first entry still held (conservative).
 * Returns `{'MISSED', last-delivered-id, first retained id}` or `{'OK', last-delivered-id, XREADGROUP reply}`.
 */
const READ_IF_CONTIGUOUS = `
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

export class TransitionConsumer {
  private readonly redis: RedisConnection;
  private readonly ownsRedis: boolean;
  private readonly versions: VersionStore;
  private readonly log: Logger;
  private stopped = false;
  /** resolves on close(): a backoff waiting between retries ends at once */
  private readonly closed: Promise<void>;
  private onClose: () => void = () => undefined;
  private running: Promise<void> | null = null;
  private lastClaim = 0;
  /** entries handled (not dropped) since start */
  handled = 0;
  /** entries dropped as already seen */
  dropped = 0;
  /** the last version this consumer handled per deployment, since start (handed to the caller on a resync) */
  private readonly lastVersions = new Map<string, number>();
  /** the group's last delivered id as of the last read: where a blocking wait for new entries starts */
  private position = '0-0';
  /** this run has made or found its group: from then on a missing group is a lost position, never made anew */
  private joined = false;
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

  /** Runs until `close()`; rejects with `ResyncRequiredError` when the group's position was trimmed away. */
  run(): Promise<void> {
    this.running ??= this.loop().catch((err: unknown) => {
      // a command cut short by close() (the connection dropped at once while Redis was away) is the stop, not an error
      if (!this.stopped) throw err;
    });
    return this.running;
  }

  /**
   * Stops after the current read (at most `blockMs`) and the current handler, waiting at most `graceMs` (default
   * `blockMs` + 5 s) for them; past that (Redis frozen: the read never returns) it stops waiting and drops the
   * connection it owns. A backoff between retries ends at once. Safe to call twice.
   */
  async close(graceMs = (this.options.blockMs ?? 2000) + 5000): Promise<void> {
    this.stopped = true;
    this.onClose();
    // with the server away nothing in flight can finish: drop the connection now rather than wait for the timeout
    if (this.ownsRedis && this.redis.status !== 'ready') this.redis.disconnect();
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
   * Runs a command that delivers entries to this consumer (XREADGROUP `>`, XAUTOCLAIM). If a connection closed while
   * it ran, ioredis may have run it twice: the first run's entries sit in this consumer's pending list and the reply
   * carries the second run's, which come after them. Rejects then with `ReadInterrupted`: the run reads its pending
   * list again from the start, in stream order, before anything new.
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
        await this.consume();
        return;
      } catch (err) {
        // the stream or the group vanished under it: Redis lost its data (a restart without its AOF, a failover to a
        // replica that never had them): what this consumer had not read is gone, as when trimmed
        if (!this.stopped && err instanceof Error && /NOGROUP|no such key/i.test(err.message)) throw this.resync(this.position, '0-0');
        if (this.stopped || err instanceof ResyncRequiredError) throw err;
        if (err instanceof ReadInterrupted) {
          this.log.info('connection to Redis reset during a read: reading this consumer\'s pending entries again');
          continue;
        }
        if (!isTransient(err)) throw err;
        failures = this.handled > handled ? 1 : failures + 1;
        this.log.debug({ reason: err instanceof Error ? err.message : String(err), failures }, 'stream read failed; reading again');
        await this.pause(Math.min(5000, 250 * 2 ** (failures - 1)));
        if (this.stopped) return;
      }
    }
  }

  private async consume(): Promise<void> {
    const { streamKey, group } = this.options;
    await this.ensureGroup();
    await this.checkTrimmed();
    // own pending entries first: read before a restart, never acknowledged
    for (let from = '0'; !this.stopped; ) {
      const entries = await this.readPending(from);
      if (entries.length === 0) break;
      await this.handleAll(entries);
      from = entries[entries.length - 1]?.streamId ?? from;
    }
    while (!this.stopped) {
      await this.claimIdle();
      const entries = await this.readNew();
      await this.handleAll(entries);
    }
    this.log.debug({ streamKey, group }, 'consumer stopped');
  }

  private async ensureGroup(): Promise<void> {
    const { streamKey, group, startId = '$' } = this.options;
    if (this.joined) {
      // back after an error: a group that vanished meanwhile (Redis lost its data) is a lost position. Making it anew
      // at startId would skip, without a word, whatever the relay republished before it.
      const groups = await this.redis.xinfo('GROUPS', streamKey).catch((err: unknown) => {
        if (err instanceof Error && /no such key/i.test(err.message)) return [];
        throw err;
      });
      if (!(groups as unknown[][]).map(pairs).some((g) => g.name === group)) throw this.resync(this.position, '0-0');
      return;
    }
    try {
      // from the beginning, the group has read nothing yet: tell Redis, so it can count what the group misses
      if (startId === '0' || startId === '0-0') await this.redis.xgroup('CREATE', streamKey, group, startId, 'MKSTREAM', 'ENTRIESREAD', 0);
      else await this.redis.xgroup('CREATE', streamKey, group, startId, 'MKSTREAM');
      this.log.info({ startId }, 'created consumer group');
    } catch (err) {
      if (!(err instanceof Error) || !err.message.includes('BUSYGROUP')) throw err;
    }
    this.joined = true;
  }

  /**
   * Has the stream trimmed entries this group never read? Redis 7 counts entries added to the stream and entries
   * read by the group; when the stream has dropped more entries than the group has read, the group missed some.
   * (A group created at a position in the middle of the stream has no count; then any trimmed entry after its
   * position counts as missed, which is conservative.)
   */
  private async checkTrimmed(): Promise<void> {
    const { streamKey, group } = this.options;
    const stream = pairs((await this.redis.xinfo('STREAM', streamKey)) as unknown[]);
    const removed = Number(stream['entries-added'] ?? 0) - Number(stream.length ?? 0);
    if (removed <= 0) return;
    const firstRetained = typeof stream['recorded-first-entry-id'] === 'string' ? stream['recorded-first-entry-id'] : null;
    const mine = ((await this.redis.xinfo('GROUPS', streamKey)) as unknown[][]).map(pairs).find((g) => g.name === group);
    const lastDelivered = typeof mine?.['last-delivered-id'] === 'string' ? mine['last-delivered-id'] : '0-0';
    if (firstRetained === null || compareIds(lastDelivered, firstRetained) >= 0) return;
    const entriesRead = mine?.['entries-read'];
    const missed = typeof entriesRead === 'number' || typeof entriesRead === 'string' ? removed - Number(entriesRead) : removed;
    if (missed > 0) throw this.resync(lastDelivered, firstRetained);
  }

  /** The last version this consumer handled per deployment since it started (a copy). */
  lastHandledVersions(): Map<string, number> {
    return new Map(this.lastVersions);
  }

  private resync(from: string, firstRetained: string): ResyncRequiredError {
    const err = new ResyncRequiredError(this.options.streamKey, from, firstRetained, this.lastHandledVersions());
    this.log.error({ from, firstRetained }, err.message);
    return err;
  }

  private async claimIdle(): Promise<void> {
    const idle = this.options.claimIdleMs ?? 30_000;
    if (Date.now() - this.lastClaim < Math.min(idle, 5000)) return;
    this.lastClaim = Date.now();
    const { streamKey, group, consumer } = this.options;
    for (let cursor = '0-0'; !this.stopped; ) {
      const reply = (await this.delivering(() => this.redis.xautoclaim(streamKey, group, consumer, idle, cursor, 'COUNT', this.options.batchSize ?? 100))) as [
        string,
        Array<[string, string[]] | null>,
        string[]?,
      ];
      const [next, claimed, deletedIds] = reply;
      if (deletedIds !== undefined && deletedIds.length > 0) {
        // claimed entries that were trimmed before anyone handled them
        throw this.resync(deletedIds[0] ?? cursor, deletedIds[deletedIds.length - 1] ?? cursor);
      }
      const entries = claimed.filter((e): e is [string, string[]] => e !== null).map(([id, fields]) => parseEntry(id, fields));
      if (entries.length > 0) this.log.info({ claimed: entries.length }, 'claimed entries idle on another consumer');
      await this.handleAll(entries);
      if (next === '0-0') break;
      cursor = next;
    }
  }

  /**
   * New entries for the group, checked to follow on from what the group has read (READ_IF_CONTIGUOUS): a position
   * trimmed away while this consumer ran (a slow handler, a long retry) rejects with `ResyncRequiredError` before
   * anything past the hole is handled. When there is nothing new, waits up to `blockMs` for an entry after the
   * group's position (a plain XREAD, which moves nothing), then reads again through the check.
   */
  private async readNew(): Promise<TransitionEntry[]> {
    const { streamKey, group, consumer } = this.options;
    for (let waited = false; ; waited = true) {
      const [status, last, reply] = (await this.delivering(() => this.redis.eval(READ_IF_CONTIGUOUS, 1, streamKey, group, consumer, String(this.options.batchSize ?? 100)))) as [
        string,
        string,
        Array<[string, Array<[string, string[]]>]> | null | string,
      ];
      if (status === 'MISSED') throw this.resync(last, typeof reply === 'string' ? reply : last);
      this.position = last;
      const raw = Array.isArray(reply) ? (reply[0]?.[1] ?? []) : [];
      if (raw.length > 0 || waited || this.stopped) return raw.map(([id, fields]) => parseEntry(id, fields));
      await this.redis.call('XREAD', 'COUNT', '1', 'BLOCK', String(this.options.blockMs ?? 2000), 'STREAMS', streamKey, this.position);
    }
  }

  /** This consumer's own pending entries after `from` (read before a restart, never acknowledged). */
  private async readPending(from: string): Promise<TransitionEntry[]> {
    const { streamKey, group, consumer } = this.options;
    const count = String(this.options.batchSize ?? 100);
    const args: Array<string | number> = ['GROUP', group, consumer, 'COUNT', count, 'STREAMS', streamKey, from];
    const reply = (await this.redis.call('XREADGROUP', ...args)) as Array<[string, Array<[string, string[] | null]>]> | null;
    const raw = reply?.[0]?.[1] ?? [];
    const trimmed = raw.filter(([, fields]) => fields === null).map(([id]) => id);
    if (trimmed.length > 0) throw this.resync(trimmed[0] ?? from, trimmed[trimmed.length - 1] ?? from);
    return raw.map(([id, fields]) => parseEntry(id, fields ?? []));
  }

  private async handleAll(entries: readonly TransitionEntry[]): Promise<void> {
    for (const entry of entries) {
      const seen = await this.versions.get(entry.deploymentId);
      if (seen !== undefined && entry.version <= seen) {
        this.dropped++;
      } else {
        // closed while the handler kept failing: leave the entry pending for the next start or another consumer
        if (!(await this.handleWithRetry(entry))) return;
        await this.versions.set(entry.deploymentId, entry.version);
        this.lastVersions.set(entry.deploymentId, entry.version);
        this.handled++;
      }
      await this.redis.xack(this.options.streamKey, this.options.group, entry.streamId);
    }
  }

  /**
   * Retries a failing handler in place (250 ms doubling to 10 s) so that later entries of the deployment never
   * overtake it. Returns false only when closed before the handler succeeded.
   */
  private async handleWithRetry(entry: TransitionEntry): Promise<boolean> {
    // a traced entry's handler runs in a span that continues the event's trace (the API's no-op when this process
    // registered no OpenTelemetry SDK); an untraced one's runs as it is
    const parent = traceparentContext(entry.traceparent);
    if (parent === null) return this.retrying(entry);
    const span = tracer().startSpan(
      'handle transition',
      {
        kind: SpanKind.CONSUMER,
        attributes: {
          'messaging.system': 'redis',
          'messaging.operation.type': 'process',
          'messaging.destination.name': this.options.streamKey,
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
      const done = await context.with(trace.setSpan(parent, span), () => this.retrying(entry, (err) => span.recordException(err instanceof Error ? err : String(err))));
      if (!done) failSpan(span, new Error('closed before the handler succeeded'));
      return done;
    } finally {
      span.end();
    }
  }

  private async retrying(entry: TransitionEntry, onFailure?: (err: unknown) => void): Promise<boolean> {
    for (let attempt = 0; ; attempt++) {
      try {
        await this.options.handler(entry);
        return true;
      } catch (err) {
        onFailure?.(err);
        if (this.stopped) return false;
        const delay = Math.min(10_000, 250 * 2 ** attempt);
        this.log.warn({ err, deploymentId: entry.deploymentId, version: entry.version, delayMs: delay }, 'handler failed; retrying');
        await this.pause(delay);
        if (this.stopped) return false;
      }
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

function pairs(flat: unknown[]): Record<string, unknown> {
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

/** Orders Redis stream ids (`ms-seq`). */
export function compareIds(a: string, b: string): number {
  const [am = 0n, as = 0n] = a.split('-').map((p) => BigInt(p));
  const [bm = 0n, bs = 0n] = b.split('-').map((p) => BigInt(p));
  return am === bm ? (as === bs ? 0 : as < bs ? -1 : 1) : am < bm ? -1 : 1;
}
