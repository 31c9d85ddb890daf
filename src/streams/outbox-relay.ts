/**
 * The outbox relay (DESIGN.md, "the outbox"): moves committed outbox rows to the Redis stream
 * `<prefix>:transitions`, in id order, at least once.
 *
 * - One active relay fleet-wide: the leader holds a session-level PostgreSQL advisory lock on a dedicated
 *   connection; standbys try to take it every `standbyRetryMs`. When the leader dies its session ends and the lock
 *   goes with it. The leader publishes through that same session, so a leader that lost its lock cannot go on
 *   marking rows.
 * - A cycle reads unpublished rows in id order, XADDs them in one pipeline (`MAXLEN ~`), then marks them
 *   published with their stream ids in one UPDATE. A crash between the XADD and the mark republishes them:
 *   consumers drop versions they have seen.
 * - Woken by NOTIFY from the transaction that wrote the row; polls every `pollIntervalMs` as the fallback.
 * - Redis with `appendfsync everysec` can lose its last second of writes when it crashes. When the relay sees a
 *   different Redis `run_id` after a reconnect, it republishes what it published in the last `republishWindowMs`.
 * - Published rows older than `retentionMs` are pruned by the leader.
 */
import { Client } from 'pg';
import type IORedis from 'ioredis';
import { silentLogger, type Logger } from '../log';
import { createRedis } from '../queues/redis';
import { OUTBOX_CHANNEL } from '../services/transition-service';

/** The advisory lock the active relay holds. */
export const RELAY_LOCK_KEY = 'lifecycle-fleet:outbox-relay';

export function transitionStreamKey(prefix: string): string {
  return `${prefix}:transitions`;
}

export interface OutboxRelayOptions {
  /** PostgreSQL URL: the relay opens one dedicated session for its lock, LISTEN and its queries */
  readonly databaseUrl: string;
  /** Redis URL (a connection is made and owned) or an ioredis connection */
  readonly redis: string | IORedis;
  /** the stream key, `<prefix>:transitions` */
  readonly streamKey: string;
  /** approximate stream retention (`MAXLEN ~`), default 1,000,000 */
  readonly maxLen?: number;
  /** rows per cycle (default 500) */
  readonly batchSize?: number;
  /** fallback polling when no NOTIFY arrives (default 1000 ms) */
  readonly pollIntervalMs?: number;
  /** how often a standby tries to become the leader (default 1000 ms) */
  readonly standbyRetryMs?: number;
  /** published rows are deleted after this long (default 24 h) */
  readonly retentionMs?: number;
  /** after a Redis restart, republish rows published this recently (default 10 s) */
  readonly republishWindowMs?: number;
  readonly logger?: Logger;
  /** metrics hook: rows published by one cycle */
  readonly onPublished?: (count: number) => void;
  /** test hook: after the XADD pipeline succeeded, before the rows are marked published */
  readonly afterXadd?: (ids: readonly string[]) => void | Promise<void>;
}

interface OutboxRow {
  id: string;
  fields: Record<string, string>;
}

export class OutboxRelay {
  private readonly log: Logger;
  private readonly redis: IORedis;
  private readonly ownsRedis: boolean;
  private client: Client | null = null;
  private leader = false;
  private stopped = false;
  private wake: (() => void) | null = null;
  private pending = false;
  private loop: Promise<void> | null = null;
  private lastRunId: string | null = null;
  private lastPrune = 0;
  private published = 0;

  constructor(private readonly options: OutboxRelayOptions) {
    this.log = (options.logger ?? silentLogger).child({ component: 'outbox-relay' });
    this.ownsRedis = typeof options.redis === 'string';
    this.redis = typeof options.redis === 'string' ? createRedis(options.redis, 'worker', 'lifecycle-fleet-relay') : options.redis;
    this.redis.on('error', (err) => this.log.debug({ err }, 'redis connection error'));
    this.redis.on('ready', () => this.poke());
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
      } catch (err) {
        this.log.warn({ err }, 'final publish failed; the next active relay will publish the rest');
      }
    }
    await this.dropSession();
    if (this.ownsRedis) this.redis.disconnect();
  }

  private poke(): void {
    this.pending = true;
    this.wake?.();
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      try {
        if (!this.leader) {
          await this.tryLead();
          if (!this.leader) {
            await this.idle(this.options.standbyRetryMs ?? 1000);
            continue;
          }
        }
        this.pending = false;
        const count = await this.cycle();
        if (count === 0 && !this.pending) await this.idle(this.options.pollIntervalMs ?? 1000);
      } catch (err) {
        this.log.warn({ err, leader: this.leader }, 'relay cycle failed; retrying');
        if (this.client === null || !(await this.sessionAlive())) await this.dropSession();
        await this.idle(500);
      }
    }
  }

  private async tryLead(): Promise<void> {
    if (this.client === null) {
      const client = new Client({
        connectionString: this.options.databaseUrl,
        application_name: 'lifecycle-fleet-relay',
        connectionTimeoutMillis: 5000,
      });
      client.on('error', (err) => {
        this.log.warn({ err }, 'relay database session lost');
        this.leader = false;
      });
      client.on('notification', () => this.poke());
      await client.connect();
      this.client = client;
    }
    const result = await this.client.query<{ locked: boolean }>('SELECT pg_try_advisory_lock(hashtext($1)) AS locked', [RELAY_LOCK_KEY]);
    if (result.rows[0]?.locked === true) {
      await this.client.query(`LISTEN ${OUTBOX_CHANNEL}`);
      this.leader = true;
      this.log.info('became the active outbox relay');
    }
  }

  /** One cycle: publish a batch. Returns the number of rows published. */
  private async cycle(): Promise<number> {
    const client = this.client;
    if (client === null) throw new Error('no database session');
    await this.checkRedisRestart(client);

    const rows = (
      await client.query<OutboxRow>(
        `SELECT id, fields FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1`,
        [this.options.batchSize ?? 500],
      )
    ).rows;
    if (rows.length > 0) {
      const pipeline = this.redis.pipeline();
      const maxLen = String(this.options.maxLen ?? 1_000_000);
      for (const row of rows) {
        pipeline.xadd(this.options.streamKey, 'MAXLEN', '~', maxLen, '*', ...Object.entries(row.fields).flat());
      }
      const replies = (await pipeline.exec()) ?? [];
      const streamIds = replies.map(([err, id], i) => {
        if (err !== null) throw err;
        if (typeof id !== 'string') throw new Error(`XADD for outbox row ${rows[i]?.id ?? '?'} returned no id`);
        return id;
      });
      const ids = rows.map((r) => r.id);
      await this.options.afterXadd?.(ids);
      await client.query(
        `UPDATE outbox SET published_at = now(), stream_id = v.stream_id
           FROM unnest($1::bigint[], $2::text[]) AS v(id, stream_id)
          WHERE outbox.id = v.id`,
        [ids, streamIds],
      );
      this.published += rows.length;
      this.options.onPublished?.(rows.length);
    }
    await this.prune(client);
    return rows.length;
  }

  /**
   * After Redis restarted, the last second of stream writes may be gone (AOF fsync every second): mark what was
   * published recently as unpublished, so it is published again. Duplicates are allowed; gaps are not.
   */
  private async checkRedisRestart(client: Client): Promise<void> {
    const info = await this.redis.info('server');
    const runId = /run_id:(\w+)/.exec(info)?.[1] ?? null;
    if (this.lastRunId !== null && runId !== null && runId !== this.lastRunId) {
      const { rowCount } = await client.query(
        `UPDATE outbox SET published_at = NULL, stream_id = NULL
          WHERE published_at > now() - make_interval(secs => $1::double precision / 1000)`,
        [this.options.republishWindowMs ?? 10_000],
      );
      this.log.warn({ republish: rowCount }, 'redis restarted: republishing recently published transitions');
    }
    this.lastRunId = runId;
  }

  private async prune(client: Client): Promise<void> {
    const now = Date.now();
    if (now - this.lastPrune < 60_000) return;
    this.lastPrune = now;
    const { rowCount } = await client.query(
      `DELETE FROM outbox WHERE id IN (
         SELECT id FROM outbox
          WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1::double precision / 1000)
          LIMIT 10000)`,
      [this.options.retentionMs ?? 24 * 3600_000],
    );
    if ((rowCount ?? 0) > 0) this.log.info({ pruned: rowCount }, 'pruned published outbox rows');
  }

  private async sessionAlive(): Promise<boolean> {
    try {
      await this.client?.query('SELECT 1');
      return this.client !== null;
    } catch {
      return false;
    }
  }

  private async dropSession(): Promise<void> {
    const client = this.client;
    this.client = null;
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
export async function relayLagSeconds(query: (sql: string) => Promise<Array<{ age: number | string | null }>>): Promise<number> {
  const rows = await query(
    `SELECT EXTRACT(EPOCH FROM now() - created_at) AS age FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1`,
  );
  return Number(rows[0]?.age ?? 0);
}
