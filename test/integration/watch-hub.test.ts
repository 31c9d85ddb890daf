/**
 * The watch's one reader per process (src/streams/watch-hub.ts) when its live read goes wrong, over real Redis and
 * real HTTP: a reader that falls further behind than the stream keeps (its watches resync, never a silent gap), a
 * reader that fails on an error about no position (its watches end, the next watch gets a fresh reader, a client
 * resuming with its Last-Event-ID misses nothing), and a reader whose connection is killed (it reconnects and reads
 * on). Entries are appended with XADD by the test: what it stages is the stream, not the fleet that writes it.
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type IORedis from 'ioredis';
import { FleetMetrics } from '../../src/metrics';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { siblingOf, type RedisConnection } from '../../src/redis/connection';
import { WatchHub, type WatchHubOptions } from '../../src/streams/watch-hub';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { testHttpServer } from '../helpers/http';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { openSse, type SseClient } from '../helpers/sse';
import { waitFor } from '../helpers/wait';

/** The connection name of the hub's live reader (the one that blocks). */
const LIVE_READER = 'lifecycle-fleet-watch';

describe("the watch hub's live reader: falling behind, failing, reconnecting", function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let prefix: string;
  let streamKey: string;
  let redis: IORedis;
  let producer: LifecycleProducer;
  let maintenance: Queue;
  let metrics: FleetMetrics;
  const closers: Array<() => Promise<void>> = [];
  /** the watches whose response ended */
  const ended = new WeakSet<SseClient>();

  before(async () => {
    db = await openTestDatabase(2);
  });
  after(async () => {
    await db?.close();
  });
  beforeEach(() => {
    prefix = uniquePrefix();
    streamKey = `${prefix}:transitions`;
    redis = testRedis();
    producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix });
    metrics = new FleetMetrics({}, { defaultMetrics: false });
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    await maintenance.close();
    await producer.close();
    redis.disconnect();
    await dropPrefix(prefix);
  });

  /** A hub on connections made as `fleet http` makes them (siblings of its connection: named, waiting for a reconnect). */
  function hubOf(options: Omit<WatchHubOptions, 'streamKey' | 'connect'>): WatchHub {
    return new WatchHub({ streamKey, connect: (name) => countingXinfo(siblingOf(redis, name)), ...options });
  }

  /** XINFO calls made by the hubs' connections (what checking for trimming costs: one XINFO STREAM per partition checked). */
  let xinfoCalls = 0;
  /** The connection, counting its XINFO calls: the hub's own, whatever else uses the test's Redis. */
  function countingXinfo(connection: RedisConnection): RedisConnection {
    return new Proxy(connection, {
      get(target, property) {
        const value: unknown = Reflect.get(target, property, target);
        if (property === 'xinfo') xinfoCalls++;
        return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
      },
    });
  }

  /** A listening server with this hub (real HTTP: a stream cannot be injected); its base URL. */
  async function serve(hub: WatchHub): Promise<string> {
    const app = await testHttpServer({ prefix, dataSource: db.dataSource, producer, redis, maintenance }, {}, { metrics, watch: { hub } });
    await app.listen({ host: '127.0.0.1', port: 0 });
    closers.push(() => app.close());
    const address = app.server.address();
    return `http://127.0.0.1:${typeof address === 'object' && address !== null ? address.port : 0}`;
  }

  /** A watch, closed after the test; without a cursor, waits for its start id (it is live from there). */
  async function watch(url: string, headers: Record<string, string> = {}): Promise<SseClient> {
    const client = await openSse(url, headers);
    closers.push(async () => client.close());
    void client.ended.then(() => ended.add(client));
    if (headers['last-event-id'] === undefined && !url.includes('after=')) {
      await waitFor(`the watch at ${url} to be live`, () => (client.lastEventId() !== null ? true : undefined));
    }
    return client;
  }

  /** A stream entry's fields, as the relay writes them (those the watch reads: the deployment and its `to`). */
  const fieldsOf = (version: number, deploymentId: string): string[] => [
    'type',
    'state_transition',
    'transitionId',
    randomUUID(),
    'deploymentId',
    deploymentId,
    'version',
    String(version),
    'to',
    'pending',
  ];

  /** Appends versions `from`..`to` of a deployment in one MULTI (atomically: no read falls between); their ids. */
  async function append(from: number, to: number, deploymentId: string, maxLen?: number): Promise<string[]> {
    const multi = redis.multi();
    for (let v = from; v <= to; v++) {
      if (maxLen === undefined) multi.xadd(streamKey, '*', ...fieldsOf(v, deploymentId));
      else multi.xadd(streamKey, 'MAXLEN', String(maxLen), '*', ...fieldsOf(v, deploymentId));
    }
    const replies = (await multi.exec()) ?? [];
    return replies.map(([err, id]) => {
      if (err !== null) throw err;
      return String(id);
    });
  }

  const versionsOf = (client: SseClient): number[] => client.transitions().map((t) => Number(t.entry.version));
  const eventsOf = (client: SseClient): string[] => client.blocks.flatMap((b) => (b.event === undefined ? [] : [b.event]));

  /** The ids of the connections open under this name. */
  async function connectionsNamed(name: string): Promise<string[]> {
    const list = String(await redis.client('LIST'));
    return list
      .split('\n')
      .filter((line) => line.includes(` name=${name} `))
      .map((line) => /^id=(\d+)/.exec(line)?.[1] ?? '');
  }

  async function metricValue(name: string): Promise<number> {
    const line = (await metrics.text()).split('\n').find((l) => l.startsWith(`${name} `));
    return Number(line?.split(' ')[1] ?? NaN);
  }

  it('a live reader that falls further behind than the stream keeps ends its watches with a resync (trimmed), never a silent gap; the next watch gets a fresh reader', async () => {
    // reads of 2 entries: 10 entries appended at once, trimmed to the last 3, leave it behind what the stream keeps
    const hub = hubOf({ count: 2 });
    const url = await serve(hub);
    const [a, b] = [randomUUID(), randomUUID()];
    const all = await watch(`${url}/api/watch`);
    const again = await watch(`${url}/api/watch`);
    const ofA = await watch(`${url}/api/watch?deploymentId=${a}`);
    await append(1, 3, a);
    await waitFor('versions 1-3 on every watch', () => ([all, again, ofA].every((c) => c.transitions().length === 3) ? true : undefined));
    // and one whose position is ahead of the stream (as a cursor from before Redis lost its data): it loses nothing
    const ahead = await watch(`${url}/api/watch?after=${Date.now() + 3_600_000}-0`);
    await waitFor('the watch from ahead live', () => (hub.watchers.live === 4 ? true : undefined));

    // 4 to 13 in one step, with MAXLEN 3: 4 to 10 are gone before the reader reads again
    const ids = await append(4, 13, b, 3);
    const firstRetained = ids[7] ?? '';
    expect((await redis.xrange(streamKey, '-', '+', 'COUNT', 1))[0]?.[0]).to.equal(firstRetained);
    for (const [name, client] of [
      ['all', all],
      ['again', again],
      ['of a', ofA],
    ] as const) {
      await waitFor(`the watch "${name}" to end or to get more`, () => (client.transitions().length > 3 || ended.has(client) ? true : undefined));
      expect(versionsOf(client), `${name}: what it got`).to.deep.equal([1, 2, 3]);
      expect(eventsOf(client), name).to.deep.equal(['transition', 'transition', 'transition', 'resync']);
      await client.ended;
      const resync = JSON.parse(client.blocks.find((block) => block.event === 'resync')?.data ?? '{}') as Record<string, unknown>;
      expect(resync, name).to.deep.include({ reason: 'trimmed', positions: { [streamKey]: firstRetained } });
      expect(resync.message, name).to.contain(
        `this watch fell behind: ${streamKey} no longer holds what came after this position (it now starts at ${firstRetained})`,
      );
    }
    // its position is still there: it ends without a resync (interrupted: its client watches again from its cursor)
    await waitFor('the watch from ahead ended', () => (ended.has(ahead) ? true : undefined));
    expect(eventsOf(ahead), 'the watch from ahead').to.deep.equal([]);
    expect(hub.watchers).to.deep.equal({ open: 0, live: 0, waiting: 0 });
    expect(await metricValue('fleet_watchers')).to.equal(0);

    // the next watch starts a fresh reader, from now
    const next = await watch(`${url}/api/watch`);
    await append(14, 14, a);
    await waitFor('version 14 on the next watch', () => (next.transitions().length === 1 ? true : undefined));
    expect(versionsOf(next)).to.deep.equal([14]);
    expect(hub.watchers).to.deep.equal({ open: 1, live: 1, waiting: 0 });
    await waitFor('one live reader connection', async () => ((await connectionsNamed(LIVE_READER)).length === 1 ? true : undefined));
  });

  it('a live reader behind (full reads) checks each read for trimming and reads on; at the head it checks nothing (no extra command)', async () => {
    const hub = hubOf({ count: 2 });
    const url = await serve(hub);
    const d = randomUUID();
    const client = await watch(`${url}/api/watch`);
    const atStart = xinfoCalls;
    // one at a time, each read before the next comes: every read brings 1 of at most 2
    for (let v = 1; v <= 3; v++) {
      await append(v, v, d);
      await waitFor(`version ${v}`, () => (client.transitions().length === v ? true : undefined));
    }
    expect(xinfoCalls - atStart, 'checks while at the head').to.equal(0);

    // 10 at once, nothing trimmed: 5 full reads of 2, each checked (one XINFO STREAM each: one partition)
    await append(4, 13, d);
    await waitFor('versions 4-13', () => (client.transitions().length === 13 ? true : undefined));
    expect(versionsOf(client)).to.deep.equal(Array.from({ length: 13 }, (_, i) => i + 1));
    expect(xinfoCalls - atStart, 'checks while behind').to.equal(5);
    expect(eventsOf(client)).not.to.include('resync');
    expect(hub.watchers).to.deep.equal({ open: 1, live: 1, waiting: 0 });
  });

  it('a live reader that fails on an error about no position ends every watch without a resync; the next watch gets a fresh reader, and one resumed with its Last-Event-ID misses nothing', async () => {
    const hub = hubOf({ blockMs: 100 });
    const url = await serve(hub);
    const [a, b] = [randomUUID(), randomUUID()];
    const all = await watch(`${url}/api/watch`);
    const ofA = await watch(`${url}/api/watch?deploymentId=${a}`);
    await append(1, 3, a);
    await waitFor('versions 1-3 on both watches', () => (all.transitions().length === 3 && ofA.transitions().length === 3 ? true : undefined));
    const [oldReader] = await connectionsNamed(LIVE_READER);

    // the stream key holds a string for a while: the reader's next XREAD fails with WRONGTYPE
    const saved = `${streamKey}:saved`;
    await redis.multi().rename(streamKey, saved).set(streamKey, 'not a stream').exec();
    await waitFor('both watches ended', () => (ended.has(all) && ended.has(ofA) ? true : undefined));
    for (const client of [all, ofA])
      expect(eventsOf(client), 'no resync, no overflow: the client reconnects with its cursor').to.deep.equal([
        'transition',
        'transition',
        'transition',
      ]);
    expect(hub.watchers).to.deep.equal({ open: 0, live: 0, waiting: 0 });
    expect(await metricValue('fleet_watchers')).to.equal(0);
    // the failed reader let go of its connections
    await waitFor('the failed reader closed', async () => ((await connectionsNamed(LIVE_READER)).length === 0 ? true : undefined));

    await redis.multi().del(streamKey).rename(saved, streamKey).exec();
    await append(4, 6, a); // while nobody watches
    const resumed = await watch(`${url}/api/watch?deploymentId=${a}`, { 'last-event-id': ofA.lastEventId() ?? '' });
    const fresh = await watch(`${url}/api/watch`);
    await waitFor('versions 4-6 on the resumed watch', () => (resumed.transitions().length === 3 ? true : undefined));
    await waitFor('the resumed watch live', () => (hub.watchers.live === 2 ? true : undefined));
    await append(7, 7, a);
    await append(1, 1, b);
    await waitFor('the last two on the fresh watch', () => (fresh.transitions().length === 2 ? true : undefined));
    await waitFor('version 7 on the resumed watch', () => (resumed.transitions().length === 4 ? true : undefined));
    expect([...versionsOf(ofA), ...versionsOf(resumed)], 'everything of a once, in order').to.deep.equal([1, 2, 3, 4, 5, 6, 7]);
    expect(fresh.transitions().map((t) => t.entry.deploymentId)).to.deep.equal([a, b]);
    const readers = await connectionsNamed(LIVE_READER);
    expect(readers).to.have.length(1);
    expect(readers[0]).not.to.equal(oldReader);
  });

  it('a live reader whose connection is killed reconnects and reads on: no watch ends, nothing missed', async () => {
    const hub = hubOf({});
    const url = await serve(hub);
    const d = randomUUID();
    const client = await watch(`${url}/api/watch`);
    await append(1, 2, d);
    await waitFor('versions 1-2', () => (client.transitions().length === 2 ? true : undefined));
    const [reader] = await connectionsNamed(LIVE_READER);
    expect(await redis.client('KILL', 'ID', reader ?? '')).to.equal(1);
    await append(3, 4, d);
    await waitFor('versions 3-4', () => (client.transitions().length === 4 ? true : undefined));
    expect(versionsOf(client)).to.deep.equal([1, 2, 3, 4]);
    expect(eventsOf(client)).to.deep.equal(['transition', 'transition', 'transition', 'transition']);
    expect(hub.watchers).to.deep.equal({ open: 1, live: 1, waiting: 0 });
  });
});
