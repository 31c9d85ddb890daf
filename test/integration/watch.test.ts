/**
 * `GET /api/watch` (issue 31, items 1 and 2) over real Redis and PostgreSQL: transitions applied through the real
 * service, published by a real relay, watched over real HTTP by one reader per process; resume, resync, overflow,
 * auth, keep-alive, a repartition while watching, and the process's stop.
 */
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import type IORedis from 'ioredis';
import type { HttpDeps } from '../../src/http/server';
import { createToken } from '../../src/http/tokens';
import { FleetMetrics } from '../../src/metrics';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { TransitionService } from '../../src/services/transitions';
import { OutboxRelay } from '../../src/streams/outbox-relay';
import { partitionKeys, partitionsRecordKey, recordPartitions, repartitionsKey } from '../../src/streams/partitions';
import { repartition } from '../../src/streams/repartition';
import { encodeCursor } from '../../src/streams/stream-follower';
import { WatchHub } from '../../src/streams/watch-hub';
import { repoRoot } from '../../src/util';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { testHttpServer } from '../helpers/http';
import { applyVersions } from '../helpers/lifecycle';
import { freePort } from '../helpers/net';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { openSse, type SseClient } from '../helpers/sse';
import { waitFor } from '../helpers/wait';

type Entry = Record<string, string>;

/** Per deployment, the versions in the order they came. */
function versionsOf(entries: readonly Entry[]): Map<string, number[]> {
  const by = new Map<string, number[]>();
  for (const e of entries) by.set(e.deploymentId ?? '', [...(by.get(e.deploymentId ?? '') ?? []), Number(e.version)]);
  return by;
}

describe('GET /api/watch: transitions as server-sent events', function () {
  this.timeout(120_000);
  let db: TestDatabase;
  let service: TransitionService;
  let prefix: string;
  let streamKey: string;
  let redis: IORedis;
  let producer: LifecycleProducer;
  let maintenance: Queue;
  let metrics: FleetMetrics;
  let dir: string;
  let tokensFile: string;
  const closers: Array<() => Promise<void>> = [];
  const tokens = {
    reader: createToken('reader', ['read']),
    writer: createToken('writer', ['events:write']),
  };
  const bearer = (t: keyof typeof tokens) => ({ authorization: `Bearer ${tokens[t].token}` });

  before(async () => {
    db = await openTestDatabase(8);
    service = new TransitionService({ dataSource: db.dataSource });
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'watch-'));
    tokensFile = path.join(dir, 'tokens.json');
    fs.writeFileSync(tokensFile, JSON.stringify(Object.values(tokens).map((t) => t.entry)), { mode: 0o600 });
  });
  after(async () => {
    await db?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    prefix = uniquePrefix();
    streamKey = `${prefix}:transitions`;
    redis = testRedis();
    producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix });
    metrics = new FleetMetrics({}, { defaultMetrics: false });
    // every test has a stream of its own over the one database: earlier tests' rows are not pending
    await db.dataSource.query(`UPDATE outbox SET published_at = COALESCE(published_at, now()), stream_id = NULL`);
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    await maintenance.close();
    await producer.close();
    redis.disconnect();
    await dropPrefix(prefix);
  });

  function relay(partitions = 1): OutboxRelay {
    const r = new OutboxRelay({ databaseUrl: db.url, redis: testEnv().redisUrl, streamKey, partitions, standbyRetryMs: 100 });
    closers.push(() => r.close());
    r.start();
    return r;
  }

  /** A listening server (real HTTP: a stream cannot be injected); its base URL. */
  async function serve(env: Record<string, string> = {}, overrides: Partial<HttpDeps> = {}): Promise<{ app: FastifyInstance; url: string }> {
    const app = await testHttpServer({ prefix, dataSource: db.dataSource, producer, redis, maintenance }, env, { metrics, ...overrides });
    await app.listen({ host: '127.0.0.1', port: 0 });
    closers.push(() => app.close());
    const address = app.server.address();
    return { app, url: `http://127.0.0.1:${typeof address === 'object' && address !== null ? address.port : 0}` };
  }

  /** A watch, closed after the test; `live`: waits for its start id (a watch without a cursor is live from there). */
  async function watch(url: string, headers: Record<string, string> = {}, live = true): Promise<SseClient> {
    const client = await openSse(url, headers);
    closers.push(async () => client.close());
    if (live) await waitFor(`the watch at ${url} to be live`, () => (client.lastEventId() !== null ? true : undefined));
    return client;
  }

  /** Everything on the stream's partitions (of P), in each partition's order. */
  async function onStream(partitions: number): Promise<Entry[]> {
    const out: Entry[] = [];
    for (const key of partitionKeys(streamKey, partitions)) {
      for (const [, fields] of await redis.xrange(key, '-', '+')) {
        const entry: Entry = {};
        for (let i = 0; i + 1 < fields.length; i += 2) entry[fields[i] ?? ''] = fields[i + 1] ?? '';
        out.push(entry);
      }
    }
    return out;
  }

  const transitionIds = (entries: readonly Entry[]) => entries.map((e) => e.transitionId).sort();

  async function readyDeployment(deploymentId = randomUUID()): Promise<string> {
    const attemptId = randomUUID();
    const e = (name: string, data: Record<string, unknown>) => service.apply(name, { deploymentId, ...data }, { fallbackEventId: randomUUID() });
    await e('deployment.create', { name: 'web' });
    await e('attempt.create', { attemptId });
    await e('attempt.start', { attemptId });
    await e('attempt.end', { attemptId, outcome: 'succeeded' });
    return deploymentId;
  }

  it('delivers each transition live, as on the stream, filtered by deployment and by state', async () => {
    relay();
    const { url } = await serve();
    const [a, b, c] = [randomUUID(), randomUUID(), randomUUID()];
    const all = await watch(`${url}/api/watch`);
    const ab = await watch(`${url}/api/watch?deploymentId=${a},${b.toUpperCase()}`);
    const ac = await watch(`${url}/api/watch?deploymentId=${a}&deploymentId=${c}`);
    const ready = await watch(`${url}/api/watch?state=ready`);
    const readyOfB = await watch(`${url}/api/watch?state=ready,failed&deploymentId=${b}`);
    expect(all.status).to.equal(200);
    expect(all.headers).to.include({
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache, no-transform',
      'x-accel-buffering': 'no',
      connection: 'keep-alive',
    });
    expect(all.text().startsWith('retry: 2000\n\n')).to.equal(true);

    for (const id of [a, b, c]) await readyDeployment(id);
    await waitFor('12 entries published', async () => ((await redis.xlen(streamKey)) >= 12 ? true : undefined));
    const stream = await onStream(1);
    expect(stream).to.have.length(12);
    await waitFor('every transition on the unfiltered watch', () => (all.transitions().length >= 12 ? true : undefined));
    // exactly the stream's entries, fields and all, in its order
    expect(all.transitions().map((t) => t.entry)).to.deep.equal(stream);
    const expectOnly = async (client: SseClient, keep: (e: Entry) => boolean, what: string) => {
      const expected = stream.filter(keep);
      await waitFor(what, () => (client.transitions().length >= expected.length ? true : undefined));
      expect(
        client.transitions().map((t) => t.entry),
        what,
      ).to.deep.equal(expected);
    };
    await expectOnly(ab, (e) => e.deploymentId === a || e.deploymentId === b, 'a and b');
    await expectOnly(ac, (e) => e.deploymentId === a || e.deploymentId === c, 'a and c');
    await expectOnly(ready, (e) => e.to === 'ready', 'ready');
    await expectOnly(readyOfB, (e) => e.to === 'ready' && e.deploymentId === b, 'b to ready');
    // every id is a cursor: every partition's position after the event
    const last = all.transitions()[11]?.id ?? '';
    expect(JSON.parse(Buffer.from(last, 'base64url').toString('utf8'))).to.deep.equal({
      p: 1,
      r: 0,
      ids: [(await redis.xrevrange(streamKey, '+', '-', 'COUNT', 1))[0]?.[0]],
    });
  });
});
