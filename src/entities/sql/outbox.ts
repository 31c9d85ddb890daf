/**
 * The outbox relay's statements, run on its one dedicated session (the advisory lock and LISTEN are session
 * state, so the relay does not use the pool).
 */
import { OUTBOX_CHANNEL } from './transitions';
import { plain, sql } from './statement';

/** The advisory lock that elects one active relay fleet-wide. */
export const RELAY_LOCK_KEY = 'lifecycle-fleet:outbox-relay';

export interface OutboxRow {
  id: string;
  fields: Record<string, string>;
}

/** Marks rows published with their stream ids ($1 outbox ids, $2 stream ids). */
const MARK_PUBLISHED = `UPDATE outbox SET published_at = now(), stream_id = v.stream_id
    FROM unnest($1::bigint[], $2::text[]) AS v(id, stream_id)
   WHERE outbox.id = v.id`;

/**
 * The NOTIFY channel on which `fleet streams repartition` asks the active relay to hand its lock over: the leader
 * marks what it appended and releases the lock, to the command waiting for it.
 */
export const RELAY_HANDOVER_CHANNEL = 'lifecycle_fleet_relay_handover';

export const OUTBOX_SQL = Object.freeze({
  tryLock: sql<{ locked: boolean }>(`SELECT pg_try_advisory_lock(hashtext($1)) AS locked`),
  /** waits for the relay lock ($1 the key) at most as long as the session's lock_timeout */
  lock: sql<never>(`SELECT pg_advisory_lock(hashtext($1))`),
  unlock: sql<never>(`SELECT pg_advisory_unlock(hashtext($1))`),
  /** how long this session waits for a lock ($1: e.g. '5000ms'; '0' waits for ever) */
  lockTimeout: sql<never>(`SELECT set_config('lock_timeout', $1, false)`),
  listen: plain(`LISTEN ${OUTBOX_CHANNEL}; LISTEN ${RELAY_HANDOVER_CHANNEL}`),
  askHandover: plain(`NOTIFY ${RELAY_HANDOVER_CHANNEL}`),
  /**
   * The server side notices a vanished (partitioned) leader too, and frees the lock for a standby: keepalive probes
   * after 5 s of silence, every 2 s, 3 unanswered end the session (about 11 s); `tcp_user_timeout` bounds the same
   * when the server has unacknowledged data in flight (a NOTIFY to the cut-off leader), where keepalives do not run.
   */
  keepalives: plain(`SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3; SET tcp_user_timeout = 11000`),
  /**
   * The relay's own writes (marks, reconcile, prune) do not wait for their WAL flush: a mark lost in a PostgreSQL
   * crash only republishes its rows (duplicates are allowed; gaps are not), and the next leader reconciles again.
   */
  asyncCommit: plain(`SET synchronous_commit = off`),
  markPublished: sql<never>(MARK_PUBLISHED),
  /**
   * The previous batch's mark and this batch's read in one statement; the read cannot see the mark (one
   * snapshot), so it leaves those rows out by id. ($1 ids, $2 stream ids, $3 batch size)
   */
  markAndRead: sql<OutboxRow>(
    `WITH marked AS (${MARK_PUBLISHED})
     SELECT id, fields FROM outbox
      WHERE published_at IS NULL AND NOT (id = ANY($1::bigint[]))
      ORDER BY id LIMIT $3`,
  ),
  /**
   * Rows marked published past their stream's tail go out again. A row's stream id is `ms-seq` on a stream of one
   * partition and `ms-seq@n` on partition n of several; per partition ($1 partitions, '' for the one stream; $2 ms
   * and $3 seq of its tail).
   */
  unpublishPastTails: sql<never>(
    `UPDATE outbox SET published_at = NULL, stream_id = NULL
       FROM unnest($1::text[], $2::numeric[], $3::numeric[]) AS t(part, ms, seq)
      WHERE published_at IS NOT NULL AND stream_id IS NOT NULL
        AND split_part(stream_id, '@', 2) = t.part
        AND (split_part(split_part(stream_id, '@', 1), '-', 1)::numeric, split_part(split_part(stream_id, '@', 1), '-', 2)::numeric)
            > (t.ms, t.seq)`,
  ),
  /** published rows older than $1 ms, 10,000 at a time */
  prunePublished: sql<never>(
    `DELETE FROM outbox WHERE id IN (
       SELECT id FROM outbox
        WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1::double precision / 1000)
        LIMIT 10000)`,
  ),
  /** processed events older than $1 ms, 10,000 at a time */
  pruneProcessed: sql<never>(
    `DELETE FROM processed_events WHERE event_id IN (
       SELECT event_id FROM processed_events
        WHERE processed_at < now() - make_interval(secs => $1::double precision / 1000)
        LIMIT 10000)`,
  ),
  /** age in seconds of the oldest unpublished row */
  lag: sql<{ age: number | string | null }>(
    `SELECT EXTRACT(EPOCH FROM now() - created_at) AS age FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1`,
  ),
});
