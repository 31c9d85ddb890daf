/**
 * Scenario 3: the sweep's cost with 1k, 10k and 100k deployments. A quarter are `ready` with node_port endpoints
 * answering on loopback (served by bench/fixtures/ready-endpoints in a process of its own), 1% have running
 * attempts, some of them due (orphaned or past their deadline). Measured per size:
 *  - a tick with nothing due (no ready node_port endpoint, no due attempt): duration and statements;
 *  - the tick with the quarter ready and the due attempts: duration, statements, UPDATEs (the stamp), results;
 *  - the same 250 ready endpoints in every table size: the tick must cost the same whatever the table size.
 * Baselines on the same data: reading the deployments table once (what a sweep without its partial indexes
 * pays every tick), the same probes with no SQL at all (the probing floor), and stamping the same endpoints one
 * UPDATE each (the obvious alternative to the batched stamp; in one transaction, rolled back).
 */
import type { DataSource, Logger as TypeOrmLogger } from 'typeorm';
import { LifecycleProducer } from '../../src/queues/producer';
import { DEFAULT_SHARD_SIZE, probeReady, Sweeper } from '../../src/services/sweep/sweeper';
import { MeasuredProcess } from '../lib/child';
import { inLanes, log, median, now, round } from '../lib/common';
import { openDataSource, type BenchServices } from '../lib/services';

/** Counts the SQL statements a DataSource issues. */
class CountingLogger implements TypeOrmLogger {
  queries: string[] = [];
  logQuery(query: string): void {
    this.queries.push(query);
  }
  logQueryError(): void {}
  logQuerySlow(): void {}
  logSchemaBuild(): void {}
  logMigration(): void {}
  log(): void {}
}

export interface TickCost {
  readonly durationMs: number;
  readonly statements: number;
  readonly updates: number;
  readonly probed: number;
  readonly stamped: number;
  readonly failed: number;
  readonly orphaned: number;
  readonly expired: number;
}

export interface SweepSize {
  readonly deployments: number;
  readonly readyEndpoints: number;
  readonly runningAttempts: number;
  readonly nothingDue: { readonly ticksMs: readonly number[]; readonly medianMs: number; readonly maxMs: number; readonly statements: number };
  /** baseline: one full read of the deployments table */
  readonly tableScanMs: number;
  readonly work: TickCost;
  /** baseline: the same probes, same concurrency, no SQL */
  readonly probeFloorMs: number;
  /** baseline: one UPDATE per stamped endpoint */
  readonly naiveStampMs: number;
  /** a tick with the same 250 ready endpoints (and nothing else due) whatever the table size */
  readonly fixedWork: TickCost & { readonly readyEndpoints: number };
}

export interface SweepScenarioResult {
  readonly probeConcurrency: number;
  /** endpoints per probe shard (the sweeper's default; absent in results written before issue 32) */
  readonly shardSize?: number;
  readonly sizes: readonly SweepSize[];
}

const FIXED_READY = 250;
const PROBE_CONCURRENCY = 32; // this scenario's probe lanes, as measured since issue 16 (the Sweeper's default is DEFAULT_PROBE_CONCURRENCY, 64)

export async function runSweep(services: BenchServices, sizes: readonly number[]): Promise<SweepScenarioResult> {
  const dbUrl = await services.createDatabase('sweep');
  const ds = await openDataSource(dbUrl, 8);
  const counter = new CountingLogger();
  ds.setOptions({ logger: counter });
  const producer = new LifecycleProducer({ connection: services.redisUrl, prefix: services.prefix('sweep') });
  const endpoints = await MeasuredProcess.start({
    label: `${services.prefix('sweep-endpoints')}`,
    args: ['dist/bench/fixtures/ready-endpoints.js'],
    env: { BENCH_PORTS: '8' },
    ready: { kind: 'json' },
  });
  const ports = endpoints.readyMessage['ports'];
  if (!Array.isArray(ports) || ports.length === 0) throw new Error('ready-endpoints fixture reported no ports');
  const sweeper = new Sweeper({ dataSource: ds, producer, readyWindowS: 120, probeConcurrency: PROBE_CONCURRENCY });

  const tick = async (): Promise<TickCost> => {
    counter.queries = [];
    const started = now();
    const result = await sweeper.sweep();
    const durationMs = round(now() - started, 2);
    if (result.queued) throw new Error('the bench sweeper runs its shards itself: it has no shard queue');
    return {
      durationMs,
      statements: counter.queries.length,
      // statements that write deployments, with or without a CTE before them (the stamp locks its rows in id order first)
      updates: counter.queries.filter((q) => /\bUPDATE\s+deployments\b/i.test(q)).length,
      probed: result.probed,
      stamped: result.stamped,
      failed: result.failed,
      orphaned: result.orphaned,
      expired: result.expired,
    };
  };

  const out: SweepSize[] = [];
  try {
    // warm-up, not reported: JIT, the pool's connections, the probes' code paths
    await seed(ds, 1000, ports as number[]);
    await makeWork(ds, 1000);
    await tick();
    for (const n of sizes) {
      await seed(ds, n, ports as number[]);
      const running = n / 100;

      // nothing due: a cold tick, then five
      const ticksMs: number[] = [];
      let statements = 0;
      for (let i = 0; i < 6; i++) {
        const t = await tick();
        if (t.probed !== 0 || t.orphaned !== 0 || t.expired !== 0) throw new Error(`nothing-due tick did work: ${JSON.stringify(t)}`);
        ticksMs.push(t.durationMs);
        statements = t.statements;
      }
      const scans: number[] = [];
      for (let i = 0; i < 3; i++) {
        const started = now();
        await ds.query(`SELECT id, state, endpoint_kind, endpoint_url, last_ready_at FROM deployments`);
        scans.push(now() - started);
      }

      // a quarter ready, some attempts due
      const due = await makeWork(ds, n);
      const work = await tick();
      if (work.stamped !== n / 4 || work.orphaned !== due.orphaned || work.expired !== due.expired) {
        throw new Error(`work tick: expected ${n / 4} stamps and ${JSON.stringify(due)}, got ${JSON.stringify(work)}`);
      }
      const urls = await ds.query<Array<{ id: string; endpoint_url: string }>>(
        `SELECT id, endpoint_url FROM deployments WHERE state = 'ready' AND endpoint_kind = 'node_port'`,
      );
      let started = now();
      await inLanes(urls.length, PROBE_CONCURRENCY, async (i) => {
        const u = urls[i];
        if (u !== undefined && !(await probeReady(u.endpoint_url, 2000)).ok) throw new Error(`probe of ${u.endpoint_url} failed`);
      });
      const probeFloorMs = now() - started;
      let naiveStampMs = 0;
      const q = ds.createQueryRunner();
      await q.connect();
      try {
        await q.query('BEGIN');
        started = now();
        for (const u of urls) {
          await q.query(`UPDATE deployments SET last_ready_at = GREATEST(last_ready_at, now()) WHERE id = $1 AND endpoint_url = $2`, [
            u.id,
            u.endpoint_url,
          ]);
        }
        naiveStampMs = now() - started;
        await q.query('ROLLBACK');
      } finally {
        await q.release();
      }

      // the same 250 ready endpoints whatever the table size, nothing else due
      await ds.query(
        `UPDATE deployments SET state = 'failed'
          WHERE state = 'ready' AND endpoint_kind = 'node_port'
            AND id NOT IN (SELECT id FROM deployments WHERE state = 'ready' AND endpoint_kind = 'node_port' ORDER BY id LIMIT $1)`,
        [FIXED_READY],
      );
      await ds.query(`UPDATE attempts SET last_heartbeat_at = now(), started_at = now() - interval '5 minutes' WHERE status = 'running'`);
      await ds.query(`VACUUM ANALYZE deployments`);
      await ds.query(`VACUUM ANALYZE attempts`);
      const fixed = await tick();

      const size: SweepSize = {
        deployments: n,
        readyEndpoints: n / 4,
        runningAttempts: running,
        nothingDue: { ticksMs, medianMs: round(median(ticksMs.slice(1)), 2), maxMs: round(Math.max(...ticksMs), 2), statements },
        tableScanMs: round(median(scans), 2),
        work,
        probeFloorMs: round(probeFloorMs, 1),
        naiveStampMs: round(naiveStampMs, 1),
        fixedWork: { ...fixed, readyEndpoints: FIXED_READY },
      };
      log(`sweep ${n}: ${JSON.stringify(size)}`);
      out.push(size);
    }
  } finally {
    await endpoints.stop();
    await producer.close();
    await ds.destroy();
  }
  return { probeConcurrency: PROBE_CONCURRENCY, shardSize: DEFAULT_SHARD_SIZE, sizes: out };
}

/**
 * `n` deployments in four kinds, with nothing due: node_port on loopback but `failed` (made `ready` by
 * `makeWork`), ready cluster_dns (never probed), pending without endpoint, unknown node_port (never probed);
 * one attempt each, 1% running with a fresh heartbeat.
 */
async function seed(ds: DataSource, n: number, ports: readonly number[]): Promise<void> {
  await ds.query(`TRUNCATE deployments, attempts, state_transitions, outbox, processed_events`);
  await ds.query(
    `INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, last_ready_at, state_changed_at)
     SELECT gen_random_uuid(), 'd-' || i,
            (ARRAY['failed', 'ready', 'pending', 'unknown'])[1 + i % 4], 3,
            CASE i % 4 WHEN 0 THEN 'http://127.0.0.1:' || ($2::int[])[1 + (i / 4) % cardinality($2::int[])] || '/d/' || i
                       WHEN 1 THEN 'http://svc-' || i || '.ns.svc.cluster.local:8080'
                       WHEN 3 THEN 'http://10.0.' || (i % 250) || '.1:30080' END,
            CASE i % 4 WHEN 0 THEN 'node_port' WHEN 1 THEN 'cluster_dns' WHEN 3 THEN 'node_port' END,
            now() - interval '60 seconds', now() - interval '1 hour'
       FROM generate_series(1, $1::int) AS i`,
    [n, ports],
  );
  await ds.query(
    `INSERT INTO attempts (id, deployment_id, number, status, started_at, last_heartbeat_at, ended_at)
     SELECT gen_random_uuid(), id, 1, CASE WHEN rn % 100 = 0 THEN 'running' ELSE 'succeeded' END,
            now() - interval '5 minutes', now() - interval '10 seconds', CASE WHEN rn % 100 = 0 THEN NULL ELSE now() END
       FROM (SELECT id, row_number() OVER () AS rn FROM deployments) AS d`,
  );
  await ds.query(`VACUUM ANALYZE deployments`);
  await ds.query(`VACUUM ANALYZE attempts`);
}

/** A quarter of the deployments become ready node_port endpoints; 10% of running attempts stop heartbeating, 5% pass their deadline. */
async function makeWork(ds: DataSource, n: number): Promise<{ orphaned: number; expired: number }> {
  await ds.query(`UPDATE deployments SET state = 'ready' WHERE state = 'failed' AND endpoint_kind = 'node_port'`);
  const orphaned = Math.max(1, n / 1000);
  const expired = Math.max(1, n / 2000);
  await ds.query(
    `UPDATE attempts SET last_heartbeat_at = now() - interval '5 minutes'
      WHERE id IN (SELECT id FROM attempts WHERE status = 'running' ORDER BY id LIMIT $1)`,
    [orphaned],
  );
  await ds.query(
    `UPDATE attempts SET started_at = now() - interval '1 hour'
      WHERE id IN (SELECT id FROM attempts WHERE status = 'running' ORDER BY id DESC LIMIT $1)`,
    [expired],
  );
  await ds.query(`VACUUM ANALYZE deployments`);
  await ds.query(`VACUUM ANALYZE attempts`);
  return { orphaned, expired };
}
