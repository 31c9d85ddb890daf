import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { randomUUID } from 'node:crypto';
import * as path from 'node:path';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { Client } from 'pg';
import { tail } from '../../src/cli/tail';
import { CursorError } from '../../src/errors';
import { createLogger } from '../../src/log';
import { TransitionService } from '../../src/services/transitions';
import { parseEntry, TransitionConsumer, type TransitionEntry } from '../../src/streams/consumer';
import { OutboxRelay } from '../../src/streams/outbox-relay';
import {
  layoutKey,
  partitionKey,
  partitionKeys,
  partitionOf,
  partitionsRecordKey,
  recordPartitions,
  repartitionsKey,
} from '../../src/streams/partitions';
import { repartition, type RepartitionOutcome } from '../../src/streams/repartition';
import { StreamFollower } from '../../src/streams/stream-follower';
import { xinfoGroups } from '../../src/streams/stream-stats';
import { WatchHub, type WatchEnd } from '../../src/streams/watch-hub';
import { repoRoot } from '../../src/util';
import { forgetOutbox, openTestDatabase, type TestDatabase } from '../helpers/db';
import { applyVersions } from '../helpers/lifecycle';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

/**
 * `fleet streams repartition` (issue 29 item 5) against a live fleet: relays, a transition service and consumers of
 * one group, real Redis and PostgreSQL.
 */
const CONSUMER = path.join(repoRoot(), 'examples', 'python', 'consume_transitions.py');
/** Debian's python3-redis is installed for Debian's interpreter; PYTHON names another one. */
const PYTHON = process.env.PYTHON ?? (fs.existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3');

describe('changing the number of partitions of a live fleet', function () {
  this.timeout(180_000);
  let db: TestDatabase;
  let service: TransitionService;
  let prefix: string;
  let streamKey: string;
  let redis: IORedis;
  const closers: Array<() => Promise<void>> = [];

  before(async () => {
    db = await openTestDatabase(8);
    service = new TransitionService({ dataSource: db.dataSource });
    redis = testRedis();
  });
  after(async () => {
    redis.disconnect();
    await db?.close();
  });
  beforeEach(async () => {
    prefix = uniquePrefix();
    streamKey = `${prefix}:transitions`;
    // every test has a stream of its own over the one database: earlier tests' rows are not pending
    await forgetOutbox(db);
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    await dropPrefix(prefix);
  });

  function relay(partitions: number, options: Partial<ConstructorParameters<typeof OutboxRelay>[0]> = {}): OutboxRelay {
    const r = new OutboxRelay({ databaseUrl: db.url, redis: testEnv().redisUrl, streamKey, partitions, standbyRetryMs: 100, ...options });
    closers.push(() => r.close());
    r.start();
    return r;
  }

  /**
   * `timeoutMs` bounds the wait for the groups; the relay's hand-over of its lock gets 30 s whatever it is (a refusal
   * for groups behind must not turn into one for the lock on a busy machine)
   */
  function run(to: number, timeoutMs = 30_000, report: (line: string) => void = () => undefined): Promise<RepartitionOutcome> {
    return repartition({ databaseUrl: db.url, redis, streamKey, to, timeoutMs, lockTimeoutMs: 30_000, pollMs: 50, report });
  }

  /** The versions applied so far per deployment; `next` applies the next one of one (`applyVersions`). */
  class Deployments {
    readonly applied = new Map<string, number>();
    constructor(readonly ids: readonly string[]) {}

    async next(id: string): Promise<void> {
      const v = (this.applied.get(id) ?? 0) + 1;
      await applyVersions(service, id, v, v);
      this.applied.set(id, v);
    }

    /** `count` versions of every deployment, one deployment after another (v1 of each, then v2 of each, ...) */
    async each(count: number): Promise<void> {
      for (let i = 0; i < count; i++) for (const id of this.ids) await this.next(id);
    }

    get total(): number {
      return [...this.applied.values()].reduce((a, b) => a + b, 0);
    }
  }

  /** What the handlers saw: per deployment, the versions in handler-call order. */
  class Audit {
    readonly versions = new Map<string, number[]>();
    see(e: TransitionEntry): void {
      this.versions.set(e.deploymentId, [...(this.versions.get(e.deploymentId) ?? []), e.version]);
    }
    count(): number {
      return [...this.versions.values()].reduce((sum, v) => sum + v.length, 0);
    }
    /** every version of every deployment exactly once, in increasing order */
    expectExactly(applied: ReadonlyMap<string, number>, who: string): void {
      for (const [id, last] of applied) {
        expect(this.versions.get(id) ?? [], `${who}: ${id}`).to.deep.equal(Array.from({ length: last }, (_, i) => i + 1));
      }
    }
  }

  function consumer(name: string, audit: Audit, options: Partial<ConstructorParameters<typeof TransitionConsumer>[0]> = {}): TransitionConsumer {
    const c = new TransitionConsumer({
      redis: testEnv().redisUrl,
      streamKey,
      group: 'g',
      consumer: name,
      startId: '0',
      blockMs: 200,
      batchSize: 20,
      leaseMs: 1000,
      // each its own memory of versions (the default): an entry delivered twice reaches a handler twice
      handler: async (e) => {
        audit.see(e);
        await new Promise((resolve) => setImmediate(resolve));
      },
      ...options,
    });
    closers.push(() => c.close());
    void c.run();
    return c;
  }

  async function entriesOn(key: string): Promise<TransitionEntry[]> {
    return ((await redis.xrange(key, '-', '+')) as Array<[string, string[]]>).map(([id, fields]) => parseEntry(id, fields));
  }

  async function unpublished(): Promise<number> {
    const [row] = await db.dataSource.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM outbox WHERE published_at IS NULL`);
    return Number(row?.n);
  }

  it('1 -> 4 -> 8 -> 2 under a steady trickle: every consumer and a tail see every version once, in order per deployment', async () => {
    await recordPartitions(redis, streamKey, 1);
    // two relays, as in a fleet: whichever leads hands its lock over, and either may lead afterwards
    relay(1);
    relay(1);
    const fleet = new Deployments(Array.from({ length: 24 }, () => randomUUID()));
    const audit = new Audit();
    ['c1', 'c2', 'c3'].map((name) => consumer(name, audit));
    const tailed = new Audit();
    let stopTail: () => void = () => undefined;
    const tailDone = tail({
      redisUrl: testEnv().redisUrl,
      streamKey,
      json: true,
      write: (line) => tailed.see(JSON.parse(line) as TransitionEntry),
      stop: new Promise<void>((resolve) => (stopTail = resolve)),
    });
    closers.push(async () => {
      stopTail();
      await tailDone.catch(() => undefined);
    });
    await waitFor('the consumers in the group', async () => ((await redis.exists(streamKey)) === 1 ? true : undefined));

    // the trickle: two writers, each through its half of the deployments, until told to stop
    let trickling = true;
    const trickle = [0, 1].map(async (half) => {
      const mine = fleet.ids.filter((_, i) => i % 2 === half);
      for (let i = 0; trickling; i++) await fleet.next(mine[i % mine.length] ?? '');
    });
    const reports: string[] = [];
    for (const [to, after] of [
      [4, 100],
      [8, 250],
      [2, 400],
    ] as const) {
      await waitFor(`${after} transitions`, () => (fleet.total >= after ? true : undefined), 60_000);
      const outcome = await run(to, 60_000, (line) => reports.push(line));
      expect(outcome.kind, reports.join('\n')).to.equal('repartitioned');
      expect(await redis.get(partitionsRecordKey(streamKey))).to.equal(String(to));
      // a tail follows one repartition at a time (two while it looks away, and it stops: the next test): it has
      // followed this one once it printed what was applied up to now, some of which went to the new partitions
      const upTo = fleet.total;
      await waitFor(`the tail at ${upTo}`, () => (tailed.count() >= upTo ? true : undefined), 60_000);
    }
    await waitFor('more transitions on 2 partitions', () => (fleet.total >= 500 ? true : undefined), 60_000);
    trickling = false;
    await Promise.all(trickle);

    const total = fleet.total;
    await waitFor(`all ${total} handled`, () => (audit.count() >= total && tailed.count() >= total ? true : undefined), 60_000);
    audit.expectExactly(fleet.applied, 'the group');
    tailed.expectExactly(fleet.applied, 'fleet tail');
    expect(audit.count()).to.equal(total);
    // the last transitions are on the 2 partitions, and nothing after each switch went to an old partition
    for (const id of fleet.ids) {
      const on = await entriesOn(partitionKey(streamKey, partitionOf(id, 2), 2));
      expect(on.filter((e) => e.deploymentId === id).map((e) => e.version)).to.include(fleet.applied.get(id));
    }
    expect(reports.join('\n')).to.contain("holding the outbox relays' lock");
  });

  it('refuses while a group stays behind, naming it and its partitions, and changes nothing', async () => {
    await recordPartitions(redis, streamKey, 4);
    relay(4);
    const fleet = new Deployments(Array.from({ length: 8 }, () => randomUUID()));
    await fleet.each(2);
    await waitFor('16 entries', async () =>
      (await Promise.all(partitionKeys(streamKey, 4).map((k) => redis.xlen(k)))).reduce((a, b) => a + b) >= 16 ? true : undefined,
    );
    // a group nobody reads: created on every partition, at the beginning
    for (const key of partitionKeys(streamKey, 4)) await redis.xgroup('CREATE', key, 'abandoned', '0', 'MKSTREAM');
    const reports: string[] = [];
    const outcome = await run(8, 300, (line) => reports.push(line));
    if (outcome.kind !== 'refused') throw new Error(`expected a refusal, got ${outcome.kind}`);
    expect(outcome.reason).to.equal('groups_behind');
    expect(outcome.message).to.contain('abandoned').and.contain('XGROUP DESTROY').and.contain('Nothing was changed');
    const behindOn = new Set(outcome.behind.map((b) => b.key));
    for (const id of fleet.ids) expect(outcome.message).to.contain(partitionKey(streamKey, partitionOf(id, 4), 4));
    expect([...behindOn].every((k) => partitionKeys(streamKey, 4).includes(k))).to.equal(true);
    expect(reports.join('\n')).to.contain('waiting for consumer groups').and.contain('group abandoned on');

    expect(await redis.get(partitionsRecordKey(streamKey))).to.equal('4');
    for (const key of partitionKeys(streamKey, 8)) expect(await redis.exists(layoutKey(key)), key).to.equal(0);
    // the lock is back with the relays: they publish on 4 partitions as before
    await fleet.each(1);
    await waitFor('24 entries on 4 partitions', async () =>
      (await Promise.all(partitionKeys(streamKey, 4).map((k) => redis.xlen(k)))).reduce((a, b) => a + b) >= 24 ? true : undefined,
    );
    for (const n of [4, 5, 6, 7]) expect(await redis.exists(partitionKey(streamKey, n, 8))).to.equal(0);

    // deleted deliberately, the group no longer holds it up
    for (const key of partitionKeys(streamKey, 4)) await redis.xgroup('DESTROY', key, 'abandoned');
    expect((await run(8)).kind).to.equal('repartitioned');
  });

  it('entries a consumer read and did not acknowledge (mid-handler, or it crashed) hold the switch until handled', async () => {
    await recordPartitions(redis, streamKey, 1);
    relay(1);
    const fleet = new Deployments(Array.from({ length: 4 }, () => randomUUID()));
    await fleet.each(2);
    await waitFor('8 entries', async () => ((await redis.xlen(streamKey)) >= 8 ? true : undefined));
    // a consumer of the group read everything, then died before acknowledging
    await redis.xgroup('CREATE', streamKey, 'g', '0');
    await redis.xreadgroup('GROUP', 'g', 'crashed', 'COUNT', '100', 'STREAMS', streamKey, '>');
    const outcome = await run(4, 300);
    if (outcome.kind !== 'refused') throw new Error(`expected a refusal, got ${outcome.kind}`);
    expect(outcome.behind).to.deep.equal([{ group: 'g', key: streamKey, unread: 0, pending: 8 }]);
    expect(await redis.get(partitionsRecordKey(streamKey))).to.equal('1');
    // a consumer of the group takes them over: handled, and the switch goes through
    const audit = new Audit();
    consumer('c1', audit);
    expect((await run(4)).kind).to.equal('repartitioned');
    await fleet.each(1);
    await waitFor('12 handled', () => (audit.count() >= 12 ? true : undefined));
    audit.expectExactly(fleet.applied, 'the group');
  });

  it('a group whose consumers were all stopped during the switch goes on from it on the new partitions', async () => {
    await recordPartitions(redis, streamKey, 4);
    relay(4);
    const fleet = new Deployments(Array.from({ length: 16 }, () => randomUUID()));
    const audit = new Audit();
    const first = consumer('c1', audit, { startId: '$' });
    await waitFor('the group on every partition', async () =>
      (await Promise.all(partitionKeys(streamKey, 4).map((k) => redis.exists(k)))).every((n) => n === 1) ? true : undefined,
    );
    await fleet.each(1);
    await waitFor('16 handled', () => (audit.count() >= 16 ? true : undefined));
    await first.close();
    expect((await run(8)).kind).to.equal('repartitioned');
    await fleet.each(1); // published to the 8 partitions while no consumer of the group runs
    await waitFor('every row published', async () => ((await unpublished()) === 0 ? true : undefined));
    consumer('c1', audit, { startId: '$' }); // started again as it was: new entries only, for a new group
    await waitFor('32 handled', () => (audit.count() >= 32 ? true : undefined));
    audit.expectExactly(fleet.applied, 'the group');
  });

  it('puts every layout back when it cannot switch the record after fencing the keys', async () => {
    await recordPartitions(redis, streamKey, 4);
    relay(4);
    const fleet = new Deployments(Array.from({ length: 8 }, () => randomUUID()));
    await fleet.each(1);
    await waitFor('8 entries', async () =>
      (await Promise.all(partitionKeys(streamKey, 4).map((k) => redis.xlen(k)))).reduce((a, b) => a + b) >= 8 ? true : undefined,
    );
    const key = partitionKey(streamKey, partitionOf(fleet.ids[0] ?? '', 4), 4);
    await redis.xgroup('CREATE', key, 'late', '0');
    await redis.hset(layoutKey(key), 'partitions', '4', 'since', '1-0', 'entries', '1'); // left by an earlier repartition
    // while the command waits for the group, another process records another number; then the group catches up
    const interference: { done: Promise<void> | null } = { done: null };
    const outcome = await run(8, 30_000, (line) => {
      if (!line.startsWith('waiting for consumer groups') || interference.done !== null) return;
      interference.done = (async () => {
        await redis.set(partitionsRecordKey(streamKey), '16');
        await redis.xgroup('SETID', key, 'late', '$');
      })();
    });
    await interference.done;
    if (outcome.kind !== 'refused') throw new Error(`expected a refusal, got ${outcome.kind}`);
    expect(outcome.reason).to.equal('record_changed');
    expect(await redis.hgetall(layoutKey(key))).to.deep.equal({ partitions: '4', since: '1-0', entries: '1' });
    for (const k of partitionKeys(streamKey, 8).filter((k) => k !== key)) expect(await redis.exists(layoutKey(k)), k).to.equal(0);
    // nor the group it had made on the new partitions
    for (const k of partitionKeys(streamKey, 8).slice(4)) expect(await xinfoGroups(redis, k), k).to.deep.equal([]);
  });

  it('a repartition stopped half-way holds the relays, saying so, until it is run again', async () => {
    await recordPartitions(redis, streamKey, 4);
    // killed after fencing the keys for 8, before the record
    for (const key of partitionKeys(streamKey, 8)) await redis.hset(layoutKey(key), 'partitions', '8');
    let logged = '';
    const r = relay(4, { logger: createLogger('warn', { write: (line: string) => void (logged += line) }) });
    const fleet = new Deployments(Array.from({ length: 8 }, () => randomUUID()));
    await fleet.each(1);
    await waitFor('the warning', () => (logged.includes('a `fleet streams repartition` stopped half-way: run it again') ? true : undefined));
    expect(r.publishedCount).to.equal(0);
    expect(await unpublished()).to.equal(8);
    expect((await run(8)).kind).to.equal('repartitioned');
    await waitFor('every row published', async () => ((await unpublished()) === 0 ? true : undefined));
    for (const id of fleet.ids) expect((await entriesOn(partitionKey(streamKey, partitionOf(id, 8), 8))).map((e) => e.deploymentId)).to.include(id);
  });

  it('says so and changes nothing when the number is already the recorded one', async () => {
    await recordPartitions(redis, streamKey, 4);
    const reports: string[] = [];
    expect(await run(4, 1000, (line) => reports.push(line))).to.deep.equal({ kind: 'unchanged', partitions: 4 });
    expect(reports).to.deep.equal([`the stream ${streamKey} has 4 partition(s) already: nothing to do`]);
    for (const key of partitionKeys(streamKey, 4)) expect(await redis.exists(layoutKey(key))).to.equal(0);
  });

  it('fences off a relay that lost its lock between its read and its append', async () => {
    await recordPartitions(redis, streamKey, 4);
    let hold: (() => void) | null = null;
    let held: () => void = () => undefined;
    const reading = new Promise<void>((resolve) => (held = resolve));
    const stale = relay(4, {
      beforeXadd: async () => {
        if (hold !== null) return;
        await new Promise<void>((resolve) => {
          hold = resolve;
          held();
        });
      },
    });
    await waitFor('a leader', () => (stale.isLeader ? true : undefined));
    const fleet = new Deployments(Array.from({ length: 16 }, () => randomUUID()));
    await fleet.each(1);
    await reading; // it read the rows, and waits before appending them
    // its session ends (cut off from PostgreSQL): its lock goes, and the repartition takes it
    const admin = new Client({ connectionString: db.url });
    await admin.connect();
    await admin.query(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'lifecycle-fleet-relay'`);
    await admin.end();
    expect((await run(8)).kind).to.equal('repartitioned');
    (hold as (() => void) | null)?.();
    // what it read goes out once a relay leads again, to the 8 partitions
    relay(8);
    await waitFor('every row published', async () => ((await unpublished()) === 0 ? true : undefined));
    for (const id of fleet.ids) {
      for (const key of partitionKeys(streamKey, 8)) {
        const versions = (await entriesOn(key)).filter((e) => e.deploymentId === id).map((e) => e.version);
        expect(versions, `${id} on ${key}`).to.deep.equal(key === partitionKey(streamKey, partitionOf(id, 8), 8) ? [1] : []);
      }
    }
  });

  it('after a switch the relay republishes what Redis lost of the new layout, never what an earlier layout wrote', async () => {
    await recordPartitions(redis, streamKey, 4);
    // on partition 1 under 4 and under 8: one that stays there, one that moves to 5
    const pick = (p4: number, p8: number): string => {
      for (;;) {
        const id = randomUUID();
        if (partitionOf(id, 4) === p4 && partitionOf(id, 8) === p8) return id;
      }
    };
    const [stays, moves] = [pick(1, 1), pick(1, 5)];
    const fleet = new Deployments([stays, moves]);
    const first = relay(4);
    await fleet.each(2);
    await waitFor('every row published', async () => ((await unpublished()) === 0 ? true : undefined));
    expect((await run(8)).kind).to.equal('repartitioned');
    await fleet.next(stays); // v3, under 8: on partition 1 after the boundary
    await fleet.next(moves); // v3, under 8: on partition 5
    await waitFor('every row published', async () => ((await unpublished()) === 0 ? true : undefined));
    await first.close();
    const p1 = partitionKey(streamKey, 1, 8);
    expect((await entriesOn(p1)).map((e) => `${e.deploymentId === stays ? 's' : 'm'}${e.version}`)).to.deep.equal(['s1', 'm1', 's2', 'm2', 's3']);
    // Redis loses the end of partition 1: stays v3 (new layout), moves v2 and stays v2 (the old one's)
    for (const [id] of (await redis.xrevrange(p1, '+', '-', 'COUNT', 3)) as Array<[string, string[]]>) await redis.xdel(p1, id);
    relay(8); // reconciles as it leads
    await waitFor('stays v3 again on partition 1', async () =>
      (await entriesOn(p1)).some((e) => e.deploymentId === stays && e.version === 3) ? true : undefined,
    );
    await fleet.next(moves); // v4: the relay is past its reconcile
    await waitFor('every row published', async () => ((await unpublished()) === 0 ? true : undefined));
    expect((await entriesOn(p1)).map((e) => `${e.deploymentId === stays ? 's' : 'm'}${e.version}`)).to.deep.equal(['s1', 'm1', 's3']);
    expect((await entriesOn(partitionKey(streamKey, 5, 8))).map((e) => e.version)).to.deep.equal([3, 4]);
  });

  it('republishes on the new partitions what Redis lost of the old layout before the switch (a restart while it waited)', async () => {
    const deploymentId = randomUUID();
    const fleet = new Deployments([deploymentId]);
    const first = relay(1);
    await fleet.each(3);
    await waitFor('every row published', async () => ((await unpublished()) === 0 ? true : undefined));
    await first.close(); // marks what it appended: v1..v3 are published, on the one stream
    // Redis loses its last writes (appendfsync everysec; a failover to a replica a little behind): v3 is gone, and
    // the groups' positions with it, so nothing looks behind
    const [lost] = (await redis.xrevrange(streamKey, '+', '-', 'COUNT', 1)) as Array<[string, string[]]>;
    await redis.xdel(streamKey, lost?.[0] ?? '');
    expect((await run(4)).kind).to.equal('repartitioned');
    relay(4);
    await fleet.next(deploymentId); // v4, after the switch
    await waitFor('every row published', async () => ((await unpublished()) === 0 ? true : undefined));
    // v3 was on no stream any more: it goes out on the deployment's new partition, before v4
    expect((await entriesOn(partitionKey(streamKey, partitionOf(deploymentId, 4), 4))).map((e) => e.version)).to.deep.equal([3, 4]);
  });

  it('a group made after the switch, and a tail from 0, start after what an earlier layout wrote on a key', async () => {
    await recordPartitions(redis, streamKey, 4);
    relay(4);
    const fleet = new Deployments(Array.from({ length: 16 }, () => randomUUID()));
    await fleet.each(2);
    await waitFor('every row published', async () => ((await unpublished()) === 0 ? true : undefined));
    expect((await run(8)).kind).to.equal('repartitioned');
    await fleet.each(2); // versions 3 and 4, under 8
    await waitFor('every row published', async () => ((await unpublished()) === 0 ? true : undefined));
    const audit = new Audit();
    consumer('late', audit, { group: 'late' });
    const tailed = new Audit();
    let stopTail: () => void = () => undefined;
    const tailDone = tail({
      redisUrl: testEnv().redisUrl,
      streamKey,
      from: '0',
      json: true,
      write: (line) => tailed.see(JSON.parse(line) as TransitionEntry),
      stop: new Promise<void>((resolve) => (stopTail = resolve)),
    });
    await waitFor('32 handled and tailed', () => (audit.count() >= 32 && tailed.count() >= 32 ? true : undefined));
    stopTail();
    await tailDone;
    for (const id of fleet.ids) {
      expect(audit.versions.get(id), `the group: ${id}`).to.deep.equal([3, 4]);
      expect(tailed.versions.get(id), `the tail: ${id}`).to.deep.equal([3, 4]);
    }
  });

  it('fleet tail without a group reads the old partitions to their end before the new ones', async () => {
    await recordPartitions(redis, streamKey, 4);
    const ids = Array.from({ length: 500 }, () => randomUUID());
    const append = async (v: number, partitions: number) => {
      const pipeline = redis.pipeline();
      for (const id of ids) {
        pipeline.xadd(
          partitionKey(streamKey, partitionOf(id, partitions), partitions),
          '*',
          'deploymentId',
          id,
          'version',
          String(v),
          'to',
          'pending',
        );
      }
      await pipeline.exec();
    };
    await append(1, 4);
    await append(2, 4);
    const tailed = new Audit();
    let stopTail: () => void = () => undefined;
    let switched: Promise<unknown> | null = null;
    const tailDone = tail({
      redisUrl: testEnv().redisUrl,
      streamKey,
      from: '0',
      json: true,
      write: (line) => {
        tailed.see(JSON.parse(line) as TransitionEntry);
        // the record changes once the tail has read its first 100 of 1,000 entries (as a repartition's last step)
        switched ??= redis.set(partitionsRecordKey(streamKey), '2');
      },
      stop: new Promise<void>((resolve) => (stopTail = resolve)),
    });
    closers.push(async () => {
      stopTail();
      await tailDone.catch(() => undefined);
    });
    await waitFor('the switch', () => switched ?? undefined);
    await append(3, 2);
    await waitFor('1,500 tailed', () => (tailed.count() >= 1500 ? true : undefined));
    for (const id of ids) expect(tailed.versions.get(id), id).to.deep.equal([1, 2, 3]);
  });

  it('the Python example follows a repartition, and a group it makes later starts at the boundary', async () => {
    await recordPartitions(redis, streamKey, 4);
    const ids = Array.from({ length: 20 }, () => randomUUID());
    const append = async (v: number, partitions: number) => {
      for (const id of ids) {
        const fields = [
          'type',
          'state_transition',
          'deploymentId',
          id,
          'version',
          String(v),
          'from',
          'pending',
          'to',
          'pending',
          'reason',
          'test',
          'eventId',
          `e-${v}`,
        ];
        await redis.xadd(partitionKey(streamKey, partitionOf(id, partitions), partitions), '*', ...fields);
      }
    };
    await append(1, 4);
    const python = (group: string, more: string[]) => {
      const child = spawn(PYTHON, [CONSUMER, '--prefix', prefix, '--group', group, '--start-id', '0', '--block-ms', '200', ...more], {
        env: { PATH: process.env.PATH, REDIS_URL: testEnv().redisUrl },
      });
      const out = {
        stdout: '',
        stderr: '',
        code: undefined as number | null | undefined,
        exited: new Promise<void>((resolve) => child.on('exit', resolve)),
      };
      child.on('exit', (code) => (out.code = code));
      child.stdout.on('data', (chunk: Buffer) => (out.stdout += chunk.toString()));
      child.stderr.on('data', (chunk: Buffer) => (out.stderr += chunk.toString()));
      closers.push(async () => {
        child.kill();
        await out.exited;
      });
      return out;
    };
    const versions = (stdout: string) => {
      const seen = new Map<string, number[]>();
      for (const line of stdout.split('\n').filter((l) => l !== '')) {
        const [id = '', v = ''] = line.split(' ');
        seen.set(id, [...(seen.get(id) ?? []), Number(v.slice(1))]);
      }
      return seen;
    };
    const following = python('py', ['--count', '60']);
    await waitFor('20 printed', () => (following.stdout.split('\n').length > 20 ? true : undefined));
    expect((await run(8)).kind).to.equal('repartitioned');
    await append(2, 8);
    await append(3, 8);
    expect(await waitFor('the follower to print 60 and exit', () => following.code)).to.equal(0);
    expect(following.stderr).to.contain('now has 8 partition(s) (was 4)');
    const seen = versions(following.stdout);
    for (const id of ids) expect(seen.get(id), id).to.deep.equal([1, 2, 3]);
    // a group made after the switch, from 0: only what the 8 partitions hold
    const late = python('py-late', ['--until-idle']);
    expect(await waitFor('the late group to read all and exit', () => late.code)).to.equal(0);
    const after = versions(late.stdout);
    for (const id of ids) expect(after.get(id), id).to.deep.equal([2, 3]);
  });

  it('fleet tail without a group stops, saying why, when it missed a whole layout', async () => {
    await recordPartitions(redis, streamKey, 4);
    let stopTail: () => void = () => undefined;
    let printed = 0;
    const tailDone = tail({
      redisUrl: testEnv().redisUrl,
      streamKey,
      from: '0',
      write: () => void printed++,
      stop: new Promise<void>((resolve) => (stopTail = resolve)),
    });
    closers.push(async () => {
      stopTail();
      await tailDone.catch(() => undefined);
    });
    const id = randomUUID();
    await redis.xadd(partitionKey(streamKey, partitionOf(id, 4), 4), '*', 'deploymentId', id, 'version', '1');
    await waitFor('the tail reading', () => (printed > 0 ? true : undefined));
    // 4 -> 8 -> 2 between two of its looks (as two repartitions' last steps)
    await redis
      .multi()
      .set(partitionsRecordKey(streamKey), '8')
      .incr(repartitionsKey(streamKey))
      .set(partitionsRecordKey(streamKey), '2')
      .incr(repartitionsKey(streamKey))
      .exec();
    const ended: { err?: unknown } = {};
    tailDone.then(
      () => (ended.err = null),
      (e: unknown) => (ended.err = e),
    );
    const err = await waitFor('the tail to stop', () => ended.err);
    expect(err).to.be.instanceOf(Error);
    expect((err as Error).message)
      .to.contain(`${streamKey} was repartitioned 2 times since this tail last looked`)
      .and.contain('start it again');
  });

  it('a cursor made before 2 -> 4 -> 2 is refused (repartitioned), never read as of the current layout', async () => {
    await recordPartitions(redis, streamKey, 2);
    relay(2);
    const fleet = new Deployments(Array.from({ length: 4 }, () => randomUUID()));
    const published = () => waitFor('every row published', async () => ((await unpublished()) === 0 ? true : undefined));
    await fleet.each(1);
    await published();
    const minted = new StreamFollower({ redis, streamKey });
    await minted.start('$');
    const cursor = minted.cursor(); // P = 2, never repartitioned
    await fleet.each(1);
    await published();
    expect((await run(4)).kind).to.equal('repartitioned');
    await fleet.each(1);
    await published();
    expect((await run(2)).kind).to.equal('repartitioned');
    await fleet.each(1);
    await published();

    // the follower (fleet tail --from, a watch's catch-up): the layouts in between cannot be put in order
    const refused = await new StreamFollower({ redis, streamKey }).start(cursor).then(
      () => null,
      (err: unknown) => err,
    );
    expect(refused, 'StreamFollower.start').to.be.instanceOf(CursorError);
    expect((refused as CursorError).reason).to.equal('repartitioned');
    expect((refused as CursorError).message).to.contain('the cursor is for 2 partition(s) after 0 repartition(s)');
    // a watch from it ends with a resync, having sent nothing
    const hub = new WatchHub({ streamKey, connect: () => testRedis() });
    closers.push(() => hub.close());
    const sent: string[] = [];
    const end = await new Promise<WatchEnd>((resolve) =>
      hub.subscribe({ after: cursor, onEntry: (entry) => sent.push(entry.streamId) > 0, onEnd: resolve }),
    );
    expect(end).to.deep.include({ reason: 'resync', resync: 'repartitioned' });
    expect(sent).to.deep.equal([]);

    // a cursor without `r` (what fleet tail printed before `r` existed) whose P matches is taken as of the current
    // layout: the limit of such old cursors (docs/contract.md), which cannot tell 2 -> 4 -> 2 from no repartition
    const current = new StreamFollower({ redis, streamKey });
    await current.start('$');
    const legacy = new StreamFollower({ redis, streamKey });
    await legacy.start(Buffer.from(JSON.stringify({ p: 2, ids: current.positions() })).toString('base64url'));
    expect(legacy.positions()).to.deep.equal(current.positions());
    expect(legacy.layout).to.deep.include({ partitions: 2, repartitions: 2 });
  });

  describe('the command', () => {
    const FLEET = path.join(repoRoot(), 'bin', 'fleet.js');
    function fleet(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
      const env = { PATH: process.env.PATH, REDIS_URL: testEnv().redisUrl, DATABASE_URL: db.url, FLEET_PREFIX: prefix };
      return new Promise((resolve) => {
        execFile(process.execPath, [FLEET, 'streams', 'repartition', ...args], { env, timeout: 30_000 }, (err, stdout, stderr) => {
          resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, stdout, stderr });
        });
      });
    }

    it('refuses bad --to and --timeout values with exit 2, naming the flag and the rule, changing nothing', async () => {
      await recordPartitions(redis, streamKey, 4);
      const cases: Array<[string[], string]> = [
        [[], '--to: required: the new number of partitions, a whole number from 1 to 1024'],
        [['--to', '0'], '--to: must be a whole number from 1 to 1024, got "0"'],
        [['--to', '1025'], '--to: must be a whole number from 1 to 1024, got "1025"'],
        [['--to', '2.5'], '--to: must be a whole number from 1 to 1024, got "2.5"'],
        [['--to', 'eight'], '--to: must be a whole number from 1 to 1024, got "eight"'],
        [['--to', '8', '--timeout', '0'], '--timeout: must be a number of seconds above 0 and at most 86400, got "0"'],
        [['--to', '8', '--timeout', 'soon'], '--timeout: must be a number of seconds above 0 and at most 86400, got "soon"'],
      ];
      const runs = await Promise.all(cases.map(([args]) => fleet(args)));
      runs.forEach((r, i) => {
        expect(r.code, r.stderr).to.equal(2);
        expect(r.stderr).to.contain(cases[i]?.[1]);
      });
      expect(await redis.get(partitionsRecordKey(streamKey))).to.equal('4');
      for (const key of partitionKeys(streamKey, 8)) expect(await redis.exists(layoutKey(key))).to.equal(0);
    });

    it('switches with exit 0, says when nothing is to do, and exits 1 naming a group that stays behind', async () => {
      await recordPartitions(redis, streamKey, 4);
      const same = await fleet(['--to', '4']);
      expect([same.code, same.stdout]).to.deep.equal([0, 'unchanged: 4 partition(s)\n']);
      const switched = await fleet(['--to', '2']);
      expect([switched.code, switched.stdout], switched.stderr).to.deep.equal([0, 'repartitioned: 4 -> 2 partition(s)\n']);
      expect(switched.stderr).to.contain('set FLEET_STREAM_PARTITIONS=2');
      await redis.xadd(partitionKey(streamKey, 1, 2), '*', 'type', 'state_transition');
      await redis.xgroup('CREATE', partitionKey(streamKey, 1, 2), 'behind', '0');
      const refused = await fleet(['--to', '8', '--timeout', '0.2']);
      expect(refused.code).to.equal(1);
      expect(refused.stderr).to.contain(
        `refused: consumer group(s) behind did not read and acknowledge everything within 0.2 s: group behind on ${partitionKey(streamKey, 1, 2)}`,
      );
      expect(await redis.get(partitionsRecordKey(streamKey))).to.equal('2');
    });
  });
});
