/**
 * The fleet on a Redis Cluster (issue 17, part 1): 3 masters with a replica each, REDIS_URL in the cluster form and
 * a hash-tag prefix. The SDK producer, the lifecycle worker, the stamp buffer, the outbox relay, a consumer group,
 * `fleet tail`, the sweep scheduler with its shard queue, and the HTTP intake's rate limit, all through the one
 * connection factory; every key they leave lives in one slot.
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue, Worker, type Job } from 'bullmq';
import { loadConfig } from '../../src/config';
import { ConfigError, DurabilityError, ResyncRequiredError } from '../../src/errors';
import { LifecycleProducer } from '../../src/queues/producer';
import { LIFECYCLE_QUEUE, MAINTENANCE_QUEUE } from '../../src/queues/names';
import { createRedis, describeRedis, isCluster, type RedisConnection } from '../../src/redis/connection';
import { createStampBuffer, type StampBuffer } from '../../src/services/stamps';
import { PROBE_JOB_NAME, Sweeper, type ShardReport, type SweepResult } from '../../src/services/sweep/sweeper';
import { TransitionService } from '../../src/services/transitions';
import { memoryVersionStore, parseEntry, TransitionConsumer, type TransitionConsumerOptions, type TransitionEntry } from '../../src/streams/consumer';
import { partitionKey, partitionKeys, partitionOf, recordPartitions } from '../../src/streams/partitions';
import { OutboxRelay, transitionStreamKey } from '../../src/streams/outbox-relay';
import { repartition } from '../../src/streams/repartition';
import { tail } from '../../src/cli/tail';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { SWEEP_JOB_NAME, SweepWorker } from '../../src/workers/sweep-worker';
import { ConsumerAudit } from '../helpers/consumer-audit';
import { forgetOutbox, openTestDatabase, type TestDatabase } from '../helpers/db';
import { applyVersions } from '../helpers/lifecycle';
import { testHttpServer } from '../helpers/http';
import { ReadyServer } from '../helpers/ready-server';
import { OwnRedisCluster } from '../helpers/redis-cluster';
import { uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

describe('Redis Cluster: the whole fleet under one hash tag', function () {
  this.timeout(120_000);
  let cluster: OwnRedisCluster;
  let db: TestDatabase;
  const closers: Array<() => Promise<void>> = [];

  before(async () => {
    cluster = await OwnRedisCluster.start();
    db = await openTestDatabase(12);
  });
  after(async () => {
    await db?.close();
    await cluster?.stop();
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
  });

  /** Every key on any node, with the slot it hashes to. */
  async function keysBySlot(match: string): Promise<Map<string, string[]>> {
    const keys = new Set<string>();
    for (const port of cluster.ports) {
      for (const key of (await cluster.cli(port, '--raw', 'KEYS', match)).split('\n')) if (key !== '') keys.add(key);
    }
    const bySlot = new Map<string, string[]>();
    for (const key of keys) {
      const slot = await cluster.cli(cluster.ports[0] ?? 0, 'CLUSTER', 'KEYSLOT', key);
      bySlot.set(slot, [...(bySlot.get(slot) ?? []), key]);
    }
    return bySlot;
  }

  it('configures a cluster by its seed nodes: the prefix defaults to {fleet}, and one without a hash tag is refused', () => {
    expect(loadConfig({ REDIS_URL: cluster.url })).to.deep.include({ redisCluster: true, prefix: '{fleet}' });
    expect(() => loadConfig({ REDIS_URL: cluster.url, FLEET_PREFIX: 'fleet' })).to.throw(ConfigError, /FLEET_PREFIX: .*hash tag/);
    expect(() => new LifecycleProducer({ connection: cluster.url, prefix: 'fleet' })).to.throw(/hash tag/);
  });

  it('runs a lifecycle, the stream with a consumer group and tail, the sweep scheduler with shards, the stamp buffer and the intake', async () => {
    const prefix = `{${uniquePrefix()}}`;
    const url = cluster.url;
    const streamKey = transitionStreamKey(prefix);

    // durable: every enqueue and every stream append waits for the slot's replica (WAIT on its master's connection)
    const producer = new LifecycleProducer({ connection: url, prefix, durable: { replicas: 1, timeoutMs: 3000 } });
    closers.push(() => producer.close());
    const stampBuffer: StampBuffer = createStampBuffer({ redisUrl: url, dataSource: db.dataSource, prefix });
    closers.push(() => stampBuffer.close());
    const relay = new OutboxRelay({ databaseUrl: db.url, redis: url, streamKey, standbyRetryMs: 200, durable: { replicas: 1, timeoutMs: 3000 } });
    closers.push(() => relay.close());
    relay.start();
    const service = new TransitionService({ dataSource: db.dataSource, relay, stampBuffer });
    const worker = new LifecycleWorker({ connection: url, prefix, service, stampBuffer, concurrency: 4 });
    closers.push(() => worker.close(5000));
    await worker.worker.waitUntilReady();

    const consumed: TransitionEntry[] = [];
    const consumer = new TransitionConsumer({
      redis: url,
      streamKey,
      group: 'audit',
      consumer: 'c1',
      startId: '0',
      blockMs: 500,
      handler: (e) => void consumed.push(e),
    });
    const consuming = consumer.run();
    closers.push(async () => {
      await consumer.close();
      await consuming;
    });

    const tailed: string[] = [];
    let stopTail = (): void => undefined;
    const tailing = tail({
      redisUrl: url,
      streamKey,
      from: '0',
      json: true,
      write: (line) => void tailed.push(line),
      stop: new Promise<void>((resolve) => (stopTail = resolve)),
    });
    closers.push(async () => {
      stopTail();
      await tailing;
    });

    // the sweep: a scheduler ticking every second, its shards on the maintenance queue, stamps flushed each tick
    const monitor = createRedis(url, 'worker', 'lifecycle-fleet-test-monitor');
    expect(isCluster(monitor)).to.equal(true);
    expect(describeRedis(monitor)).to.equal(`Redis Cluster at ${cluster.ports.map((p) => `127.0.0.1:${p}`).join(',')}`);
    expect(describeRedis(monitor)).not.to.contain(cluster.password);
    const maintenance = new Queue(MAINTENANCE_QUEUE, { connection: monitor, prefix });
    closers.push(async () => {
      await maintenance.close();
      monitor.disconnect();
    });
    const node = new ReadyServer('ok');
    await node.listen();
    closers.push(() => node.close());
    const sweeper = new Sweeper({
      dataSource: db.dataSource,
      producer,
      shardQueue: maintenance,
      flushStamps: async (now) => (await stampBuffer.flush(now)).stamped,
      everyS: 1,
      readyWindowS: 120,
      probeBudgetMs: 1000,
    });
    const sweep = new SweepWorker({ connection: url, prefix, sweeper, everyS: 1, recheckEveryMs: 0 });
    closers.push(() => sweep.close(5000));
    expect((await sweep.start()).action).to.equal('created');

    const settle = async (jobId: string): Promise<Job> =>
      waitFor(
        `job ${jobId} to complete`,
        async () => {
          const state = await producer.queue.getJobState(jobId);
          if (state === 'failed') throw new Error(`job ${jobId} failed`);
          return state === 'completed' ? producer.queue.getJob(jobId) : undefined;
        },
        30_000,
      );
    const outcome = async (jobId: string): Promise<unknown> => ((await settle(jobId)).returnvalue as { outcome?: unknown }).outcome;

    const deploymentId = randomUUID();
    const attemptId = randomUUID();
    expect(await outcome((await producer.createDeployment({ deploymentId, name: 'web' })).jobId)).to.equal('applied');
    expect(await outcome((await producer.createAttempt({ deploymentId, attemptId })).jobId)).to.equal('applied');
    expect(await outcome((await producer.startAttempt({ deploymentId, attemptId })).jobId)).to.equal('applied');

    // a heartbeat waits in the stamp buffer (under the prefix's slot) until a tick writes it to PostgreSQL
    await settle((await producer.heartbeat({ deploymentId, attemptId })).jobId);
    const heartbeatAt = await waitFor(
      'a tick to flush the heartbeat',
      async () => {
        const [row] = await db.dataSource.query<Array<{ last_heartbeat_at: Date | null }>>(`SELECT last_heartbeat_at FROM attempts WHERE id = $1`, [
          attemptId,
        ]);
        return row?.last_heartbeat_at ?? undefined;
      },
      30_000,
    );
    expect(heartbeatAt).to.be.instanceOf(Date);

    const endpoint = { url: `${node.url}/e/1`, kind: 'node_port' as const };
    expect(await outcome((await producer.endAttempt({ deploymentId, attemptId, outcome: 'succeeded', endpoint })).jobId)).to.equal('applied');
    const [deployment] = await db.dataSource.query<Array<{ state: string; version: number }>>(
      `SELECT state, version FROM deployments WHERE id = $1`,
      [deploymentId],
    );
    expect(deployment).to.deep.equal({ state: 'ready', version: 4 });

    // the relay appended the four transitions in order; the group and tail read them in that order
    const expected = [
      { version: 1, to: 'pending' },
      { version: 2, to: 'pending' },
      { version: 3, to: 'deploying' },
      { version: 4, to: 'ready' },
    ];
    await waitFor('the consumer group to read four entries', () => (consumed.length >= 4 ? true : undefined), 30_000);
    expect(consumed.map((e) => ({ version: e.version, to: e.to }))).to.deep.equal(expected);
    expect(consumed.every((e) => e.deploymentId === deploymentId)).to.equal(true);
    const ids = consumed.map((e) => e.streamId);
    expect(await monitor.xlen(streamKey)).to.equal(4);
    await waitFor('tail to print four entries', () => (tailed.length >= 4 ? true : undefined), 30_000);
    expect(tailed.map((l) => JSON.parse(l) as TransitionEntry).map((e) => e.streamId)).to.deep.equal(ids);

    // ticks ran as jobs; one probed the new endpoint through a shard job
    const done = async () => (await maintenance.getJobs(['completed'], 0, -1)) as Array<Job<unknown, SweepResult | ShardReport>>;
    await waitFor('a probe shard to complete', async () => ((await done()).some((j) => j.name === PROBE_JOB_NAME) ? true : undefined), 30_000);
    const jobs = await done();
    expect(jobs.some((j) => j.name === SWEEP_JOB_NAME)).to.equal(true);
    expect(jobs.filter((j) => j.name === PROBE_JOB_NAME).some((j) => (j.returnvalue as ShardReport).stamped === 1)).to.equal(true);
    expect(node.requests).to.include('/e/1/ready');

    // the HTTP intake, its rate-limit counters in the cluster
    const counters: RedisConnection = createRedis(url, 'producer', 'lifecycle-fleet-test-ratelimit');
    closers.push(async () => counters.disconnect());
    const app = await testHttpServer(
      { prefix, dataSource: db.dataSource, producer, redis: counters, maintenance },
      { FLEET_EVENTS_RATE_LIMIT: '50' },
      { rateLimitRedis: counters },
    );
    closers.push(() => app.close());
    const second = randomUUID();
    const res = await app.inject({
      method: 'POST',
      url: '/api/events',
      payload: { name: 'deployment.create', data: { deploymentId: second, name: 'api' } },
    });
    expect(res.statusCode).to.equal(202);
    expect((await app.inject({ method: 'GET', url: '/readyz' })).statusCode).to.equal(200);
    await waitFor(
      'the intake event to apply',
      async () => {
        const [row] = await db.dataSource.query<Array<{ state: string }>>(`SELECT state FROM deployments WHERE id = $1`, [second]);
        return row?.state === 'pending' ? true : undefined;
      },
      30_000,
    );

    // every key the fleet made is in the prefix's one slot
    const bySlot = await keysBySlot(`${prefix}*`);
    const all = [...bySlot.values()].flat();
    expect(all).to.include.members([streamKey, `${prefix}:lifecycle:meta`, `${prefix}:maintenance:meta`]);
    expect(all.some((k) => k.startsWith(`${prefix}:ratelimit:`))).to.equal(true);
    expect([...bySlot.keys()], all.join(', ')).to.have.length(1);
  });

  it('fleet streams repartition 1 -> 4 under a relay and a consumer group: hash-tagged partitions, nothing lost, in order', async () => {
    const prefix = `{${uniquePrefix()}}`;
    const streamKey = transitionStreamKey(prefix);
    const redis = createRedis(cluster.url, 'worker', 'lifecycle-fleet-test');
    closers.push(async () => redis.disconnect());
    // this test's stream only: earlier tests' rows are not pending
    await db.dataSource.query(`UPDATE outbox SET published_at = COALESCE(published_at, now())`);
    await recordPartitions(redis, streamKey, 1);
    const relay = new OutboxRelay({ databaseUrl: db.url, redis: cluster.url, streamKey, standbyRetryMs: 100 });
    closers.push(() => relay.close());
    relay.start();
    const service = new TransitionService({ dataSource: db.dataSource, relay });
    const seen = new Map<string, number[]>();
    const consumer = new TransitionConsumer({
      redis: cluster.url,
      streamKey,
      group: 'g',
      consumer: 'c1',
      startId: '0',
      blockMs: 200,
      leaseMs: 1000,
      handler: (e) => void seen.set(e.deploymentId, [...(seen.get(e.deploymentId) ?? []), e.version]),
    });
    closers.push(() => consumer.close());
    void consumer.run();
    const ids = Array.from({ length: 12 }, () => randomUUID());
    const attempts = ids.map(() => randomUUID());
    for (const id of ids) await service.apply('deployment.create', { deploymentId: id, name: 'web' }, { fallbackEventId: randomUUID() });
    await waitFor('12 handled', () => (ids.every((id) => seen.has(id)) ? true : undefined));
    const outcome = await repartition({ databaseUrl: db.url, redis, streamKey, to: 4, timeoutMs: 30_000, report: () => undefined });
    expect(outcome).to.deep.equal({ kind: 'repartitioned', from: 1, to: 4 });
    for (const [i, id] of ids.entries())
      await service.apply('attempt.create', { deploymentId: id, attemptId: attempts[i] }, { fallbackEventId: randomUUID() });
    await waitFor('24 handled', () => (ids.every((id) => seen.get(id)?.length === 2) ? true : undefined), 30_000);
    for (const id of ids) {
      expect(seen.get(id), id).to.deep.equal([1, 2]);
      const key = partitionKey(streamKey, partitionOf(id, 4), 4);
      expect(key).to.match(/^\{t[0-9a-f]+:p[0-3]\}:transitions:[0-3]$/);
      const versions = ((await redis.xrange(key, '-', '+')) as Array<[string, string[]]>)
        .filter(([, f]) => f.includes(id))
        .map(([, f]) => f[f.indexOf('version') + 1]);
      expect(versions, key).to.deep.equal(['2']);
    }
  });

  // last in the file: it fails a master over (and brings it back as a replica)
  it('consumers of one group ride out the failover of a master serving some partitions, to a replica that lagged: complete and in order, what the failover lost republished and dropped by version; a group made during the lag gets resync_required for a partition there', async () => {
    const P = 6;
    const url = cluster.url;
    // a prefix whose partitions are spread over at least two masters: one master's fail over, the others' do not
    let streamKey = '';
    let masters: number[] = [];
    while (new Set(masters).size < 2) {
      streamKey = transitionStreamKey(`{${uniquePrefix()}}`);
      masters = await Promise.all(partitionKeys(streamKey, P).map((key) => cluster.masterFor(key)));
    }
    const keys = partitionKeys(streamKey, P);
    const failing = masters[0] ?? 0;
    const there = keys.flatMap((_, n) => (masters[n] === failing ? [n] : []));
    // this test's stream over the file's one database: earlier tests' rows are neither pending nor traceable
    await forgetOutbox(db);
    const admin = createRedis(url, 'worker', 'lifecycle-fleet-test-admin');
    closers.push(async () => admin.disconnect());
    await recordPartitions(admin, streamKey, P);
    const service = new TransitionService({ dataSource: db.dataSource });
    const relay = new OutboxRelay({ databaseUrl: db.url, redis: url, streamKey, partitions: P, standbyRetryMs: 200, pollIntervalMs: 100 });
    closers.push(() => relay.close());
    relay.start();

    const audit = new ConsumerAudit(P, 1);
    // each group's memory of versions, shared by its consumers
    const versions = new Map([
      ['g', memoryVersionStore()],
      ['late', memoryVersionStore()],
    ]);
    const ended: unknown[] = [];
    const start = (
      group: string,
      name: string,
      handler: (e: TransitionEntry) => Promise<void>,
      onPartitionChange?: TransitionConsumerOptions['onPartitionChange'],
    ) => {
      const c = new TransitionConsumer({
        redis: url,
        streamKey,
        group,
        consumer: name,
        startId: '0',
        blockMs: 200,
        batchSize: 20,
        leaseMs: 2000,
        versions: versions.get(group) ?? memoryVersionStore(),
        handler,
        ...(onPartitionChange ? { onPartitionChange } : {}),
      });
      closers.push(() => c.close());
      return {
        consumer: c,
        ended: c.run().then(
          () => 'resolved',
          (err: unknown) => err,
        ),
      };
    };
    const group = ['a', 'b', 'c'].map((name) => start('g', name, audit.handler(name), audit.changes(name)));
    for (const g of group) void g.ended.then((outcome) => ended.push(outcome));
    const deployments = Array.from({ length: 24 }, () => randomUUID());
    const through = (from: number, to: number) => Promise.all(deployments.map((d) => applyVersions(service, d, from, to)));
    await through(1, 2);
    await waitFor('versions 1-2 handled', () => (audit.count(deployments) === 48 ? true : undefined), 30_000);
    await waitFor('2 partitions each', () => (group.every((g) => g.consumer.ownedPartitions().length === 2) ? true : undefined));

    // the replica falls behind; meanwhile 3-4 are appended, handled and acknowledged on the master only, and another
    // group is made on every partition; then the master dies and the replica takes over without any of it
    const late = new ConsumerAudit(P, 0);
    let lateRun: { consumer: TransitionConsumer; ended: Promise<unknown> } | null = null;
    let handledDuringLag: Array<{ readonly n: number; readonly id: string }> = [];
    const failover = await cluster.failover(failing, {
      replicaLagMs: 1500,
      duringLag: async () => {
        lateRun = start('late', 'l1', late.handler('l1'));
        await through(3, 4);
        await waitFor('versions 3-4 handled', () => (audit.count(deployments) === 96 ? true : undefined), 20_000);
        await waitFor("the late group to read on the failing master's partitions", () =>
          late.handled().some((e) => there.includes(e.partition)) ? true : undefined,
        );
        handledDuringLag = audit
          .handled()
          .filter((e) => there.includes(e.partition) && e.entry.version >= 3)
          .map((e) => ({ n: e.partition, id: e.entry.streamId }));
      },
    });
    closers.push(() => cluster.restart(failover.killed));
    expect(handledDuringLag).to.not.deep.equal([]);

    // the relay finds the failed-over partitions shorter at its next append there and republishes 3-4 first
    await through(5, 6);
    await waitFor('versions 5-6 handled', () => (audit.count(deployments) === 144 ? true : undefined), 60_000);
    // each version exactly once, in order (a deployment's republished copies come before its 5 on its partition), by
    // one owner at a time; no consumer of the group stopped
    audit.expectComplete(deployments, 6, true);
    await waitFor('the republished copies dropped', () => (group.reduce((sum, g) => sum + g.consumer.dropped, 0) > 0 ? true : undefined), 30_000);
    expect(audit.fenceViolations()).to.deep.equal([]);
    expect(ended).to.deep.equal([]);
    // what was handled during the lag is gone from those partitions; its versions are back under new ids
    const retained: Array<{ readonly n: number; readonly entry: TransitionEntry }> = [];
    for (const n of there)
      for (const [id, fields] of await admin.xrange(keys[n] ?? '', '-', '+')) retained.push({ n, entry: parseEntry(id, fields) });
    const gone = handledDuringLag.filter((h) => retained.some((r) => r.n === h.n && r.entry.streamId === h.id));
    expect(gone).to.deep.equal([]);
    const back = (d: string, v: number) => retained.some((r) => r.entry.deploymentId === d && r.entry.version === v);
    const thereDeployments = deployments.filter((d) => there.includes(partitionOf(d, P)));
    expect(thereDeployments).to.not.deep.equal([]);
    expect(thereDeployments.filter((d) => !back(d, 3) || !back(d, 4))).to.deep.equal([]);

    // the group made during the lag: its position on the failed-over partitions is gone, so it stops there
    let lateOutcome: { readonly result: unknown } | undefined;
    void (lateRun as { ended: Promise<unknown> } | null)?.ended.then((result) => (lateOutcome = { result }));
    const lateEnded = (await waitFor('the late group to stop', () => lateOutcome, 30_000)).result;
    expect(lateEnded).to.be.instanceOf(ResyncRequiredError);
    expect(there.map((n) => keys[n])).to.include((lateEnded as ResyncRequiredError).streamKey);
  });

  it('a stream consumer rides out a failover of the master serving its slot: it neither stops nor misses an entry', async () => {
    const prefix = `{${uniquePrefix()}}`;
    const streamKey = transitionStreamKey(prefix);
    const url = cluster.url;
    const writer = createRedis(url, 'worker', 'lifecycle-fleet-test-writer');
    closers.push(async () => writer.disconnect());
    const deploymentId = randomUUID();
    const append = (version: number) =>
      writer.xadd(streamKey, '*', 'type', 'state_transition', 'deploymentId', deploymentId, 'version', String(version), 'to', 'deploying');
    const seen: number[] = [];
    const consumer = new TransitionConsumer({
      redis: url,
      streamKey,
      group: 'failover',
      consumer: 'c1',
      startId: '0',
      blockMs: 200,
      handler: (e) => void seen.push(e.version),
    });
    closers.push(() => consumer.close());
    let ended: unknown = null;
    consumer.run().then(
      () => (ended = 'resolved'),
      (err: unknown) => (ended = err),
    );
    for (let v = 1; v <= 5; v++) await append(v);
    await waitFor('versions 1-5', () => (seen.length >= 5 ? true : undefined));

    const master = await cluster.masterFor(streamKey);
    const failover = await cluster.failover(master); // the consumer's reads meet a dead node, CLUSTERDOWN, redirections
    closers.push(() => cluster.restart(failover.killed));
    for (let v = 6; v <= 10; v++) await append(v);
    await waitFor('versions 6-10 after the failover', () => (seen.includes(10) ? true : undefined), 60_000);
    expect(ended, 'the consumer stopped during the failover').to.equal(null);
    expect(seen).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  });

  it("a BullMQ worker on the cluster keeps taking jobs through failovers of its slot's master and the old master's return as a replica", async () => {
    const prefix = `{${uniquePrefix()}}`;
    const url = cluster.url;
    const queueConnection = createRedis(url, 'producer', 'lifecycle-fleet-test-queue');
    const queue = new Queue('failover', { connection: queueConnection, prefix });
    const done = new Set<string>();
    const workerConnection = createRedis(url, 'worker', 'lifecycle-fleet-test-worker');
    const worker = new Worker('failover', async (job) => void done.add(job.id ?? ''), { connection: workerConnection, prefix, concurrency: 4 });
    worker.on('error', () => undefined);
    closers.push(async () => {
      await worker.close();
      await queue.close();
      // BullMQ leaves a connection it was given open: a cluster client left behind would reconnect for ever
      workerConnection.disconnect();
      queueConnection.disconnect();
    });
    let n = 0;
    const addAndWait = async (what: string) => {
      const id = `j${++n}`;
      await waitFor(
        `${what}: job ${id} added`,
        async () => ((await queue.add('j', {}, { jobId: id }).catch(() => undefined)) === undefined ? undefined : true),
        60_000,
      );
      await waitFor(`${what}: job ${id} taken`, () => (done.has(id) ? true : undefined), 30_000);
    };
    await addAndWait('before');
    for (let round = 1; round <= 2; round++) {
      const master = await cluster.masterFor(`${prefix}:failover:meta`);
      const failover = await cluster.failover(master);
      await addAndWait(`after failover ${round}`);
      await cluster.restart(failover.killed); // it comes back believing it is a master, then becomes a replica
      for (let i = 0; i < 5; i++) await addAndWait(`after the old master's return ${round}`);
    }
  });

  it('a failover to a lagging replica loses an acknowledged enqueue without durable enqueue; with it, the enqueue is refused instead (never acknowledged, never lost)', async () => {
    const prefix = `{${uniquePrefix()}}`;
    const url = cluster.url;
    const plain = new LifecycleProducer({ connection: url, prefix });
    const durable = new LifecycleProducer({ connection: url, prefix, durable: { replicas: 1, timeoutMs: 500 } });
    closers.push(async () => {
      await plain.close();
      await durable.close();
    });
    const jobsConnection = createRedis(url, 'producer', 'lifecycle-fleet-test-jobs');
    const jobs = new Queue(LIFECYCLE_QUEUE, { connection: jobsConnection, prefix });
    closers.push(async () => {
      await jobs.close();
      jobsConnection.disconnect();
    });
    const acknowledged: string[] = [];
    let refused: unknown = null;
    const master = await cluster.masterFor(`${prefix}:${LIFECYCLE_QUEUE}:meta`);
    const failover = await cluster.failover(master, {
      replicaLagMs: 1500,
      duringLag: async () => {
        // no worker runs: the jobs wait in the queue, as a backlog does
        acknowledged.push((await plain.createDeployment({ deploymentId: randomUUID(), name: 'plain' })).jobId);
        refused = await durable.createDeployment({ deploymentId: randomUUID(), name: 'durable' }).then(
          () => null,
          (err: unknown) => err,
        );
      },
    });
    closers.push(() => cluster.restart(failover.killed));
    expect(acknowledged, 'the plain enqueue was acknowledged').to.have.length(1);
    expect(refused, 'the durable enqueue was not').to.be.instanceOf(DurabilityError);
    // the promoted replica never had the acknowledged job
    const after = await waitFor(
      'the queue to answer after the failover',
      async () => ({ job: (await jobs.getJob(acknowledged[0] ?? '')) ?? null }),
      30_000,
    );
    expect(after.job).to.equal(null);
  });
});
