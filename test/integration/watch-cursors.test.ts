/**
 * Where a watch (and `fleet tail`) starts from a plain stream id or a cursor, over real Redis and real HTTP: `0` is
 * everything the stream retains (trimmed or not), a cursor's `0-0` on a partition that lost entries to trimming since
 * is a resync, and `$` is a watch without `after` (its start id comes first). docs/contract.md, "Watch".
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type IORedis from 'ioredis';
import { tail } from '../../src/cli/tail';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import type { TransitionEntry } from '../../src/streams/consumer';
import { partitionKeys, partitionOf, recordPartitions } from '../../src/streams/partitions';
import { StreamFollower } from '../../src/streams/stream-follower';
import { WatchHub } from '../../src/streams/watch-hub';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { testHttpServer } from '../helpers/http';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { openSse, type SseClient } from '../helpers/sse';
import { waitFor } from '../helpers/wait';

describe('GET /api/watch and fleet tail: where a start id or a cursor starts', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let prefix: string;
  let streamKey: string;
  let redis: IORedis;
  let hub: WatchHub;
  let url: string;
  const closers: Array<() => Promise<void>> = [];

  before(async () => {
    db = await openTestDatabase(4);
  });
  after(async () => {
    await db?.close();
  });
  beforeEach(async () => {
    prefix = uniquePrefix();
    streamKey = `${prefix}:transitions`;
    redis = testRedis();
    const producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    const maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix });
    hub = new WatchHub({ streamKey, connect: () => testRedis() });
    const app = await testHttpServer({ prefix, dataSource: db.dataSource, producer, redis, maintenance }, {}, { watch: { hub } });
    await app.listen({ host: '127.0.0.1', port: 0 });
    const address = app.server.address();
    url = `http://127.0.0.1:${typeof address === 'object' && address !== null ? address.port : 0}/api/watch`;
    closers.push(async () => {
      await app.close();
      await maintenance.close();
      await producer.close();
    });
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    redis.disconnect();
    await dropPrefix(prefix);
  });

  /** A watch, closed after the test. */
  async function watch(query: string, headers: Record<string, string> = {}): Promise<SseClient> {
    const client = await openSse(`${url}${query}`, headers);
    closers.push(async () => client.close());
    return client;
  }

  /** Appends version `version` of a deployment to a key, as the relay writes it; its id. */
  async function append(key: string, deploymentId: string, version: number): Promise<string> {
    const fields = ['type', 'state_transition', 'deploymentId', deploymentId, 'version', String(version), 'from', 'pending', 'to', 'pending'];
    return (await redis.xadd(key, '*', ...fields)) ?? '';
  }

  const ids = async (key: string): Promise<string[]> => (await redis.xrange(key, '-', '+')).map(([id]) => id);
  const versions = (client: SseClient): number[] => client.transitions().map((t) => Number(t.entry.version));

  it('?after=0 on a trimmed stream gives everything it retains, in order, then goes live: no resync', async () => {
    const deploymentId = randomUUID();
    for (let v = 1; v <= 10; v++) await append(streamKey, deploymentId, v);
    await redis.xtrim(streamKey, 'MAXLEN', 5); // as FLEET_STREAM_MAXLEN does: entries-added > length from now on
    const all = await watch('?after=0');
    let ended = false;
    void all.ended.then(() => (ended = true));
    await waitFor('the 5 retained, or the end', () => (all.transitions().length >= 5 || ended ? true : undefined));
    expect(all.blocks.filter((b) => b.event === 'resync')).to.deep.equal([]);
    await waitFor('the watch live', () => (hub.watchers.live === 1 ? true : undefined));
    await append(streamKey, deploymentId, 11);
    await waitFor('the next one, live', () => (all.transitions().length >= 6 ? true : undefined));
    expect(versions(all)).to.deep.equal([6, 7, 8, 9, 10, 11]);
    expect(all.blocks.filter((b) => b.event === 'resync')).to.deep.equal([]);
  });

  it('fleet tail --from 0 prints what a trimmed stream retains; on a stream trimmed to nothing, what comes next', async () => {
    const deploymentId = randomUUID();
    let last = '';
    for (let v = 1; v <= 10; v++) last = await append(streamKey, deploymentId, v);
    await redis.xtrim(streamKey, 'MAXLEN', 5);
    /** a tail from 0: what it printed, and how it ended (null while it runs) */
    const fromZero = () => {
      const printed: number[] = [];
      const run = { printed, failed: null as unknown, stop: () => undefined as void };
      const done = tail({
        redisUrl: testEnv().redisUrl,
        streamKey,
        from: '0',
        json: true,
        write: (line) => printed.push((JSON.parse(line) as TransitionEntry).version),
        stop: new Promise<void>((resolve) => (run.stop = resolve)),
      });
      done.catch((err: unknown) => (run.failed = err));
      closers.push(async () => {
        run.stop();
        await done.catch(() => undefined);
      });
      return run;
    };
    const retained = fromZero();
    await waitFor('the 5 retained, or a failure', () => (retained.printed.length >= 5 || retained.failed !== null ? true : undefined));
    expect(retained.failed).to.equal(null);
    expect(retained.printed).to.deep.equal([6, 7, 8, 9, 10]);

    // every entry trimmed: nothing is retained, and nothing after where the tail starts was lost
    await redis.xtrim(streamKey, 'MAXLEN', 0);
    const follower = new StreamFollower({ redis, streamKey });
    await follower.start('0');
    expect(follower.positions(), 'from after the last entry trimmed').to.deep.equal([last]);
    // (whether the tail starts before version 11 or after it, it starts before it)
    const empty = fromZero();
    await append(streamKey, deploymentId, 11);
    await waitFor('version 11, or a failure', () => (empty.printed.length >= 1 || empty.failed !== null ? true : undefined));
    expect(empty.failed).to.equal(null);
    expect(empty.printed).to.deep.equal([11]);
  });

  it("a cursor's 0-0 on a partition empty when it was made: every entry after it, or a resync once entries there were trimmed", async () => {
    await recordPartitions(redis, streamKey, 2);
    const keys = partitionKeys(streamKey, 2);
    const onPartition = (n: number): string => {
      for (;;) {
        const id = randomUUID();
        if (partitionOf(id, 2) === n) return id;
      }
    };
    const [a, b] = [onPartition(0), onPartition(1)];
    await append(keys[0] ?? '', a, 1);
    // a watch from now: its start id has partition 1 at 0-0 (empty)
    const first = await watch('');
    const cursor = await waitFor('the start id', () => first.lastEventId() ?? undefined);
    expect((JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8')) as { ids: string[] }).ids[1]).to.equal('0-0');
    first.close();
    for (let v = 1; v <= 10; v++) await append(keys[1] ?? '', b, v);

    const resumed = await watch('', { 'last-event-id': cursor });
    await waitFor('the 10 of partition 1', () => (resumed.transitions().length >= 10 ? true : undefined));
    expect(versions(resumed)).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    resumed.close();

    await redis.xtrim(keys[1] ?? '', 'MAXLEN', 5); // versions 1 to 5 of b are gone: a real gap after 0-0
    const kept = (await ids(keys[1] ?? ''))[0];
    const late = await watch(`?after=${cursor}`);
    let ended = false;
    void late.ended.then(() => (ended = true));
    await waitFor('the end, or a transition', () => (ended || late.transitions().length > 0 ? true : undefined));
    expect(late.transitions()).to.deep.equal([]);
    const resync = JSON.parse(late.blocks.find((block) => block.event === 'resync')?.data ?? '{}') as { reason?: string; message?: string };
    expect(resync.reason).to.equal('trimmed');
    expect(resync.message).to.contain(`${keys[1]} no longer holds what came after this position (it now starts at ${kept})`);
  });

  it('?after=$ is a watch without after: its start id comes first, and a reconnect before any event misses nothing', async () => {
    const deploymentId = randomUUID();
    await append(streamKey, deploymentId, 1); // before the watch: not for it
    const now = await watch('?after=$');
    await waitFor('the watch live', () => (hub.watchers.live === 1 ? true : undefined));
    await append(streamKey, deploymentId, 2);
    await waitFor('version 2', () => (now.transitions().length >= 1 ? true : undefined));
    const startIds = now.blocks.filter((b) => b.id !== undefined && b.event === undefined && b.data === undefined && b.comments.length === 0);
    expect(startIds, 'an id-only block before the first transition').to.have.length(1);
    expect(now.blocks.findIndex((b) => b === startIds[0])).to.be.below(now.blocks.findIndex((b) => b.event === 'transition'));
    now.close();

    // an EventSource that reconnects sends the start id as Last-Event-ID, with the same URL
    await append(streamKey, deploymentId, 3);
    const again = await watch('?after=$', { 'last-event-id': startIds[0]?.id ?? '' });
    await waitFor('versions 2 and 3', () => (again.transitions().length >= 2 ? true : undefined));
    expect(versions(again)).to.deep.equal([2, 3]);
  });
});
