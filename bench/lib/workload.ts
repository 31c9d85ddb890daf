/**
 * The end-to-end workload and baseline (a).
 *
 * Workload: `deployment.teardown` of `ready` deployments (seeded straight into the database). Each event is one
 * applied transition whose writes are exactly the shape baseline (a) drives: the processed-event claim, the
 * version-checked UPDATE of the deployment, the history row and the outbox row (plus the outbox NOTIFY). Each
 * deployment gets one event, so nothing waits on anything else and no version check is lost.
 *
 * Baseline (a): the same rows, driven directly with `pg`, one dedicated connection per lane, no snapshot read
 * (the driver knows each row's version), no queue: the database's own limit for this transaction on this machine.
 * Three forms (`DirectVariant`); the best of the first two is the baseline:
 *  - `statements`: BEGIN, claim INSERT, version-checked UPDATE, history + outbox INSERT, COMMIT: the obvious way;
 *  - `one-statement`: BEGIN, the four writes as one statement (data-modifying CTEs, as the service writes them
 *    since bench/ found per-statement overhead to dominate), COMMIT;
 *  - `statements+notify`: `statements` with a NOTIFY inside the transaction, as the service did before bench/
 *    found that PostgreSQL serializes the commits of notifying transactions (diagnostic, not a baseline).
 */
import { randomUUID } from 'node:crypto';
import { Client } from 'pg';
import { OUTBOX_CHANNEL } from '../../src/services/transitions';
import { now } from './common';
import { cpuNow, cpuPerEvent } from './cpu';

export async function withClient<T>(url: string, fn: (c: Client) => Promise<T>): Promise<T> {
  const c = new Client({ connectionString: url, application_name: 'lifecycle-fleet-bench' });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

/**
 * Inserts `n` deployments in state `ready` (version 3, a cluster_dns endpoint so no sweep probes them, a
 * succeeded current attempt) and returns their ids in insertion order.
 */
export async function seedReadyDeployments(url: string, n: number): Promise<string[]> {
  return withClient(url, async (c) => {
    const { rows } = await c.query<{ id: string }>(
      `WITH ids AS MATERIALIZED (
         SELECT i, gen_random_uuid() AS d, gen_random_uuid() AS a FROM generate_series(1, $1::int) AS i
       ), dep AS (
         INSERT INTO deployments (id, name, state, version, current_attempt_id, endpoint_url, endpoint_kind,
                                  last_ready_at, state_changed_at)
         SELECT d, 'bench-' || i, 'ready', 3, a, 'http://svc-' || i || '.bench.svc.cluster.local:8080', 'cluster_dns',
                now(), now()
           FROM ids
       ), att AS (
         INSERT INTO attempts (id, deployment_id, number, status, started_at, ended_at)
         SELECT a, d, 1, 'succeeded', now() - interval '1 minute', now() FROM ids
       )
       SELECT d AS id FROM ids ORDER BY i`,
      [n],
    );
    await c.query('ANALYZE deployments');
    return rows.map((r) => r.id);
  });
}

export const TEARDOWN = 'deployment.teardown' as const;

/** The service's statements for an applied teardown (see the module comment). */
export const DIRECT_SQL = Object.freeze({
  claim: `INSERT INTO processed_events (event_id, event_name, deployment_id, outcome, reason, version, processed_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7)
       ON CONFLICT (event_id) DO NOTHING`,
  update: `UPDATE deployments SET
           state = $3, version = version + 1, state_changed_at = $4, updated_at = $4,
           current_attempt_id = CASE WHEN $5::boolean THEN $6::uuid ELSE current_attempt_id END,
           endpoint_url = CASE WHEN $7::boolean THEN $8::text ELSE endpoint_url END,
           endpoint_kind = CASE WHEN $7::boolean THEN $9::varchar ELSE endpoint_kind END,
           last_ready_at = CASE WHEN $10::boolean THEN $11::timestamptz ELSE last_ready_at END
         WHERE id = $1 AND version = $2`,
  historyAndOutbox: `WITH t AS (
         INSERT INTO state_transitions (deployment_id, attempt_id, from_state, to_state, version, reason, event_id, actor, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'producer', $8)
         RETURNING id
       )
       INSERT INTO outbox (deployment_id, version, fields, created_at)
       SELECT $1, $5, jsonb_build_object(
           'type', 'state_transition', 'transitionId', t.id::text, 'deploymentId', $1::text,
           'attemptId', COALESCE($2::text, ''), 'from', COALESCE($3::text, ''), 'to', $4::text,
           'version', $5::text, 'reason', $6::text, 'eventId', $7::text, 'at', $9::text, 'actor', 'producer'),
         $8
       FROM t
       RETURNING (SELECT id FROM t) AS id`,
  notify: `SELECT pg_notify('${OUTBOX_CHANNEL}', '')`,
  /** baseline (a)'s one-statement form of an applied teardown, as the service wrote it before issue 30 (the service's own statement is now src/entities/sql/transition-write.ts, for batches of any size) */
  oneStatement: `WITH claim AS (
         INSERT INTO processed_events (event_id, event_name, deployment_id, outcome, reason, version, processed_at)
         VALUES ($1::varchar, 'deployment.teardown', $2::uuid, 'applied', 'torn_down', 4, $3::timestamptz)
         ON CONFLICT (event_id) DO NOTHING
         RETURNING 1
       ), dep AS (
         UPDATE deployments SET state = 'pending', version = version + 1, state_changed_at = $3::timestamptz,
                updated_at = $3::timestamptz, current_attempt_id = NULL, endpoint_url = NULL, endpoint_kind = NULL,
                last_ready_at = NULL
          WHERE id = $2::uuid AND version = 3 AND EXISTS (SELECT 1 FROM claim)
         RETURNING id
       ), t AS (
         INSERT INTO state_transitions (deployment_id, attempt_id, from_state, to_state, version, reason, event_id, actor, created_at)
         SELECT dep.id, NULL, 'ready', 'pending', 4, 'torn_down', $1::varchar, 'producer', $3::timestamptz FROM dep
         RETURNING id
       ), o AS (
         INSERT INTO outbox (deployment_id, version, fields, created_at)
         SELECT $2::uuid, 4, jsonb_build_object(
             'type', 'state_transition', 'transitionId', t.id::text, 'deploymentId', $2::text, 'attemptId', '',
             'from', 'ready', 'to', 'pending', 'version', '4', 'reason', 'torn_down', 'eventId', $1::text, 'at', $4::text,
             'actor', 'producer'),
           $3::timestamptz
         FROM t
       )
       SELECT (SELECT count(*) FROM claim)::int AS claimed, (SELECT count(*) FROM dep)::int AS written`,
});

export type DirectVariant = 'statements' | 'one-statement' | 'statements+notify';

/** One teardown transaction of baseline (a) for a deployment seeded at version 3. */
export async function directTeardown(c: Client, deploymentId: string, variant: DirectVariant = 'statements'): Promise<void> {
  const eventId = `${TEARDOWN}.${randomUUID()}`;
  const at = new Date();
  await c.query('BEGIN');
  try {
    if (variant === 'one-statement') {
      const { rows } = await c.query<{ claimed: number; written: number }>(DIRECT_SQL.oneStatement, [eventId, deploymentId, at, at.toISOString()]);
      if (rows[0]?.written !== 1) throw new Error(`version check lost for ${deploymentId}`);
      await c.query('COMMIT');
      return;
    }
    const claimed = await c.query(DIRECT_SQL.claim, [eventId, TEARDOWN, deploymentId, 'applied', 'torn_down', 4, at]);
    if (claimed.rowCount !== 1) throw new Error('claim lost');
    const updated = await c.query(DIRECT_SQL.update, [deploymentId, 3, 'pending', at, true, null, true, null, null, true, null]);
    if (updated.rowCount !== 1) throw new Error(`version check lost for ${deploymentId}`);
    await c.query(DIRECT_SQL.historyAndOutbox, [deploymentId, null, 'ready', 'pending', 4, 'torn_down', eventId, at, at.toISOString()]);
    if (variant === 'statements+notify') await c.query(DIRECT_SQL.notify);
    await c.query('COMMIT');
  } catch (err) {
    await c.query('ROLLBACK').catch(() => undefined);
    throw err;
  }
}

export interface DirectRun {
  readonly variant: DirectVariant;
  readonly concurrency: number;
  readonly events: number;
  readonly seconds: number;
  readonly eventsPerSec: number;
  /** CPU ms per transaction by process (postgres, bench) */
  readonly cpuMsPerEvent: Record<string, number>;
}

/** Baseline (a), closed loop: `concurrency` connections each committing teardowns back to back. */
export async function runDirect(
  url: string,
  ids: readonly string[],
  concurrency: number,
  variant: DirectVariant,
  groups: Parameters<typeof cpuNow>[0] = {},
): Promise<DirectRun> {
  const clients = await Promise.all(
    Array.from({ length: concurrency }, async () => {
      const c = new Client({ connectionString: url, application_name: 'lifecycle-fleet-bench-direct' });
      await c.connect();
      return c;
    }),
  );
  try {
    let next = 0;
    const cpuBefore = cpuNow(groups);
    const started = now();
    await Promise.all(
      clients.map(async (c) => {
        while (next < ids.length) {
          const id = ids[next++];
          if (id !== undefined) await directTeardown(c, id, variant);
        }
      }),
    );
    const seconds = (now() - started) / 1000;
    const cpuMsPerEvent = cpuPerEvent(cpuBefore, cpuNow(groups), ids.length);
    return { variant, concurrency, events: ids.length, seconds, eventsPerSec: ids.length / seconds, cpuMsPerEvent };
  } finally {
    await Promise.all(clients.map((c) => c.end()));
  }
}

/**
 * Baseline (a) (`statements`), open loop at `rate`/s: each transaction starts at its scheduled time on the next
 * free connection (`connections` of them); returns each transaction's latency from its scheduled start to its
 * COMMIT. The first `connections` ids warm the connections (a fresh backend's first statements load its caches)
 * and are not timed.
 */
export async function runDirectPaced(
  url: string,
  ids: readonly string[],
  rate: number,
  connections: number,
  groups: Parameters<typeof cpuNow>[0] = {},
): Promise<{ latencies: number[]; seconds: number; cpuMsPerEvent: Record<string, number> }> {
  const idle: Client[] = await Promise.all(
    Array.from({ length: connections }, async (_, i) => {
      const c = new Client({ connectionString: url, application_name: 'lifecycle-fleet-bench-direct' });
      await c.connect();
      const id = ids[i];
      if (id !== undefined) await directTeardown(c, id);
      return c;
    }),
  );
  ids = ids.slice(connections);
  const all = [...idle];
  const waiting: Array<(c: Client) => void> = [];
  const acquire = (): Promise<Client> => {
    const c = idle.pop();
    return c !== undefined ? Promise.resolve(c) : new Promise((resolve) => waiting.push(resolve));
  };
  const release = (c: Client): void => {
    const w = waiting.shift();
    if (w !== undefined) w(c);
    else idle.push(c);
  };
  const latencies: number[] = [];
  try {
    const inflight: Array<Promise<void>> = [];
    const cpuBefore = cpuNow(groups);
    const started = now();
    await paced(ids.length, rate, (i, scheduledAt) => {
      const id = ids[i];
      if (id === undefined) return;
      inflight.push(
        (async () => {
          const c = await acquire();
          try {
            await directTeardown(c, id);
          } finally {
            release(c);
          }
          latencies.push(now() - scheduledAt);
        })(),
      );
    });
    await Promise.all(inflight);
    return { latencies, seconds: (now() - started) / 1000, cpuMsPerEvent: cpuPerEvent(cpuBefore, cpuNow(groups), ids.length) };
  } finally {
    await Promise.all(all.map((c) => c.end()));
  }
}

/**
 * Open-loop pacing: calls `fire(i, scheduledAt)` for i in [0, n) at `rate` per second, on schedule whatever the
 * system does (latency is measured from `scheduledAt`, so a stall counts against the system, not the schedule).
 */
export async function paced(n: number, rate: number, fire: (i: number, scheduledAt: number) => void): Promise<void> {
  const interval = 1000 / rate;
  const t0 = now() + 5;
  let i = 0;
  while (i < n) {
    const t = now();
    while (i < n && t0 + i * interval <= t) {
      fire(i, t0 + i * interval);
      i++;
    }
    if (i < n) {
      const wait = t0 + i * interval - now();
      await new Promise((resolve) => (wait >= 1 ? setTimeout(resolve, Math.floor(wait)) : setImmediate(resolve)));
    }
  }
}
