import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as path from 'node:path';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { encodeCursor, tail, TailCursorError } from '../../src/cli/tail';
import { ConfigError, ResyncRequiredError } from '../../src/errors';
import { fleetAclRules } from '../../src/redis/connection';
import { createLogger } from '../../src/log';
import { TransitionService } from '../../src/services/transitions';
import {
  compareIds,
  memoryVersionStore,
  parseEntry,
  TransitionConsumer,
  type TransitionConsumerOptions,
  type TransitionEntry,
  type VersionStore,
} from '../../src/streams/consumer';
import { leaseKey, leaseOwner } from '../../src/streams/leases';
import { OutboxRelay } from '../../src/streams/outbox-relay';
import { partitionKey, partitionKeys, partitionOf, partitionsRecordKey, recordPartitions } from '../../src/streams/partitions';
import { forgetOutbox, openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { applyVersions } from '../helpers/lifecycle';
import { ConsumerAudit as Audit, type AuditEvent } from '../helpers/consumer-audit';
import { TcpProxy } from '../helpers/proxy';
import { waitFor } from '../helpers/wait';
import { repoRoot } from '../../src/util';

async function readStream(redis: IORedis, key: string): Promise<TransitionEntry[]> {
  const raw = (await redis.xrange(key, '-', '+')) as Array<[string, string[]]>;
  return raw.map(([id, fields]) => parseEntry(id, fields));
}

describe('a partitioned transition stream', function () {
  this.timeout(120_000);
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
    // every test has a stream of its own over the one database: earlier tests' rows are neither pending nor traceable
    await forgetOutbox(db);
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    await dropPrefix(prefix);
  });

  function relay(partitions: number, options: Partial<ConstructorParameters<typeof OutboxRelay>[0]> = {}): OutboxRelay {
    const r = new OutboxRelay({ databaseUrl: db.url, redis: testEnv().redisUrl, streamKey, partitions, standbyRetryMs: 200, ...options });
    closers.push(() => r.close());
    r.start();
    return r;
  }

  async function lengths(partitions: number): Promise<number> {
    let total = 0;
    for (const key of partitionKeys(streamKey, partitions)) total += await redis.xlen(key);
    return total;
  }

  describe('the relay', () => {
    it('with 16 partitions appends each deployment to its partition, in version order, and records 16', async () => {
      relay(16);
      const deployments = Array.from({ length: 40 }, () => randomUUID());
      await Promise.all(deployments.map((id) => applyVersions(service, id, 1, 6)));
      await waitFor('240 entries', async () => ((await lengths(16)) >= 240 ? true : undefined), 30_000);

      expect(await redis.exists(streamKey)).to.equal(0); // nothing on the one-partition key
      expect(await redis.get(partitionsRecordKey(streamKey))).to.equal('16');
      const used = new Set<number>();
      for (const [n, key] of partitionKeys(streamKey, 16).entries()) {
        const entries = await readStream(redis, key);
        if (entries.length > 0) used.add(n);
        const byDeployment = new Map<string, number[]>();
        for (const e of entries) {
          expect(partitionOf(e.deploymentId, 16), `${e.deploymentId} on ${key}`).to.equal(n);
          byDeployment.set(e.deploymentId, [...(byDeployment.get(e.deploymentId) ?? []), e.version]);
        }
        for (const versions of byDeployment.values()) expect(versions).to.deep.equal([1, 2, 3, 4, 5, 6]);
      }
      expect(used.size).to.be.above(8);
      // each row is marked with its entry's id and partition
      await waitFor('every row marked', async () => {
        const [row] = await db.dataSource.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM outbox WHERE published_at IS NULL`);
        return Number(row?.n) === 0 ? true : undefined;
      });
      const marked = await db.dataSource.query<Array<{ deployment_id: string; stream_id: string }>>(
        `SELECT deployment_id, stream_id FROM outbox WHERE deployment_id = ANY($1::uuid[])`,
        [deployments],
      );
      for (const m of marked) expect(m.stream_id).to.match(new RegExp(`^\\d+-\\d+@${partitionOf(m.deployment_id, 16)}$`));
    });

    it('with one partition writes the one stream key as before, and records 1', async () => {
      relay(1);
      const id = randomUUID();
      await applyVersions(service, id, 1, 4);
      await waitFor('4 entries', async () => ((await redis.xlen(streamKey)) >= 4 ? true : undefined));
      expect((await readStream(redis, streamKey)).map((e) => e.version)).to.deep.equal([1, 2, 3, 4]);
      expect(await redis.get(partitionsRecordKey(streamKey))).to.equal('1');
      expect(await redis.exists(partitionKey(streamKey, 0, 2))).to.equal(0);
    });

    it('republishes what one partition lost before appending anything after the gap there', async () => {
      relay(4);
      const deployments: string[] = Array.from({ length: 8 }, () => randomUUID());
      for (const id of deployments) await applyVersions(service, id, 1, 4);
      await waitFor('32 entries', async () => ((await lengths(4)) >= 32 ? true : undefined));
      await waitFor('every row marked', async () => {
        const [row] = await db.dataSource.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM outbox WHERE published_at IS NULL`);
        return Number(row?.n) === 0 ? true : undefined;
      });
      // partition n loses its last 3 entries (a crash before fsync, a failover)
      const n = partitionOf(deployments[0] ?? '', 4);
      const key = partitionKey(streamKey, n, 4);
      const lost = (await redis.xrevrange(key, '+', '-', 'COUNT', 3)).map(([id]) => id);
      await redis.xdel(key, ...lost);
      // a new deployment in that partition
      let more: string = randomUUID();
      while (partitionOf(more, 4) !== n) more = randomUUID();
      await applyVersions(service, more, 1, 2);
      const mine = deployments.filter((d) => partitionOf(d, 4) === n);
      await waitFor('every version back on the partition', async () => {
        const entries = await readStream(redis, key);
        return [...mine, more].every((d) => new Set(entries.filter((e) => e.deploymentId === d).map((e) => e.version)).size === (d === more ? 2 : 4))
          ? true
          : undefined;
      });
      const entries = await readStream(redis, key);
      const firstNew = entries.findIndex((e) => e.deploymentId === more);
      const lastOld = entries.map((e) => mine.includes(e.deploymentId)).lastIndexOf(true);
      expect(lastOld).to.be.below(firstNew);
    });

    it("lets the fleet's ACL user (fleetAclRules) write a hash-tagged prefix's partitions and their leases", async () => {
      const tagged = `{${prefix}}`;
      const user = `${prefix}-acl`;
      await redis.call('ACL', 'SETUSER', user, 'reset', 'on', '>a-long-password-1', ...fleetAclRules(tagged));
      try {
        const key = partitionKey(`${tagged}:transitions`, 3, 16);
        expect(key).to.equal(`{${prefix}:p3}:transitions:3`);
        expect(await redis.call('ACL', 'DRYRUN', user, 'XADD', key, '*', 'a', 'b')).to.equal('OK');
        expect(await redis.call('ACL', 'DRYRUN', user, 'SET', `${key}:lease:g`, 'x')).to.equal('OK');
        expect(await redis.call('ACL', 'DRYRUN', user, 'GET', partitionsRecordKey(`${tagged}:transitions`))).to.equal('OK');
        expect(await redis.call('ACL', 'DRYRUN', user, 'HSET', `${key}:layout`, 'partitions', '16')).to.equal('OK');
        expect(String(await redis.call('ACL', 'DRYRUN', user, 'XADD', `{other:p3}:transitions:3`, '*', 'a', 'b'))).to.contain('no permissions');
        // another prefix that merely starts like a partition's tag (a second fleet on a shared cluster) is not the fleet's
        expect(String(await redis.call('ACL', 'DRYRUN', user, 'SET', `{${prefix}:prod}:anything`, 'x'))).to.contain('no permissions');
      } finally {
        await redis.call('ACL', 'DELUSER', user);
      }
    });

    it('refuses a number of partitions other than the recorded one at start, naming both and the procedure', async () => {
      await recordPartitions(redis, streamKey, 16);
      const err = await recordPartitions(redis, streamKey, 4).catch((e: unknown) => e);
      expect(err).to.be.instanceOf(ConfigError);
      expect((err as ConfigError).message)
        .to.contain('written with 16 partition(s)')
        .and.contain('but 4 are configured')
        .and.contain('set FLEET_STREAM_PARTITIONS=16')
        .and.contain('fleet streams repartition --to 4');
      expect(await redis.get(partitionsRecordKey(streamKey))).to.equal('16'); // nothing changed
      await recordPartitions(redis, streamKey, 16); // the same number is fine

      // a fleet from before partitions: its stream at the base key, no record, counts as 1
      const old = `${prefix}:old:transitions`;
      await redis.xadd(old, '*', 'type', 'state_transition');
      const before = await recordPartitions(redis, old, 8).catch((e: unknown) => e);
      expect((before as ConfigError).message)
        .to.contain('written with 1 partition(s)')
        .and.contain('but 8 are configured');
      expect(await redis.exists(partitionsRecordKey(old))).to.equal(0);
    });

    it('a running relay publishes to the recorded number of partitions, warning that its own is stale', async () => {
      // the record changed under it (`fleet streams repartition`): it follows the record when it next leads
      await recordPartitions(redis, streamKey, 16);
      let logged = '';
      const r = relay(4, { logger: createLogger('warn', { write: (line: string) => void (logged += line) }) });
      const id = randomUUID();
      await applyVersions(service, id, 1, 2);
      await waitFor('2 entries', async () => ((await lengths(16)) >= 2 ? true : undefined));
      expect((await readStream(redis, partitionKey(streamKey, partitionOf(id, 16), 16))).map((e) => e.version)).to.deep.equal([1, 2]);
      expect(r.publishedCount).to.equal(2);
      expect(logged).to.contain('FLEET_STREAM_PARTITIONS of this process (4) is stale').and.contain('set FLEET_STREAM_PARTITIONS=16');
      expect(await redis.get(partitionsRecordKey(streamKey))).to.equal('16');
    });
  });

  describe('consumers of one group', () => {
    /** Appends versions from..to of every deployment, interleaved as in a real fleet, to their partitions. */
    async function publish(deployments: readonly string[], partitions: number, from: number, to: number): Promise<void> {
      const pipeline = redis.pipeline();
      for (let v = from; v <= to; v++) {
        for (const d of deployments) {
          const key = partitionKey(streamKey, partitionOf(d, partitions), partitions);
          pipeline.xadd(key, '*', 'type', 'state_transition', 'deploymentId', d, 'version', String(v), 'to', 'pending', 'reason', 'test');
        }
      }
      await pipeline.exec();
    }

    const shared = memoryVersionStore();
    function consumer(name: string, audit: Audit, options: Partial<TransitionConsumerOptions> = {}): TransitionConsumer {
      const c = new TransitionConsumer({
        redis: testEnv().redisUrl,
        streamKey,
        group: 'g',
        consumer: name,
        startId: '0',
        blockMs: 200,
        batchSize: 20,
        leaseMs: 1000,
        versions: shared,
        handler: audit.handler(name),
        onPartitionChange: audit.changes(name),
        ...options,
      });
      closers.push(() => c.close());
      void c.run();
      return c;
    }

    /** Waits until the consumers own these numbers of partitions (e.g. '3,3,2'): the group is balanced. */
    async function balanced(consumers: readonly TransitionConsumer[], shares: string): Promise<void> {
      await waitFor(`shares ${shares}`, () => (consumers.map((c) => c.ownedPartitions().length).join(',') === shares ? true : undefined));
    }

    /** `count` deployments, at least `each` of them on every one of the partitions */
    function spread(count: number, partitions: number, each: number): string[] {
      for (;;) {
        const deployments = Array.from({ length: count }, () => randomUUID());
        const per = new Array<number>(partitions).fill(0);
        for (const d of deployments) per[partitionOf(d, partitions)] = (per[partitionOf(d, partitions)] ?? 0) + 1;
        if (per.every((n) => n >= each)) return deployments;
      }
    }

    /** Entries pending for the group on every partition. */
    async function pendingCount(partitions: number): Promise<number> {
      let total = 0;
      for (const key of partitionKeys(streamKey, partitions)) total += ((await redis.xpending(key, 'g')) as [number])[0];
      return total;
    }

    it('4 consumers, 16 partitions: every entry handled, per deployment in increasing version, partitions shared out', async () => {
      await recordPartitions(redis, streamKey, 16);
      const audit = new Audit(16, 2);
      const deployments = Array.from({ length: 60 }, () => randomUUID());
      const consumers = ['c1', 'c2', 'c3', 'c4'].map((name) => consumer(name, audit));
      await publish(deployments, 16, 1, 8);
      await waitFor('480 entries handled', () => (audit.count(deployments) >= 480 ? true : undefined), 60_000);
      audit.expectComplete(deployments, 8, true);
      await waitFor('4 partitions each', () => (consumers.every((c) => c.ownedPartitions().length === 4) ? true : undefined));
      expect(consumers.flatMap((c) => c.ownedPartitions()).sort((a, b) => a - b)).to.deep.equal(Array.from({ length: 16 }, (_, n) => n));
      // a fifth joins: 16 over 5 is 4, 3, 3, 3, 3 by name, and every partition stays owned (every member must see
      // the members in one order for the shares to add up to 16)
      consumers.push(consumer('c5', audit));
      await waitFor('16 over 5', () => {
        const owned = consumers.map((c) => c.ownedPartitions().length);
        return owned.join(',') === '4,3,3,3,3' ? true : undefined;
      });
    });

    it('through a consumer joining, one closing and one crashing mid-run: complete and in order', async () => {
      await recordPartitions(redis, streamKey, 16);
      const audit = new Audit(16, 2);
      const deployments = Array.from({ length: 40 }, () => randomUUID());
      const crashing = testRedis();
      closers.push(async () => crashing.disconnect());
      const [a, b, c] = [consumer('a', audit), consumer('b', audit), consumer('c', audit, { redis: crashing })];
      await publish(deployments, 16, 1, 4);
      await waitFor('some handled', () => (audit.calls >= 40 ? true : undefined));
      const d = consumer('d', audit); // joins
      await waitFor('the joiner to own partitions', () => (d.ownedPartitions().length > 0 ? true : undefined));
      await publish(deployments, 16, 5, 8);
      await a.close(); // leaves
      crashing.disconnect(); // c crashes: its leases left to expire
      await publish(deployments, 16, 9, 12);
      await waitFor('480 entries handled', () => (audit.count(deployments) >= 480 ? true : undefined), 60_000);
      audit.expectComplete(deployments, 12, false);
      await waitFor('the survivors to own every partition', () =>
        b.ownedPartitions().length + d.ownedPartitions().length === 16 ? true : undefined,
      );
      expect(c.acquisitions).to.be.above(0);
    });

    it('a consumer started before the fleet recorded its partitions moves to them, missing nothing', async () => {
      const audit = new Audit(4, 1);
      const deployments = Array.from({ length: 8 }, () => randomUUID());
      const early = consumer('early', audit, { startId: '$' }); // nothing recorded: one partition, the base key
      await waitFor('it owns the one stream', () => (early.ownedPartitions().length === 1 ? true : undefined));
      await recordPartitions(redis, streamKey, 4); // the fleet starts with 4
      await publish(deployments, 4, 1, 3);
      await waitFor('24 entries handled', () => (audit.count(deployments) >= 24 ? true : undefined));
      audit.expectComplete(deployments, 3, true);
      await waitFor('it owns the 4 partitions', () => (early.ownedPartitions().length === 4 ? true : undefined));
    });

    it('with one partition, one consumer of three is active and the others are hot standbys', async () => {
      const audit = new Audit(1, 1);
      const deployments = Array.from({ length: 20 }, () => randomUUID());
      const consumers = ['x', 'y', 'z'].map((name) => consumer(name, audit));
      await publish(deployments, 1, 1, 5);
      await waitFor('100 entries handled', () => (audit.count(deployments) >= 100 ? true : undefined));
      audit.expectComplete(deployments, 5, true);
      const active = consumers.filter((c) => c.ownedPartitions().length > 0);
      expect(active).to.have.length(1);
      expect(audit.byConsumer.size).to.equal(1);
      // the active one leaves: a standby takes over
      await active[0]?.close();
      await publish(deployments, 1, 6, 8);
      await waitFor('160 entries handled', () => (audit.count(deployments) >= 160 ? true : undefined));
      audit.expectComplete(deployments, 8, true);
      expect(audit.byConsumer.size).to.equal(2);
    });

    it('fences a consumer that cannot renew: it stops handling before another starts, and the next owner takes its pending entries first', async () => {
      const audit = new Audit(1, 50);
      const deployments = Array.from({ length: 5 }, () => randomUUID());
      // a's process stalls: no renewal, no heartbeat, and by its own clock its lease is long past when it runs again
      let paused = false;
      let skew = 0;
      const a = consumer('a', audit, { beforeRenew: () => !paused, monotonicNow: () => performance.now() + skew });
      await waitFor('a to own the partition', () => (a.ownedPartitions().length === 1 ? true : undefined));
      const b = consumer('b', audit);
      await publish(deployments, 1, 1, 8);
      await waitFor('a to have handled some', () => ((audit.byConsumer.get('a') ?? 0) >= 5 ? true : undefined));
      paused = true;
      skew = 10_000;
      const byA = audit.byConsumer.get('a') ?? 0;
      await waitFor('b to take over', () => (b.ownedPartitions().length === 1 ? true : undefined));
      // a stopped at once (the call in flight, if any, finished), not when Redis expired its lease
      expect(audit.byConsumer.get('a') ?? 0).to.be.at.most(byA + 1);
      await waitFor('40 entries handled', () => (audit.count(deployments) >= 40 ? true : undefined), 30_000);
      // no handler call of a's overlapped one of b's, and b went on from where a stopped, in order
      audit.expectComplete(deployments, 8, true);
      expect(audit.fenceViolations()).to.deep.equal([]);
      expect(audit.byConsumer.get('b') ?? 0).to.be.above(0);
      expect(a.ownedPartitions()).to.deep.equal([]);
    });

    it('fences a consumer whose lease another took: its next acknowledgement fails and it handles nothing more', async () => {
      const deploymentId = randomUUID();
      let release: () => void = () => undefined;
      const gate = new Promise<void>((resolve) => (release = resolve));
      const calls: number[] = [];
      const a = new TransitionConsumer({
        redis: testEnv().redisUrl,
        streamKey,
        group: 'g',
        consumer: 'a',
        startId: '0',
        blockMs: 200,
        leaseMs: 60_000,
        handler: async (e) => {
          calls.push(e.version);
          if (e.version === 3) await gate;
        },
      });
      closers.push(() => a.close());
      void a.run();
      await publish([deploymentId], 1, 1, 10);
      await waitFor('the handler to hold v3', () => (calls.length === 3 ? true : undefined));
      await redis.set(partitionKey(streamKey, 0, 1) + ':lease:g', 'another-owner', 'PX', 60_000);
      release();
      await waitFor('a to give the partition up', () => (a.ownedPartitions().length === 0 ? true : undefined));
      expect(calls).to.deep.equal([1, 2, 3]);
      // v3 was not acknowledged: it and the rest wait for the partition's owner
      const pending = (await redis.xpending(streamKey, 'g')) as [number, ...unknown[]];
      expect(pending[0]).to.equal(8);
    });

    it('a consumer process SIGKILLed mid-handler: the others take its partitions after its lease, the interrupted entry first, then everything after it, in order', async () => {
      await recordPartitions(redis, streamKey, 8);
      const audit = new Audit(8, 1);
      const deployments = spread(40, 8, 2);
      // a consumer of the group in a process of its own: it handles 15 entries, then waits inside the 16th's handler
      const child = spawn(process.execPath, [path.join(repoRoot(), 'dist', 'test', 'fixtures', 'dying-consumer.js')], {
        env: { ...process.env, STREAM_KEY: streamKey, GROUP: 'g', KEEP: '15', HOLD: '1', LEASE_MS: '1000', START_ID: '0', BLOCK_MS: '200' },
        stdio: ['ignore', 'pipe', 'inherit'],
      });
      let out = '';
      child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
      const closed = new Promise<NodeJS.Signals | null>((resolve) => child.on('close', (_code, signal) => resolve(signal)));
      closers.push(async () => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        await closed;
      });
      const [b, c] = [consumer('b', audit), consumer('c', audit)];
      // b, c and the child ("doomed"): 3, 3 and 2 partitions, before anything is published (no partition moves later)
      const owners = async () => Promise.all(partitionKeys(streamKey, 8).map(async (key) => leaseOwner((await redis.get(leaseKey(key, 'g'))) ?? '')));
      const mine = await waitFor('b, c and the child to own 3, 3 and 2 partitions', async () => {
        const now = await owners();
        const child = now.flatMap((o, n) => (o === 'doomed' ? [n] : []));
        return b.ownedPartitions().length === 3 && c.ownedPartitions().length === 3 && child.length === 2 ? child : undefined;
      });
      const publishedAt = audit.mark();
      await publish(deployments, 8, 1, 6);
      const entered = await waitFor('the child to enter the handler of its 16th entry', () => /^entered (\S+):(\d+)$/m.exec(out) ?? undefined);
      const killedAt = audit.mark();
      child.kill('SIGKILL');
      expect(await closed).to.equal('SIGKILL');

      // what the child handled came first for its deployments (its partitions were never anyone else's before)
      const byChild = new Map<string, number[]>();
      const childLines = out.split('\n').filter((line) => /^[0-9a-f-]{36}:\d+$/.test(line));
      for (const [d = '', v = '0'] of childLines.map((line) => line.split(':'))) byChild.set(d, [...(byChild.get(d) ?? []), Number(v)]);
      expect(childLines).to.have.length(15);
      const total = () => deployments.reduce((sum, d) => sum + new Set([...(byChild.get(d) ?? []), ...audit.versionsOf(d)]).size, 0);
      await waitFor('all 240 entries handled', () => (total() === 240 ? true : undefined), 30_000);
      audit.expectComplete(deployments, 6, false, byChild);
      // the entry the child died in went to the survivors, and its deployment went on from exactly there
      const [, interrupted = '', version = '0'] = entered;
      expect(mine).to.include(partitionOf(interrupted, 8));
      expect(audit.versionsOf(interrupted)[0], `${interrupted}: ${audit.versionsOf(interrupted).join(',')}`).to.equal(Number(version));
      // nobody touched the child's partitions while it lived; after its lease they are the survivors'
      const early = audit.log.slice(publishedAt, killedAt).filter((e) => mine.includes(e.partition));
      expect(early).to.deep.equal([]);
      await waitFor('b and c to own all 8 partitions', () => (b.ownedPartitions().length + c.ownedPartitions().length === 8 ? true : undefined));
      expect(audit.fenceViolations()).to.deep.equal([]);
      await waitFor('nothing pending', async () => ((await pendingCount(8)) === 0 ? true : undefined));
    });

    it('a handler that throws for a while: later entries of its deployment wait, other partitions go on, and its consumer keeps the lease through the retries', async () => {
      await recordPartitions(redis, streamKey, 8);
      // 4 s: renewals every 800 ms with a 1 s margin, so an event loop stalled for 2 s on a busy machine keeps the lease
      const leaseMs = 4000;
      const deployments = spread(40, 8, 2);
      const failing = deployments[0] ?? '';
      const partition = partitionOf(failing, 8);
      const behind = deployments.filter((d) => partitionOf(d, 8) === partition);
      const others = deployments.filter((d) => partitionOf(d, 8) !== partition);
      // v3 of one deployment fails at least 5 times (backoff 250 + 500 + 1000 + 2000 + 4000 ms: longer than the lease)
      // and until the other partitions have handled what is published after its first failure
      let othersDone = false;
      const failures: number[] = [];
      let succeededAt = 0;
      const fault = (e: TransitionEntry): void => {
        if (e.deploymentId !== failing || e.version !== 3) return;
        if (failures.length < 5 || !othersDone) {
          failures.push(performance.now());
          throw new Error(`${failing} v3 fails (${failures.length})`);
        }
        succeededAt = performance.now();
      };
      const audit = new Audit(8, 2);
      const consumers = ['a', 'b', 'c'].map((name) => consumer(name, audit, { handler: audit.handler(name, fault), leaseMs }));
      await balanced(consumers, '3,3,2');
      await publish(deployments, 8, 1, 6);
      await waitFor('the first failure', () => (failures.length > 0 ? true : undefined));
      const lease = leaseKey(partitionKey(streamKey, partition, 8), 'g');
      const token = await redis.get(lease);
      await publish(others, 8, 7, 8);
      await waitFor('the other partitions to handle versions 7 and 8', () => (audit.count(others) === others.length * 8 ? true : undefined));
      othersDone = true;
      await waitFor('everything handled', () => (audit.count(deployments) === others.length * 8 + behind.length * 6 ? true : undefined));
      audit.expectComplete(others, 8, true);
      audit.expectComplete(behind, 6, true);

      // the failing deployment's calls, failed ones marked: v3 again and again until it succeeded, nothing after it first
      const calls = audit.log.filter((e): e is Extract<AuditEvent, { kind: 'call' }> => e.kind === 'call' && e.entry.deploymentId === failing);
      expect(calls.map((e) => `${e.entry.version}${e.ok === true ? '' : '!'}`)).to.deep.equal([
        '1',
        '2',
        ...failures.map(() => '3!'),
        '3',
        '4',
        '5',
        '6',
      ]);
      const first = audit.log.findIndex((e) => e.kind === 'call' && e.ok === false);
      const success = audit.log.findIndex((e) => e.kind === 'call' && e.ok === true && e.entry.deploymentId === failing && e.entry.version === 3);
      // every try by one consumer, which kept the partition throughout: no loss, no release, its lease renewed
      const owner = calls.find((e) => e.ok === false)?.consumer ?? '';
      expect(new Set(calls.filter((e) => e.entry.version === 3).map((e) => e.consumer))).to.deep.equal(new Set([owner]));
      expect(audit.log.slice(first, success).filter((e) => e.kind !== 'call' && e.partition === partition)).to.deep.equal([]);
      expect(await redis.get(lease)).to.equal(token);
      expect(succeededAt - (failures[0] ?? 0), 'the retries outlasted the lease').to.be.above(leaseMs);
      // meanwhile the other partitions went on: every consumer's, the owner's own other partitions among them
      const meanwhile = audit.log.slice(first, success).filter((e) => e.kind === 'call' && e.ok === true && e.partition !== partition);
      expect(new Set(meanwhile.map((e) => e.consumer))).to.deep.equal(new Set(['a', 'b', 'c']));
      expect(meanwhile.length).to.be.at.least(others.length * 2);
      expect(audit.fenceViolations()).to.deep.equal([]);
    });

    it('a consumer cut off from Redis (its line stalls) stops before its lease can expire; the others take its partitions, pending entries first; back, it handles nothing of what it lost and rejoins', async () => {
      await recordPartitions(redis, streamKey, 6);
      const target = new URL(testEnv().redisUrl);
      const proxy = new TcpProxy(target.hostname, Number(target.port));
      const url = TcpProxy.rewrite(testEnv().redisUrl, await proxy.listen());
      closers.push(() => proxy.close());
      const audit = new Audit(6, 2);
      const deployments = spread(36, 6, 3);
      const versions = memoryVersionStore();
      const logged: string[] = [];
      const logger = createLogger('info', { write: (line: string) => void logged.push(line) });

      // a's 5th handler call is in flight when its line stalls, and stays so until its partitions are another's (a
      // call longer than the lease's margin, the contract's caveat); meanwhile a's other partition has its next
      // entry in hand, waiting for its turn: that one a must not start
      let aCalls = 0;
      let held: { partition: number; entry: TransitionEntry } | null = null;
      let otherInHand = false;
      let heldDone = false;
      let stalledAt = -1;
      const aVersions: VersionStore = {
        get: (id) => {
          if (held !== null && partitionOf(id, 6) !== held.partition) otherInHand = true;
          return versions.get(id);
        },
        set: (id, v) => versions.set(id, v),
      };
      const inA = (): string[] => deployments.filter((d) => aPartitions.includes(partitionOf(d, 6)));
      const hold = async (e: TransitionEntry): Promise<void> => {
        if (++aCalls !== 5) return;
        held = { partition: partitionOf(e.deploymentId, 6), entry: e };
        await waitFor("a's other partition to have its next entry in hand", () => (otherInHand ? true : undefined));
        proxy.stall();
        stalledAt = audit.mark();
        await waitFor('b and c to own all six partitions', () => (b.ownedPartitions().length + c.ownedPartitions().length === 6 ? true : undefined));
        await waitFor("b and c to handle everything on a's partitions", () => (audit.count(inA()) === inA().length * 8 ? true : undefined));
        heldDone = true;
      };
      closers.push(async () => proxy.restore()); // a test that failed while stalled: let a close at once
      const a = consumer('a', audit, { redis: url, handler: audit.handler('a', hold), versions: aVersions });
      const b = consumer('b', audit, { versions, logger });
      const c = consumer('c', audit, { versions, logger });
      await balanced([a, b, c], '2,2,2');
      const aPartitions = a.ownedPartitions();
      await publish(deployments, 6, 1, 8);

      await waitFor("a's held call to end", () => (heldDone ? true : undefined), 30_000);
      const restoredAt = audit.mark();
      proxy.restore();
      await waitFor('a to rejoin: 2 partitions each again', () => ([a, b, c].every((x) => x.ownedPartitions().length === 2) ? true : undefined));

      // cut off, a started nothing: not the entry it had in hand when its lease could have expired
      expect(audit.log.slice(stalledAt, restoredAt).filter((e) => e.kind === 'call' && e.consumer === 'a')).to.deep.equal([]);
      // back, it learnt it had lost both (its acknowledgement and renewal refused), and acquired others afterwards
      const aChanges = audit.log.slice(restoredAt).filter((e) => e.kind !== 'call' && e.consumer === 'a');
      const lost = aChanges.filter((e) => aPartitions.includes(e.partition) && e.kind !== 'acquired');
      expect(lost.map((e) => `${e.kind} ${e.partition}`).sort()).to.deep.equal(aPartitions.map((n) => `lost ${n}`));
      expect(audit.fenceViolations()).to.deep.equal([]);
      // the new owners took a's pending entries over first: what a read and had not acknowledged, in stream order
      for (const n of aPartitions) {
        const took = logged
          .map((l) => JSON.parse(l) as { msg?: string; partition?: number; claimed?: number })
          .find((l) => l.msg === 'took over entries pending on the partition' && l.partition === n);
        expect(took?.claimed ?? 0, `partition ${n}`).to.be.above(0);
        const ids = audit
          .handled(stalledAt)
          .filter((e) => e.partition === n && e.consumer !== 'a')
          .map((e) => e.entry.streamId);
        expect(ids, `partition ${n}`).to.deep.equal([...ids].sort((x, y) => compareIds(x, y)));
      }
      // the one overlap is the documented caveat: the call a had in flight, whose entry the new owner handled again
      const heldPartition = held === null ? -1 : (held as { partition: number }).partition;
      expect(audit.overlaps.length).to.be.above(0);
      for (const overlap of audit.overlaps) expect(overlap).to.match(new RegExp(`handled partition ${heldPartition} .* while a did$`));
      audit.overlaps.splice(0);

      // a relay that died between its appends and their marks republishes everything: every copy is dropped, the held
      // call's late version included (the group's shared memory of versions never goes back)
      const seen = () => [a, b, c].reduce((sum, x) => sum + x.handled + x.dropped, 0);
      const [before, mark] = [seen(), audit.mark()];
      await publish(deployments, 6, 1, 8);
      await waitFor('the copies to go through', () => (seen() - before >= 36 * 8 ? true : undefined));
      expect(
        audit.log
          .slice(mark)
          .filter((e) => e.kind === 'call')
          .map((e) => (e.kind === 'call' ? `${e.entry.deploymentId}:${e.entry.version}` : '')),
      ).to.deep.equal([]);

      await publish(deployments, 6, 9, 10);
      await waitFor('versions 9 and 10', () => (audit.count(deployments) === 36 * 10 ? true : undefined));
      expect(audit.handled(mark).some((e) => e.consumer === 'a')).to.equal(true);
      audit.expectComplete(deployments, 10, false);
      expect(audit.fenceViolations()).to.deep.equal([]);
    });

    it('a position trimmed away on one partition: ResyncRequiredError naming that partition, with the last versions handled', async () => {
      await recordPartitions(redis, streamKey, 4);
      const deployments = spread(8, 4, 2);
      const target = deployments[0] ?? '';
      const key = partitionKey(streamKey, partitionOf(target, 4), 4);
      let release: () => void = () => undefined;
      const gate = new Promise<void>((resolve) => (release = resolve));
      const audit = new Audit(4, 0);
      // a slow handler on v2 of one deployment (or a long retry) while its partition is trimmed past it
      const a = consumer('a', audit, {
        batchSize: 1,
        handler: audit.handler('a', (e) => (e.deploymentId === target && e.version === 2 ? gate : undefined)),
      });
      const ended = a.run().then(
        () => 'resolved',
        (err: unknown) => err,
      );
      await publish(deployments, 4, 1, 2);
      await waitFor('the handler to hold v2', () =>
        audit.log.some((e) => e.kind === 'call' && e.entry.deploymentId === target && e.entry.version === 2) ? true : undefined,
      );
      for (let v = 3; v <= 300; v++) await redis.xadd(key, '*', 'type', 'state_transition', 'deploymentId', target, 'version', String(v));
      await redis.xtrim(key, 'MAXLEN', 10);
      release();
      const err = await Promise.race([
        ended,
        waitFor('an entry handled past the hole', () =>
          audit.versionsOf(target).length > 2 ? `went on to v${audit.versionsOf(target)[2]}` : undefined,
        ),
      ]);
      expect(err).to.be.instanceOf(ResyncRequiredError);
      const resync = err as ResyncRequiredError;
      expect(resync.streamKey).to.equal(key);
      expect(audit.versionsOf(target)).to.deep.equal([1, 2]);
      // the last version handled of every deployment it handled, on every partition
      const last = new Map(deployments.filter((d) => audit.versionsOf(d).length > 0).map((d) => [d, Math.max(...audit.versionsOf(d))]));
      expect([...resync.lastVersions].sort()).to.deep.equal([...last].sort());
      expect(last.get(target)).to.equal(2);
      expect(last.size).to.be.above(1);
    });
  });

  describe('fleet tail', () => {
    it('prints every partition, each deployment in version order, from --from or from now', async () => {
      await recordPartitions(redis, streamKey, 4);
      const deployments = Array.from({ length: 12 }, () => randomUUID());
      const add = async (from: number, to: number) => {
        for (let v = from; v <= to; v++) {
          for (const d of deployments) {
            await redis.xadd(partitionKey(streamKey, partitionOf(d, 4), 4), '*', 'type', 'state_transition', 'deploymentId', d, 'version', String(v));
          }
        }
      };
      await add(1, 2); // history
      const run = (from?: string) => {
        const lines: TransitionEntry[] = [];
        let stop: () => void = () => undefined;
        const stopped = new Promise<void>((resolve) => (stop = resolve));
        const done = tail({
          redisUrl: testEnv().redisUrl,
          streamKey,
          json: true,
          write: (line) => void lines.push(JSON.parse(line) as TransitionEntry),
          stop: stopped,
          ...(from === undefined ? {} : { from }),
        });
        return { lines, stop, done };
      };
      const history = run('0');
      const live = run();
      closers.push(async () => {
        history.stop();
        live.stop();
        await Promise.all([history.done, live.done]);
      });
      await waitFor('the history', () => (history.lines.length >= 24 ? true : undefined));
      // both tails wait in their blocking read: the live one has pinned where "now" is on every partition
      await waitFor('both tails waiting', async () => (/blocked_clients:([2-9]|\d\d)/.test(await redis.info('clients')) ? true : undefined));
      await add(3, 4);
      await waitFor('everything on the history tail', () => (history.lines.length >= 48 ? true : undefined));
      await waitFor('what came after the live tail started', () => (live.lines.length >= 24 ? true : undefined));
      const byDeployment = (lines: readonly TransitionEntry[]) => {
        const by = new Map<string, number[]>();
        for (const e of lines) by.set(e.deploymentId, [...(by.get(e.deploymentId) ?? []), Number(e.version)]);
        return by;
      };
      for (const d of deployments) {
        expect(byDeployment(history.lines).get(d)).to.deep.equal([1, 2, 3, 4]);
        expect(byDeployment(live.lines).get(d)).to.deep.equal([3, 4]);
      }
    });

    it('prints a cursor of every partition when it stops, resumes every partition from it, and refuses one for another P', async () => {
      await recordPartitions(redis, streamKey, 4);
      const deployments = Array.from({ length: 12 }, () => randomUUID());
      const add = async (from: number, to: number) => {
        for (let v = from; v <= to; v++) {
          for (const d of deployments) {
            await redis.xadd(partitionKey(streamKey, partitionOf(d, 4), 4), '*', 'type', 'state_transition', 'deploymentId', d, 'version', String(v));
          }
        }
      };
      const run = (from: string) => {
        const lines: TransitionEntry[] = [];
        const cursors: string[] = [];
        let stop: () => void = () => undefined;
        const stopped = new Promise<void>((resolve) => (stop = resolve));
        const done = tail({
          redisUrl: testEnv().redisUrl,
          streamKey,
          from,
          json: true,
          write: (line) => void lines.push(JSON.parse(line) as TransitionEntry),
          stop: stopped,
          onCursor: (c) => void cursors.push(c),
        });
        closers.push(async () => {
          stop();
          await done.catch(() => undefined);
        });
        return { lines, cursors, stop, done };
      };
      const versions = (lines: readonly TransitionEntry[], d: string) => lines.filter((e) => e.deploymentId === d).map((e) => Number(e.version));

      await add(1, 2);
      const first = run('0');
      await waitFor('the first two versions', () => (first.lines.length >= 24 ? true : undefined));
      first.stop();
      await first.done;
      expect(first.cursors).to.have.length(1);
      const cursor = first.cursors[0] ?? '';
      const decoded = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8')) as { p: number; ids: string[] };
      expect(decoded.p).to.equal(4);
      expect(decoded.ids).to.have.length(4);

      await add(3, 4);
      const resumed = run(cursor);
      await waitFor('what came after the cursor', () => (resumed.lines.length >= 24 ? true : undefined));
      for (const d of deployments) expect(versions(resumed.lines, d), d).to.deep.equal([3, 4]);
      resumed.stop();
      await resumed.done;

      // a plain id keeps its meaning: every partition from the start
      const plain = run('0');
      await waitFor('everything from 0', () => (plain.lines.length >= 48 ? true : undefined));
      for (const d of deployments) expect(versions(plain.lines, d), d).to.deep.equal([1, 2, 3, 4]);
      plain.stop();
      await plain.done;

      const other = run(encodeCursor({ p: 2, ids: ['0-0', '0-0'] }));
      const refused = await other.done.then(
        () => null,
        (err: unknown) => err,
      );
      expect(refused).to.be.instanceOf(TailCursorError);
      expect((refused as Error).message).to.equal(
        `--from: the cursor is for 2 partition(s) after 0 repartition(s), but the stream ${streamKey} has 4 after 0: its entries in between cannot be read in each deployment's order; start from a stream id, 0 or $ instead`,
      );
      expect(other.lines).to.deep.equal([]);
      expect(other.cursors).to.deep.equal([]);

      const garbage = run('not-a-cursor');
      const malformed = await garbage.done.then(
        () => null,
        (err: unknown) => err,
      );
      expect(malformed).to.be.instanceOf(TailCursorError);
      expect((malformed as Error).message).to.contain(
        '--from: must be a stream id like 1763900000000-0, 0, $ or a cursor printed by fleet tail, got "not-a-cursor"',
      );
    });
  });
});
