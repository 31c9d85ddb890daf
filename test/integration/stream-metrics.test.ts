/**
 * /metrics on a partitioned transition stream (issue 29, "metrics"): per partition its length, per consumer group
 * its lag (undelivered plus unacknowledged) and the consumer holding its lease, as a live fleet serves them.
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { startFleet, type Fleet } from '../../src/app';
import { loadConfig } from '../../src/config';
import { silentLogger } from '../../src/log';
import { TransitionConsumer } from '../../src/streams/consumer';
import { transitionStreamKey } from '../../src/streams/outbox-relay';
import { leaseKey } from '../../src/streams/leases';
import { partitionKey } from '../../src/streams/partitions';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

const P = 4;

/** The samples of one metric on /metrics, as `{labels} value` lines keyed by their label set. */
function samples(text: string, metric: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const m of text.matchAll(new RegExp(`^${metric}(\\{[^}]*\\})? (\\S+)$`, 'gm'))) out.set(m[1] ?? '', Number(m[2]));
  return out;
}

describe('stream metrics: per-partition length, group lag and owner on /metrics', function () {
  this.timeout(120_000);
  let db: TestDatabase | null = null;
  let fleet: Fleet | null = null;
  let redis: IORedis | null = null;
  let consumer: TransitionConsumer | null = null;
  let release: () => void = () => undefined;
  const prefix = uniquePrefix();

  before(async () => {
    db = await openTestDatabase(4);
    redis = testRedis();
    const config = loadConfig({ FLEET_PREFIX: prefix, FLEET_HTTP_PORT: '0', FLEET_STREAM_PARTITIONS: String(P) });
    fleet = await startFleet(config, { redisUrl: testEnv().redisUrl, databaseUrl: db.url }, silentLogger, {
      http: true,
      worker: false,
      sweep: false,
    });
  });

  after(async () => {
    release();
    await consumer?.close();
    await fleet?.close(5000);
    redis?.disconnect();
    await db?.close();
    await dropPrefix(prefix);
  });

  it('shows each partition with its length, the lag of a group and its owner, and the lag falling to 0 once handled', async () => {
    const r = redis as IORedis;
    const base = transitionStreamKey(prefix);
    // partition n holds n + 1 entries
    for (let n = 0; n < P; n++) {
      for (let i = 0; i <= n; i++) {
        await r.xadd(partitionKey(base, n, P), '*', 'deploymentId', randomUUID(), 'version', '1', 'from', '', 'to', 'pending');
      }
    }
    const gate = new Promise<void>((resolve) => (release = resolve));
    const changes: string[] = [];
    const c = new TransitionConsumer({
      redis: testEnv().redisUrl,
      streamKey: base,
      group: 'audit',
      consumer: 'reader:1',
      startId: '0',
      handler: () => gate,
      leaseMs: 2000,
      onPartitionChange: ({ partition, change }) => changes.push(`${change} ${partition}`),
    });
    consumer = c;
    void c.run().catch(() => undefined);
    const scrape = async () => (await fetch(`${fleet?.httpUrl ?? ''}/metrics`)).text();

    // the handler holds the first entry: nothing is acknowledged, so every partition's lag is its length
    const text = await waitFor('the consumer to own every partition', async () => {
      const t = await scrape();
      return samples(t, 'fleet_stream_partition_owner').size === P ? t : undefined;
    });
    const expected = (value: (n: number) => number, labels: (n: number) => string) =>
      new Map(Array.from({ length: P }, (_, n) => [labels(n), value(n)] as const));
    expect(samples(text, 'fleet_stream_partition_length')).to.deep.equal(
      expected(
        (n) => n + 1,
        (n) => `{partition="${n}"}`,
      ),
    );
    expect(samples(text, 'fleet_stream_group_lag')).to.deep.equal(
      expected(
        (n) => n + 1,
        (n) => `{group="audit",partition="${n}"}`,
      ),
    );
    expect(samples(text, 'fleet_stream_partition_owner')).to.deep.equal(
      expected(
        () => 1,
        (n) => `{group="audit",partition="${n}",consumer="reader:1"}`,
      ),
    );

    release();
    await waitFor('every entry handled and acknowledged: lag 0 on every partition', async () => {
      const lag = samples(await scrape(), 'fleet_stream_group_lag');
      return lag.size === P && [...lag.values()].every((v) => v === 0) ? true : undefined;
    });
    // partition 0's lease taken by another consumer (as after an expiry): the consumer loses it, the owner changes
    await r.set(leaseKey(partitionKey(base, 0, P), 'audit'), 'reader:2:instance:holding', 'PX', 60_000);
    await waitFor('the consumer to report partition 0 lost', () => (changes.includes('lost 0') ? true : undefined));
    expect(samples(await scrape(), 'fleet_stream_partition_owner').get('{group="audit",partition="0",consumer="reader:2"}')).to.equal(1);
    await r.del(leaseKey(partitionKey(base, 0, P), 'audit'));
    await waitFor('the consumer to take partition 0 back', () => (changes.filter((x) => x === 'acquired 0').length === 2 ? true : undefined));
    await c.close();
    consumer = null;
    const after = await scrape();
    expect(samples(after, 'fleet_stream_partition_owner').size, 'no owner once the consumer closed').to.equal(0);
    // the consumer's own hook (for its process's metrics): every partition taken over, then handed back on close
    const all = (change: string) => Array.from({ length: P }, (_, n) => `${change} ${n}`);
    expect([...changes].sort()).to.deep.equal([...all('acquired'), 'acquired 0', 'lost 0', ...all('released')].sort());
    expect(samples(after, 'fleet_stream_partition_length')).to.deep.equal(
      expected(
        (n) => n + 1,
        (n) => `{partition="${n}"}`,
      ),
    );
  });
});
