/**
 * Scenario 8 (issue 29): consumers of one group over a partitioned stream. One workload of many deployments, their
 * transitions interleaved as in a real fleet (every deployment's v1, then every v2, ...), is appended to the stream's
 * partitions in every row (the same deployments, a fresh stream each time) and drained by `TransitionConsumer`s of
 * one group (in this process, sharing one `VersionStore` as the README advises) whose handler takes `handlerMs`.
 * Per row: entries/s from the first append to the last handler call, the busiest consumer's share of the entries
 * (with ownership fixed during a row, the speed-up over one consumer cannot exceed entries / that share: how
 * evenly the deployments hash over the partitions bounds it), versions never handed to the handler, and handler
 * calls with a lower version after a higher one for the same deployment (both must be 0).
 *
 * Then a rebalance under load: a fifth consumer joining four, and (on a fresh stream) one of four, running in a
 * process of its own (bench/fixtures/transition-consumer), SIGKILLed while a handler call is in flight. Ownership is
 * read from the partitions' leases in Redis, as every consumer of the group sees it.
 */
import { randomUUID } from 'node:crypto';
import IORedis from 'ioredis';
import { memoryVersionStore, TransitionConsumer, type TransitionEntry } from '../../src/streams/consumer';
import { fairShare, leaseKey, leaseOwner } from '../../src/streams/leases';
import { partitionKey, partitionKeys, partitionOf, recordPartitions } from '../../src/streams/partitions';
import { sleep } from '../../src/util';
import { MeasuredProcess } from '../lib/child';
import { log, round } from '../lib/common';
import type { BenchServices } from '../lib/services';

export interface ConsumersOptions {
  readonly partitions: readonly number[];
  readonly consumers: readonly number[];
  readonly deployments: number;
  readonly versions: number;
  readonly handlerMs: number;
  readonly leaseMs: number;
}

export interface ConsumersRow {
  readonly partitions: number;
  readonly consumers: number;
  readonly entries: number;
  readonly seconds: number;
  readonly entriesPerSec: number;
  /** consumers that handled at least one entry */
  readonly active: number;
  /** the most entries one consumer handled: entries / busiest is the most this row can gain over one consumer */
  readonly busiest: number;
  readonly neverHandled: number;
  readonly outOfOrder: number;
}

export interface RebalanceRow {
  readonly event: string;
  /** from the event until every partition's lease is held by a live consumer, each at its fair share */
  readonly settledMs: number;
  /**
   * entries the departed consumer had read and not acknowledged when it was killed (its pending entries, which the
   * next owners take over first); null for a join, where a partition is handed over only after what was read on it
   * is acknowledged
   */
  readonly pendingAtEvent: number | null;
  /** entries that reached a handler, or the shared version check, a second time (at least once) */
  readonly redelivered: number;
  readonly neverHandled: number;
  readonly outOfOrder: number;
}

export interface ConsumersResult {
  readonly handlerMs: number;
  readonly leaseMs: number;
  readonly deployments: number;
  readonly versions: number;
  /** entries per partition of the workload with 16 partitions (the same in every 16-partition row) */
  readonly perPartition: readonly number[];
  readonly rows: readonly ConsumersRow[];
  readonly rebalance: readonly RebalanceRow[];
}

const GROUP = 'bench';
const REBALANCE_PARTITIONS = 16;

/** What the handlers saw, in call order, whichever process they ran in. */
class Audit {
  private readonly last = new Map<string, number>();
  private readonly calls = new Map<string, number>();
  private readonly seen = new Set<string>();
  private readonly inFlight = new Set<string>();
  readonly byConsumer = new Map<string, number>();
  outOfOrder = 0;
  /** handler calls for an entry already handed to a handler */
  repeated = 0;

  called(consumer: string, deploymentId: string, version: number): void {
    const previous = this.last.get(deploymentId) ?? 0;
    if (version < previous) this.outOfOrder++;
    this.last.set(deploymentId, Math.max(previous, version));
    const key = `${deploymentId}:${version}`;
    const calls = this.calls.get(key) ?? 0;
    if (calls > 0) this.repeated++;
    this.calls.set(key, calls + 1);
    this.inFlight.add(consumer);
  }

  done(consumer: string, deploymentId: string, version: number): void {
    this.seen.add(`${deploymentId}:${version}`);
    this.inFlight.delete(consumer);
    this.byConsumer.set(consumer, (this.byConsumer.get(consumer) ?? 0) + 1);
  }

  handler(name: string, handlerMs: number): (e: TransitionEntry) => Promise<void> {
    return async (e) => {
      this.called(name, e.deploymentId, e.version);
      await sleep(handlerMs);
      this.done(name, e.deploymentId, e.version);
    };
  }

  /** Whether `consumer` is inside a handler call (as far as its reports have arrived). */
  busy(consumer: string): boolean {
    return this.inFlight.has(consumer);
  }

  get handled(): number {
    return this.seen.size;
  }

  neverHandled(deployments: readonly string[], versions: number): number {
    let missing = 0;
    for (const d of deployments) for (let v = 1; v <= versions; v++) if (!this.seen.has(`${d}:${v}`)) missing++;
    return missing;
  }
}

/** Every deployment's versions from..to, interleaved, each on its partition. */
async function append(
  redis: IORedis,
  streamKey: string,
  partitions: number,
  deployments: readonly string[],
  from: number,
  to: number,
): Promise<void> {
  const pipeline = redis.pipeline();
  for (let v = from; v <= to; v++) {
    for (const d of deployments) {
      pipeline.xadd(
        partitionKey(streamKey, partitionOf(d, partitions), partitions),
        '*',
        'type',
        'state_transition',
        'deploymentId',
        d,
        'version',
        String(v),
        'to',
        'pending',
        'reason',
        'bench',
      );
    }
  }
  await pipeline.exec();
}

async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`consumers scenario: timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** Each partition's lease holder as Redis has it (the consumer's name), null where the lease is free. */
async function leaseHolders(redis: IORedis, streamKey: string, partitions: number): Promise<Array<string | null>> {
  const tokens = await redis.mget(...partitionKeys(streamKey, partitions).map((key) => leaseKey(key, GROUP)));
  return tokens.map((t) => (t === null ? null : leaseOwner(t)));
}

/**
 * Whether every partition's lease is held by one of `live`, none above its fair share (the consumers' own rule):
 * with P at least the number of consumers that is each at its share; with fewer, one active and the rest standing by.
 */
async function sharedOut(redis: IORedis, streamKey: string, partitions: number, live: readonly string[]): Promise<boolean> {
  const holders = await leaseHolders(redis, streamKey, partitions);
  if (holders.some((h) => h === null || !live.includes(h))) return false;
  const members = [...live].sort();
  return members.every((m) => holders.filter((h) => h === m).length <= fairShare(members, m, partitions));
}

/** Entries read and not acknowledged by `consumer`, over every partition. */
async function pendingOf(redis: IORedis, streamKey: string, partitions: number, consumer: string): Promise<number> {
  let sum = 0;
  for (const key of partitionKeys(streamKey, partitions)) {
    const summary = (await redis.xpending(key, GROUP)) as [number, string | null, string | null, Array<[string, string]> | null];
    for (const [name, count] of summary[3] ?? []) if (name === consumer) sum += Number(count);
  }
  return sum;
}

export async function runConsumers(services: BenchServices, options: ConsumersOptions): Promise<ConsumersResult> {
  const redis = new IORedis(services.redisUrl, { maxRetriesPerRequest: null });
  const rows: ConsumersRow[] = [];
  const open: TransitionConsumer[] = [];
  let shared = memoryVersionStore();
  const start = (streamKey: string, name: string, audit: Audit): TransitionConsumer => {
    const c = new TransitionConsumer({
      redis: services.redisUrl,
      streamKey,
      group: GROUP,
      consumer: name,
      startId: '0',
      blockMs: 500,
      leaseMs: options.leaseMs,
      versions: shared,
      handler: audit.handler(name, options.handlerMs),
    });
    open.push(c);
    c.run().catch((err: unknown) => log(`consumers: ${name} stopped: ${err instanceof Error ? err.message : String(err)}`));
    return c;
  };
  const entries = options.deployments * options.versions;
  // one workload for every row: the rows differ only in partitions and consumers
  const deployments = Array.from({ length: options.deployments }, () => randomUUID());
  const perPartition = Array.from({ length: REBALANCE_PARTITIONS }, () => 0);
  for (const d of deployments) {
    const n = partitionOf(d, REBALANCE_PARTITIONS);
    perPartition[n] = (perPartition[n] ?? 0) + options.versions;
  }
  log(
    `consumers: ${entries} entries over ${options.deployments} deployments; per partition of 16: min ${Math.min(...perPartition)}, max ${Math.max(...perPartition)}`,
  );
  try {
    for (const partitions of options.partitions) {
      for (const count of options.consumers) {
        shared = memoryVersionStore();
        const streamKey = `${services.prefix(`consumers-${partitions}-${count}`)}:transitions`;
        await recordPartitions(redis, streamKey, partitions);
        const audit = new Audit();
        const names = Array.from({ length: count }, (_, i) => `c${i + 1}`);
        for (const name of names) start(streamKey, name, audit);
        await until('the partitions shared out', () => sharedOut(redis, streamKey, partitions, names), 60_000);
        const t0 = performance.now();
        await append(redis, streamKey, partitions, deployments, 1, options.versions);
        await until(`${entries} entries handled`, () => audit.handled >= entries, 600_000);
        const seconds = (performance.now() - t0) / 1000;
        const row: ConsumersRow = {
          partitions,
          consumers: count,
          entries,
          seconds: round(seconds, 2),
          entriesPerSec: round(entries / seconds),
          active: audit.byConsumer.size,
          busiest: Math.max(...audit.byConsumer.values()),
          neverHandled: audit.neverHandled(deployments, options.versions),
          outOfOrder: audit.outOfOrder,
        };
        rows.push(row);
        log(
          `consumers: P=${partitions} consumers=${count}: ${row.entriesPerSec} entries/s, busiest ${row.busiest} of ${entries}, ${row.active} active, never handled ${row.neverHandled}, out of order ${row.outOfOrder}`,
        );
        await Promise.all(open.splice(0).map((c) => c.close()));
      }
    }
    const rebalance: RebalanceRow[] = [];
    for (const event of ['a consumer joins', 'a consumer is SIGKILLed'] as const) {
      shared = memoryVersionStore();
      rebalance.push(await runRebalance(services, redis, options, event, start));
      await Promise.all(open.splice(0).map((c) => c.close()));
    }
    return {
      handlerMs: options.handlerMs,
      leaseMs: options.leaseMs,
      deployments: options.deployments,
      versions: options.versions,
      perPartition,
      rows,
      rebalance,
    };
  } finally {
    await Promise.all(open.splice(0).map((c) => c.close()));
    redis.disconnect();
  }
}

/**
 * Under load (16 partitions, 4 consumers, the workload appended at once, a quarter of it handled): a fifth consumer
 * joins; or one of the four, a process of its own, is SIGKILLed while a handler call is in flight. Times from the
 * event until every partition's lease is held by a live consumer at its fair share; redeliveries; completeness and
 * order over the whole run.
 */
async function runRebalance(
  services: BenchServices,
  redis: IORedis,
  options: ConsumersOptions,
  event: 'a consumer joins' | 'a consumer is SIGKILLed',
  start: (streamKey: string, name: string, audit: Audit) => TransitionConsumer,
): Promise<RebalanceRow> {
  const partitions = REBALANCE_PARTITIONS;
  const entries = options.deployments * options.versions;
  const streamKey = `${services.prefix(`rebalance-${event === 'a consumer joins' ? 'join' : 'kill'}`)}:transitions`;
  await recordPartitions(redis, streamKey, partitions);
  const audit = new Audit();
  const inProcess = ['r1', 'r2', 'r3'].map((name) => start(streamKey, name, audit));
  let victim: MeasuredProcess | null = null;
  try {
    if (event === 'a consumer joins') {
      inProcess.push(start(streamKey, 'r4', audit));
    } else {
      victim = await MeasuredProcess.start({
        label: 'consumers-victim',
        args: ['dist/bench/fixtures/transition-consumer.js'],
        env: {
          REDIS_URL: services.redisUrl,
          BENCH_STREAM_KEY: streamKey,
          BENCH_GROUP: GROUP,
          BENCH_CONSUMER: 'r4',
          BENCH_HANDLER_MS: String(options.handlerMs),
          BENCH_LEASE_MS: String(options.leaseMs),
          BENCH_BLOCK_MS: '500',
        },
        ready: { kind: 'json' },
      });
      victim.onMessage((m) => {
        for (const kind of ['call', 'done'] as const) {
          const at = m[kind];
          if (!Array.isArray(at) || typeof at[0] !== 'string' || typeof at[1] !== 'number') continue;
          if (kind === 'call') audit.called('r4', at[0], at[1]);
          else audit.done('r4', at[0], at[1]);
        }
      });
    }
    const all = ['r1', 'r2', 'r3', 'r4'];
    await until('the partitions shared out', () => sharedOut(redis, streamKey, partitions, all), 60_000);
    const deployments = Array.from({ length: options.deployments }, () => randomUUID());
    await append(redis, streamKey, partitions, deployments, 1, options.versions);
    await until('a quarter handled', () => audit.handled >= entries / 4, 600_000);
    let live: string[];
    let pendingAtEvent: number | null = null;
    let t0: number;
    if (victim === null) {
      live = [...all, 'r5'];
      t0 = performance.now();
      inProcess.push(start(streamKey, 'r5', audit));
    } else {
      live = ['r1', 'r2', 'r3'];
      await until('a handler call in flight in the process to kill', () => audit.busy('r4'), 60_000);
      t0 = performance.now();
      await victim.kill();
      // dead: what it read and did not acknowledge stays as it is until its leases expire and the next owners take it
      pendingAtEvent = await pendingOf(redis, streamKey, partitions, 'r4');
    }
    await until('every partition owned again', () => sharedOut(redis, streamKey, partitions, live), 120_000);
    const settledMs = Math.round(performance.now() - t0);
    await until(`${entries} entries handled`, () => audit.handled >= entries, 600_000);
    const row: RebalanceRow = {
      event,
      settledMs,
      pendingAtEvent,
      redelivered: audit.repeated + inProcess.reduce((sum, c) => sum + c.dropped, 0),
      neverHandled: audit.neverHandled(deployments, options.versions),
      outOfOrder: audit.outOfOrder,
    };
    log(
      `consumers: rebalance, ${event}: every partition owned again after ${settledMs} ms (lease ${options.leaseMs} ms), pending at the event ${pendingAtEvent ?? '-'}, redelivered ${row.redelivered}, never handled ${row.neverHandled}, out of order ${row.outOfOrder}`,
    );
    return row;
  } finally {
    await victim?.kill();
  }
}

export function consumersMarkdown(r: ConsumersResult): string[] {
  const out: string[] = [];
  const entries = r.deployments * r.versions;
  out.push(`### 8. Consumers of one group (handler ${r.handlerMs} ms, one shared VersionStore, lease ${r.leaseMs} ms)`);
  out.push('');
  const mean = entries / r.perPartition.length;
  out.push(
    `${entries} entries: ${r.deployments} deployments x ${r.versions} versions, interleaved, the same deployments in every row. Over 16 partitions: ` +
      `${Math.min(...r.perPartition)} to ${Math.max(...r.perPartition)} entries per partition (mean ${round(mean, 1)}, busiest ${round(Math.max(...r.perPartition) / mean, 2)} x the mean). ` +
      "The busiest consumer's share of the entries bounds the speed-up over one consumer (ideal: entries / its entries).",
  );
  out.push('');
  out.push(
    "| partitions | consumers | entries/s | vs 1 consumer | busiest consumer's share (ideal speed-up) | of ideal | consumers active | versions never handled | out-of-order handler calls |",
  );
  out.push('|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
  for (const row of r.rows) {
    const one = r.rows.find((x) => x.partitions === row.partitions && x.consumers === 1);
    const speedUp = one === undefined ? null : row.entriesPerSec / one.entriesPerSec;
    const ideal = row.entries / row.busiest;
    out.push(
      `| ${row.partitions} | ${row.consumers} | ${row.entriesPerSec} | ${speedUp === null ? '–' : `${round(speedUp, 2)} x`} | ` +
        `${round((100 * row.busiest) / row.entries, 1)}% (${round(ideal, 2)} x) | ${speedUp === null ? '–' : `${Math.round((100 * speedUp) / ideal)}%`} | ` +
        `${row.active} | ${row.neverHandled} | ${row.outOfOrder} |`,
    );
  }
  out.push('');
  if (r.rebalance.length > 0) {
    out.push(
      `Rebalance under load (16 partitions, 4 consumers, a quarter handled; the SIGKILLed consumer runs in a process of its own, killed while a handler call is in flight; lease ${r.leaseMs} ms):`,
    );
    out.push('');
    out.push(
      `| event | every partition owned again after (lease ${r.leaseMs} ms) | entries pending at the event | entries redelivered | versions never handled | out-of-order handler calls |`,
    );
    out.push('|---|---:|---:|---:|---:|---:|');
    for (const row of r.rebalance) {
      out.push(
        `| ${row.event} | ${row.settledMs} ms | ${row.pendingAtEvent ?? '–'} | ${row.redelivered} | ${row.neverHandled} | ${row.outOfOrder} |`,
      );
    }
    out.push('');
  }
  return out;
}

/** The issue's targets: with 16 partitions 4 consumers >= 3.5 x one, 8 >= 6 x; nothing skipped or out of order. */
export function consumersTargets(
  r: ConsumersResult,
): Array<{ id: string; target: string; measured: string; ratio: number | null; met: boolean | null }> {
  const row = (consumers: number) => r.rows.find((x) => x.partitions === 16 && x.consumers === consumers);
  const one = row(1)?.entriesPerSec;
  const out = [];
  for (const [consumers, factor] of [
    [4, 3.5],
    [8, 6],
  ] as const) {
    const many = row(consumers);
    if (one === undefined || many === undefined) continue;
    out.push({
      id: `consumers-${consumers}`,
      target: `${consumers} consumers of one group (16 partitions) >= ${factor} x one consumer (issue 29)`,
      measured: `${many.entriesPerSec} vs ${one} entries/s = ${round(many.entriesPerSec / one, 2)} x (ideal for this workload's spread over the partitions: ${round(many.entries / many.busiest, 2)} x)`,
      ratio: round(many.entriesPerSec / one / factor, 2),
      met: many.entriesPerSec >= factor * one,
    });
  }
  const faults = [...r.rows, ...r.rebalance].reduce((sum, x) => sum + x.neverHandled + x.outOfOrder, 0);
  out.push({
    id: 'consumers-order',
    target: 'consumers: versions never handled 0 and out-of-order handler calls 0 in every row (issue 29)',
    measured: `${faults}`,
    ratio: null,
    met: faults === 0,
  });
  return out;
}
