import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { ConfigError } from '../../src/errors';
import { createLogger } from '../../src/log';
import { TransitionService } from '../../src/services/transitions';
import { parseEntry, type TransitionEntry } from '../../src/streams/consumer';
import { OutboxRelay } from '../../src/streams/outbox-relay';
import { partitionKey, partitionKeys, partitionOf, partitionsRecordKey, recordPartitions } from '../../src/streams/partitions';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

/** `count` transitions for one deployment: created, then attempts created and cancelled in turn. */
async function transitions(service: TransitionService, deploymentId: string, count: number): Promise<void> {
  await apply(service, 'deployment.create', { deploymentId, name: 'web' });
  for (let v = 2; v <= count; v += 2) {
    const attemptId = randomUUID();
    await apply(service, 'attempt.create', { deploymentId, attemptId });
    if (v < count) await apply(service, 'attempt.cancel', { deploymentId, attemptId });
  }
}

async function apply(service: TransitionService, name: string, data: Record<string, unknown>): Promise<void> {
  const result = await service.apply(name, data, { fallbackEventId: randomUUID() });
  if (result.outcome !== 'applied') throw new Error(`${name} was ${result.outcome}`);
}

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
    await db.dataSource.query(`UPDATE outbox SET published_at = COALESCE(published_at, now()), stream_id = NULL`);
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
      await Promise.all(deployments.map((id) => transitions(service, id, 6)));
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
      await transitions(service, id, 4);
      await waitFor('4 entries', async () => ((await redis.xlen(streamKey)) >= 4 ? true : undefined));
      expect((await readStream(redis, streamKey)).map((e) => e.version)).to.deep.equal([1, 2, 3, 4]);
      expect(await redis.get(partitionsRecordKey(streamKey))).to.equal('1');
      expect(await redis.exists(partitionKey(streamKey, 0, 2))).to.equal(0);
    });

    it('republishes what one partition lost before appending anything after the gap there', async () => {
      relay(4);
      const deployments: string[] = Array.from({ length: 8 }, () => randomUUID());
      for (const id of deployments) await transitions(service, id, 4);
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
      await transitions(service, more, 2);
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

    it('refuses a number of partitions other than the recorded one, naming both', async () => {
      await recordPartitions(redis, streamKey, 16);
      const err = await recordPartitions(redis, streamKey, 4).catch((e: unknown) => e);
      expect(err).to.be.instanceOf(ConfigError);
      expect((err as ConfigError).message).to.contain('written with 16 partition(s)').and.contain('but 4 are configured');
      expect(await redis.get(partitionsRecordKey(streamKey))).to.equal('16'); // nothing changed
      await recordPartitions(redis, streamKey, 16); // the same number is fine

      // a fleet from before partitions: its stream at the base key, no record, counts as 1
      const old = `${prefix}:old:transitions`;
      await redis.xadd(old, '*', 'type', 'state_transition');
      const before = await recordPartitions(redis, old, 8).catch((e: unknown) => e);
      expect((before as ConfigError).message).to.contain('written with 1 partition(s)').and.contain('but 8 are configured');
      expect(await redis.exists(partitionsRecordKey(old))).to.equal(0);

      // and the relay publishes nothing while the record names another number: its cycle fails, saying why
      let logged = '';
      const r = relay(4, { logger: createLogger('warn', { write: (line: string) => void (logged += line) }) });
      const id = randomUUID();
      await transitions(service, id, 2);
      await waitFor('the refusal in its log', () => (logged.includes('but 4 are configured') ? true : undefined));
      expect(r.publishedCount).to.equal(0);
      const [row] = await db.dataSource.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM outbox WHERE deployment_id = $1 AND published_at IS NULL`, [id]);
      expect(Number(row?.n)).to.equal(2);
      expect(await lengths(4)).to.equal(0);
    });
  });
});
