/**
 * Readiness shards (docs/architecture.md, "Readiness probing"): a tick cuts the readiness set, least recently
 * probed first, into shards of a few hundred endpoints, and any `fleet worker` runs any shard. A shard probes its
 * endpoints through the process's probe lanes until its tick's deadline, then writes everything it learned in ONE
 * UPDATE: every probed row's `last_probed_at` (the round-robin order) and, where `/ready` answered 2xx, its
 * `last_ready_at`. Both only move forward, so a shard that finishes after a later tick's cannot undo it.
 */
import { retryLockConflicts, SWEEP_SQL, type Database, type ShardRow } from '../../entities/sql';
import { servableEndpoint, type EndpointAllowList } from '../../events/endpoint-allow';
import type { Logger } from '../../log';
import { probeReady, type ProbeLanes, type ProbeOutcome } from './probe';

/** A shard as it travels in a `probe` job on the maintenance queue. */
export interface ShardJobData {
  /** the tick that planned it (the sweep job's scheduled time in ms, as a string) */
  readonly tick: string;
  /** its place in the tick, from 0: lower shards hold the endpoints probed longest ago */
  readonly shard: number;
  /** the tick's time, ISO 8601 */
  readonly at: string;
  /** no probe starts at or after this time (ms since the epoch): the tick's probe budget */
  readonly deadline: number;
  /** the endpoints' deployment ids, least recently probed first (dropped from the job once it has run) */
  readonly ids: readonly string[];
}

/** What probing some endpoints found. */
export interface ProbeTotals {
  /** ready node_port endpoints it was given (still ready when it ran) */
  readonly endpoints: number;
  /** probes made */
  readonly probed: number;
  /** endpoints whose `last_ready_at` it set (2xx from the URL still stored) */
  readonly stamped: number;
  /** probes that did not answer 2xx (stamp and URL left alone) */
  readonly failed: number;
  /** endpoints left unprobed: the deadline came first (probed first next tick: they are now the least recent) */
  readonly unprobed: number;
  /** endpoints not stamped whose stamp is older than the window (or null): dispatch serves public */
  readonly stale: number;
  /** failed probes by reason (`http_503`, `timeout`, `refused`, `redirect`, `not_allowed`, ...) */
  readonly probeFailures: Readonly<Record<string, number>>;
}

/** A shard's return value (the `probe` job's, in Bull Board). */
export interface ShardReport extends ProbeTotals {
  readonly tick: string;
  readonly shard: number;
  /** `probed`: it ran; `late`: taken at or after its deadline, so nothing was probed; `duplicate`: already run */
  readonly ran: 'probed' | 'late' | 'duplicate' | 'unconfirmed';
  readonly durationMs: number;
}

export interface ShardRunnerOptions {
  readonly db: Database;
  /** this process's probe lanes */
  readonly lanes: ProbeLanes;
  /** the clock: each probe's start time is its stamp, and no probe starts at or after the deadline */
  readonly now: () => Date;
  readonly probeTimeoutMs: number;
  readonly readyWindowMs: number;
  readonly endpointAllow: EndpointAllowList | null;
  readonly log: Logger;
}

/** Cuts the readiness set, in probing order, into shards of at most `size` endpoints. */
export function cutShards(ids: readonly string[], size: number): string[][] {
  if (!Number.isInteger(size) || size < 1) throw new RangeError(`shard size must be a whole number >= 1, got ${size}`);
  const shards: string[][] = [];
  for (let i = 0; i < ids.length; i += size) shards.push(ids.slice(i, i + size));
  return shards;
}

/** A report for a shard that probed nothing (`late` or `duplicate`). */
export function idleReport(data: Pick<ShardJobData, 'tick' | 'shard' | 'ids'>, ran: 'late' | 'duplicate' | 'unconfirmed'): ShardReport {
  const unprobed = ran === 'duplicate' ? 0 : data.ids.length;
  return {
    tick: data.tick,
    shard: data.shard,
    ran,
    endpoints: data.ids.length,
    probed: 0,
    stamped: 0,
    failed: 0,
    unprobed,
    stale: 0,
    probeFailures: {},
    durationMs: 0,
  };
}

interface Probed {
  readonly row: ShardRow;
  readonly at: Date;
  readonly outcome: ProbeOutcome;
}

/** Runs one shard: reads its rows, probes until the deadline, then one UPDATE. */
export async function runShard(options: ShardRunnerOptions, data: ShardJobData): Promise<ShardReport> {
  if (options.now().getTime() >= data.deadline) return idleReport(data, 'late');
  return probeShard(options, data, await loadShard(options, data));
}

/** A shard's endpoints that are still ready node_port ones, in the tick's order. */
export async function loadShard(options: Pick<ShardRunnerOptions, 'db'>, data: ShardJobData): Promise<ShardRow[]> {
  const { rows } = await options.db.run(SWEEP_SQL.shardRows, [data.ids]);
  const order = new Map(data.ids.map((id, i) => [id, i]));
  return rows.sort((a, b) => (order.get(a.id) ?? 0) - (order.get(b.id) ?? 0));
}

/**
 * Probes a loaded shard until the deadline, then one UPDATE. Shards that start probing together take the lanes in
 * shard order (see ProbeLanes).
 */
export async function probeShard(options: ShardRunnerOptions, data: ShardJobData, rows: readonly ShardRow[]): Promise<ShardReport> {
  const started = performance.now();
  const probed: Probed[] = [];
  const inFlight: Array<Promise<void>> = [];
  for (const row of rows) {
    await options.lanes.acquire(data.shard);
    const at = options.now();
    if (at.getTime() >= data.deadline) {
      options.lanes.release();
      break;
    }
    // a row stored before the list or the endpoint URL rules is never probed; the others as normalised
    const servable = servableEndpoint(row.endpoint_url, options.endpointAllow);
    const probe =
      'url' in servable ? probeReady(servable.url, options.probeTimeoutMs) : Promise.resolve<ProbeOutcome>({ ok: false, reason: 'not_allowed' });
    inFlight.push(
      probe.then((outcome) => {
        options.lanes.release();
        probed.push({ row, at, outcome });
      }),
    );
  }
  await Promise.all(inFlight);

  let stamped = new Set<string>();
  if (probed.length > 0) {
    const params = [probed.map((p) => p.row.id), probed.map((p) => p.row.endpoint_url), probed.map((p) => p.at), probed.map((p) => p.outcome.ok)];
    // a shard runs once (its job has one attempt): a lost lock conflict must not lose what it probed
    const written = await retryLockConflicts(() => options.db.run(SWEEP_SQL.stamp, params), {
      what: "the probe shard's stamp",
      log: options.log,
      context: { tick: data.tick, shard: data.shard },
    });
    stamped = new Set(written.rows.filter((r) => r.stamped).map((r) => r.id));
  }

  const probeFailures: Record<string, number> = {};
  for (const p of probed) {
    if (!p.outcome.ok) probeFailures[p.outcome.reason] = (probeFailures[p.outcome.reason] ?? 0) + 1;
  }
  const cutoff = Date.parse(data.at) - options.readyWindowMs;
  const stale = rows.filter((r) => !stamped.has(r.id) && (r.last_ready_at === null || r.last_ready_at.getTime() < cutoff)).length;
  const failed = probed.filter((p) => !p.outcome.ok).length;
  if (failed > 0) options.log.debug({ tick: data.tick, shard: data.shard, probeFailures }, 'readiness probes failed');
  return {
    tick: data.tick,
    shard: data.shard,
    ran: 'probed',
    endpoints: rows.length,
    probed: probed.length,
    stamped: stamped.size,
    failed,
    unprobed: rows.length - probed.length,
    stale,
    probeFailures,
    durationMs: Math.round(performance.now() - started),
  };
}

/** The sum of some shards' totals. */
export function addTotals(reports: readonly ProbeTotals[]): ProbeTotals {
  const probeFailures: Record<string, number> = {};
  const sum = (key: 'endpoints' | 'probed' | 'stamped' | 'failed' | 'unprobed' | 'stale') => reports.reduce((n, r) => n + r[key], 0);
  for (const r of reports) {
    for (const [reason, n] of Object.entries(r.probeFailures)) probeFailures[reason] = (probeFailures[reason] ?? 0) + n;
  }
  return {
    endpoints: sum('endpoints'),
    probed: sum('probed'),
    stamped: sum('stamped'),
    failed: sum('failed'),
    unprobed: sum('unprobed'),
    stale: sum('stale'),
    probeFailures,
  };
}
