/**
 * `GET /api/watch` (issue 31, items 1 and 2) over real Redis and PostgreSQL: transitions applied through the real
 * service, published by a real relay, watched over real HTTP by one reader per process; resume, resync, overflow,
 * auth, keep-alive, a repartition while watching, and the process's stop.
 */
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import type IORedis from 'ioredis';
import { ResyncRequiredError } from '../../src/errors';
import type { HttpDeps } from '../../src/http/server';
import { createToken } from '../../src/http/tokens';
import { FleetMetrics } from '../../src/metrics';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { TransitionService } from '../../src/services/transitions';
import { OutboxRelay } from '../../src/streams/outbox-relay';
import { partitionKeys, partitionsRecordKey, recordPartitions, repartitionsKey } from '../../src/streams/partitions';
import { repartition } from '../../src/streams/repartition';
import { encodeCursor, StreamFollower } from '../../src/streams/stream-follower';
import { WatchHub } from '../../src/streams/watch-hub';
import { repoRoot } from '../../src/util';
import { forgetOutbox, openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { testHttpServer } from '../helpers/http';
import { applyVersions } from '../helpers/lifecycle';
import { freePort } from '../helpers/net';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { openSse, type SseClient } from '../helpers/sse';
import { waitFor } from '../helpers/wait';

type Entry = Record<string, string>;

/** A Unix stream socket's send buffer: net.core.wmem_default (no autotuning for Unix sockets, unlike TCP's). */
function unixSendBuffer(): number {
  try {
    return Number(fs.readFileSync('/proc/sys/net/core/wmem_default', 'utf8').trim());
  } catch {
    return 4 * 1024 * 1024; // not Linux: larger than any default
  }
}

/**
 * The most that the kernel takes from the server for a Unix-socket client that reads nothing (see `stalledClient`):
 * the send buffer, and a write of at most half of it that may go past it; doubled to be safe.
 */
const SOCKET_HOLDS = 2 * unixSendBuffer();

/** A chunked HTTP body's content. */
function dechunk(chunked: string): string {
  let out = '';
  for (let at = 0; ;) {
    const lineEnd = chunked.indexOf('\r\n', at);
    const size = parseInt(chunked.slice(at, lineEnd), 16);
    if (!(size > 0)) return out;
    const start = lineEnd + 2;
    out += Buffer.from(chunked.slice(start)).subarray(0, size).toString('utf8');
    at = start + Buffer.from(chunked.slice(start)).subarray(0, size).toString('utf8').length + 2;
  }
}

/** The raw header lines of a GET (Node joins repeated ones in `headers`). */
function rawHeaders(url: string): Promise<Array<[string, string]>> {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        res.resume();
        const pairs: Array<[string, string]> = [];
        for (let i = 0; i + 1 < res.rawHeaders.length; i += 2) pairs.push([res.rawHeaders[i] ?? '', res.rawHeaders[i + 1] ?? '']);
        resolve(pairs);
      })
      .on('error', reject);
  });
}

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
    await forgetOutbox(db);
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
  const onStream = (partitions: number): Promise<Entry[]> => onKeys(partitionKeys(streamKey, partitions));

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
    expect(all.blocks[0], 'the first block').to.deep.equal({ retry: '2000', comments: [] });

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

  it('resumes with Last-Event-ID across 4 partitions after a disconnect: nothing missed, nothing repeated, each deployment in order', async () => {
    await recordPartitions(redis, streamKey, 4);
    relay(4);
    // a small ring and small reads: the resume catches up from Redis, then from the ring, then live
    const hub = new WatchHub({ streamKey, connect: () => testRedis(), ringSize: 8, count: 5 });
    const { url } = await serve({}, { watch: { hub } });
    const ids = Array.from({ length: 16 }, () => randomUUID());
    const versions = async (from: number, to: number) => {
      for (let v = from; v <= to; v++) for (const id of ids) await applyVersions(service, id, v, v);
    };
    const first = await watch(`${url}/api/watch`);
    await versions(1, 3);
    await waitFor('48 on the first watch', () => (first.transitions().length >= 48 ? true : undefined));
    first.close();
    const cursor = first.lastEventId() ?? '';
    await versions(4, 6); // while it is away
    // back, while transitions go on being applied
    const writing = versions(7, 10);
    const second = await watch(`${url}/api/watch`, { 'last-event-id': cursor }, false);
    const third = await watch(`${url}/api/watch?after=${cursor}`, {}, false);
    await writing;
    // both caught up and joined the live feed (not reading Redis for ever)
    await waitFor('both resumed watches live', () => (hub.watchers.live === 2 ? true : undefined));
    for (const [name, client] of [
      ['Last-Event-ID', second],
      ['after', third],
    ] as const) {
      await waitFor(`the rest on the watch resumed by ${name}`, () => (client.transitions().length >= 112 ? true : undefined));
      const seen = [...first.transitions(), ...client.transitions()].map((t) => t.entry);
      expect(transitionIds(seen), name).to.deep.equal(transitionIds(await onStream(4)));
      for (const id of ids) expect(versionsOf(seen).get(id), `${name}: ${id}`).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }
    expect(JSON.parse(Buffer.from(second.lastEventId() ?? '', 'base64url').toString('utf8'))).to.deep.include({ p: 4, r: 0 });
  });

  it('a cursor whose position was trimmed gets event: resync, with where the stream starts and how to backfill, then the stream ends', async () => {
    relay();
    const { url } = await serve();
    const first = await watch(`${url}/api/watch`);
    await readyDeployment();
    await waitFor('4 transitions', () => (first.transitions().length >= 4 ? true : undefined));
    const cursor = first.transitions()[0]?.id ?? '';
    await redis.xtrim(streamKey, 'MAXLEN', 2);
    const kept = (await redis.xrange(streamKey, '-', '+', 'COUNT', 1))[0]?.[0];
    for (const [query, headers] of [
      ['', { 'last-event-id': cursor }],
      [`?after=${cursor}`, {}],
    ] as const) {
      const resumed = await watch(`${url}/api/watch${query}`, headers, false);
      await resumed.ended;
      expect(resumed.transitions()).to.deep.equal([]);
      const resync = resumed.blocks.find((b) => b.event === 'resync');
      const data = JSON.parse(resync?.data ?? '{}') as Record<string, unknown>;
      expect(data).to.deep.include({
        reason: 'trimmed',
        positions: { [streamKey]: kept },
        backfill: 'GET /api/deployments/{id}/transitions?afterVersion={last version you have}',
      });
      expect(data.message).to.contain(`${streamKey} no longer holds what came after this position (it now starts at ${kept})`);
      expect(resumed.blocks[resumed.blocks.length - 1]?.event, 'the last block').to.equal('resync');
    }
  });

  it('a malformed Last-Event-ID is a resync (bad_cursor), a malformed ?after a 400; a cursor two layouts old is a resync (repartitioned)', async () => {
    const { url } = await serve();
    const garbled = await watch(`${url}/api/watch`, { 'last-event-id': 'not-a-cursor!' }, false);
    await garbled.ended;
    expect(garbled.status).to.equal(200);
    expect(JSON.parse(garbled.blocks.find((b) => b.event === 'resync')?.data ?? '{}')).to.deep.include({
      reason: 'bad_cursor',
      message: 'Last-Event-ID: must be a cursor (the id of an event of this watch) or a stream id like 1763900000000-0 or 0, got "not-a-cursor!"',
    });

    const bad = await watch(`${url}/api/watch?after=not-a-cursor`, {}, false);
    await bad.ended;
    expect(bad.status).to.equal(400);
    expect(JSON.parse(bad.text())).to.deep.equal({
      error: {
        code: 'invalid_query',
        message: 'after: must be a cursor (the id of an event of this watch) or a stream id like 1763900000000-0 or 0, got "not-a-cursor"',
      },
    });

    // three repartitions, the last two since the cursor: what was written in between cannot be put in order; a
    // cursor without `r` for another number of partitions, after more than one repartition, neither
    const multi = redis.multi().set(partitionsRecordKey(streamKey), '1');
    for (let i = 0; i < 3; i++) multi.incr(repartitionsKey(streamKey));
    await multi.exec();
    for (const cursor of [encodeCursor({ p: 1, r: 1, ids: ['0-0'] }), encodeCursor({ p: 2, ids: ['0-0', '0-0'] })]) {
      const old = await watch(`${url}/api/watch`, { 'last-event-id': cursor }, false);
      await old.ended;
      const data = JSON.parse(old.blocks.find((b) => b.event === 'resync')?.data ?? '{}') as { reason?: string; message?: string };
      expect(data.reason).to.equal('repartitioned');
      expect(data.message).to.match(/^Last-Event-ID: the cursor is for \d partition\(s\).*backfill, then watch again without a cursor$/);
    }
  });

  it('answers 401 (naming Bearer and Basic), 403 and 400; takes a bearer token and the token as a basic-auth password', async () => {
    const { url } = await serve({ FLEET_API_TOKENS_FILE: tokensFile });
    const answer = async (query: string, headers: Record<string, string>) => {
      const client = await watch(`${url}/api/watch${query}`, headers, false);
      if (client.status !== 200) await client.ended;
      return client;
    };
    const anonymous = await answer('', {});
    expect(anonymous.status).to.equal(401);
    const challenges = (await rawHeaders(`${url}/api/watch`)).filter(([name]) => name.toLowerCase() === 'www-authenticate').map(([, v]) => v);
    expect(challenges).to.deep.equal(['Bearer realm="lifecycle-fleet"', 'Basic realm="lifecycle-fleet", charset="UTF-8"']);
    expect((await answer('', { authorization: `Bearer ${createToken('nobody', ['read']).token}` })).status).to.equal(401);
    expect((await answer('', { authorization: `Basic ${Buffer.from(`me:wrong`).toString('base64')}` })).status).to.equal(401);
    const lacking = await answer('', bearer('writer'));
    expect(lacking.status).to.equal(403);
    expect(JSON.parse(lacking.text())).to.deep.equal({ error: { code: 'forbidden', message: 'this token lacks the "read" scope' } });
    for (const headers of [bearer('reader'), { authorization: `Basic ${Buffer.from(`anyone:${tokens.reader.token}`).toString('base64')}` }]) {
      const ok = await answer('', headers);
      expect(ok.status).to.equal(200);
      await waitFor('the start id', () => (ok.lastEventId() !== null ? true : undefined));
    }
    const many = Array.from({ length: 101 }, () => randomUUID()).join(',');
    for (const [query, message] of [
      ['?deploymentId=nope', 'deploymentId: must be a UUID, got "nope"'],
      [`?deploymentId=${many}`, 'deploymentId: at most 100 values, got 101'],
      ['?state=ready&state=sleeping', 'state: must be one of pending, deploying, ready, failed, unknown, got "sleeping"'],
    ] as const) {
      const refused = await answer(query, bearer('reader'));
      expect(refused.status, query).to.equal(400);
      expect(JSON.parse(refused.text()), query).to.deep.equal({ error: { code: 'invalid_query', message } });
    }
  });

  it("sends a keep-alive comment at the injected interval; a filtered watch's carries its cursor past what it left out", async () => {
    relay();
    const { url } = await serve({}, { watch: { keepAliveMs: 20 }, requestTimeoutMs: 200 });
    const [quiet, busy] = [randomUUID(), randomUUID()];
    const all = await watch(`${url}/api/watch`);
    const filtered = await watch(`${url}/api/watch?deploymentId=${quiet}`);
    await waitFor('a keep-alive', () => (all.blocks.some((b) => b.comments.includes('keep-alive')) ? true : undefined));
    // a watch outlives the server's whole-request timeout (a request is whole once its headers are in)
    const keepAlives = () => all.blocks.filter((b) => b.comments.includes('keep-alive')).length;
    await waitFor('keep-alives past the request timeout', () => (keepAlives() >= 30 ? true : undefined));
    await readyDeployment(busy);
    await waitFor('4 entries', async () => ((await redis.xlen(streamKey)) >= 4 ? true : undefined));
    const newest = (await redis.xrevrange(streamKey, '+', '-', 'COUNT', 1))[0]?.[0];
    await waitFor('the filtered watch past the busy deployment', () => {
      const id = filtered.lastEventId();
      return id !== null && (JSON.parse(Buffer.from(id, 'base64url').toString('utf8')) as { ids: string[] }).ids[0] === newest ? true : undefined;
    });
    expect(filtered.transitions()).to.deep.equal([]);
    expect(filtered.blocks.some((b) => b.comments.includes('keep-alive') && b.id === filtered.lastEventId())).to.equal(true);
    // a watch resumed from there gets nothing of the busy deployment: only what came after
    const resumed = await watch(`${url}/api/watch`, { 'last-event-id': filtered.lastEventId() ?? '' }, false);
    await readyDeployment(quiet);
    await waitFor('the quiet deployment', () => (resumed.transitions().length >= 4 ? true : undefined));
    expect(resumed.transitions().map((t) => t.entry.deploymentId)).to.deep.equal([quiet, quiet, quiet, quiet]);
  });

  it('answers HEAD with the headers alone and ends it: no watch opens, and its keep-alive connection serves the next request', async () => {
    const { url } = await serve();
    const socket = net.connect(Number(new URL(url).port), '127.0.0.1');
    closers.push(async () => void socket.destroy());
    let received = '';
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => (received += chunk));
    socket.write('HEAD /api/watch HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
    await waitFor('the answer to HEAD', () => (received.includes('\r\n\r\n') ? true : undefined));
    expect(received).to.match(/^HTTP\/1\.1 200 /);
    expect(received.toLowerCase()).to.contain('\r\ncontent-type: text/event-stream; charset=utf-8\r\n');
    expect(received.toLowerCase(), 'no length: the GET has none').to.not.contain('\r\ncontent-length:');
    expect(received.endsWith('\r\n\r\n'), 'nothing after the headers').to.equal(true);
    received = '';
    socket.write('GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
    await waitFor('GET /healthz answered on the same connection', () => (/^HTTP\/1\.1 200 [\s\S]*\r\n\r\n/.test(received) ? true : undefined));
    expect(await metricValue('fleet_watchers')).to.equal(0);
    // checked as the GET is
    received = '';
    socket.write('HEAD /api/watch?state=sleeping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
    await waitFor('the answer to a HEAD with a bad filter', () => (received.includes('\r\n\r\n') ? true : undefined));
    expect(received).to.match(/^HTTP\/1\.1 400 /);
  });

  it('reads the stream once per process, whatever the number of watchers (one reader connection)', async () => {
    relay();
    const { url } = await serve();
    const clients = await Promise.all(Array.from({ length: 20 }, (_, i) => watch(`${url}/api/watch${i % 2 === 0 ? '' : '?state=ready'}`)));
    const readers = String(await redis.call('CLIENT', 'LIST'))
      .split('\n')
      .filter((line) => / name=lifecycle-fleet-watch /.test(line));
    expect(readers, 'connections named lifecycle-fleet-watch').to.have.length(1);
    expect(await metricValue('fleet_watchers')).to.equal(20);
    await readyDeployment();
    await readyDeployment();
    for (const [i, client] of clients.entries()) {
      await waitFor(`watcher ${i}`, () => (client.transitions().length >= (i % 2 === 0 ? 8 : 2) ? true : undefined));
    }
    for (const client of clients.slice(0, 5)) client.close();
    await waitFor('15 watchers', async () => ((await metricValue('fleet_watchers')) === 15 ? true : undefined));
  });

  it('closes a watch whose client does not read with event: overflow, and counts it, while another keeps receiving', async () => {
    const maxUnsentBytes = 64 * 1024;
    const { app, url } = await serve({}, { watch: { maxUnsentBytes, endGraceMs: 60_000 } });
    const reading = await watch(`${url}/api/watch`);
    const stalled = await stalledClient(app, 'GET /api/watch HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
    await waitFor('two watchers', async () => ((await metricValue('fleet_watchers')) === 2 ? true : undefined));
    // reads of 8 entries of 32 KiB, each once the reading watch has the one before (it never falls behind), until
    // the stalled one's kernel buffer and its bound are full, and one more that finds it so
    const deploymentId = randomUUID();
    const perRead = 8;
    const reads = Math.ceil((SOCKET_HOLDS + maxUnsentBytes) / (perRead * 32 * 1024)) + 2;
    const add = async (from: number, to: number) => {
      await appendBulky(from, to, 32 * 1024, deploymentId);
      await waitFor(`${to} on the reading watch`, () => (reading.transitions().length >= to ? true : undefined));
    };
    for (let read = 0; read < reads; read++) await add(read * perRead + 1, read * perRead + perRead);
    await waitFor('the overflow counted', async () => ((await metricValue('fleet_watch_overflows_total')) === 1 ? true : undefined));
    expect(await metricValue('fleet_watchers')).to.equal(1);
    const total = reads * perRead + 1;
    await add(total, total);
    expect(reading.transitions().map((t) => Number(t.entry.version))).to.deep.equal(Array.from({ length: total }, (_, i) => i + 1));

    // the stalled client, reading at last, finds some events, then the overflow with the cursor of the last one, then the end
    stalled.resume();
    await waitFor('the end of the stalled response', () => (stalled.received().endsWith('\r\n0\r\n\r\n') ? true : undefined));
    const received = stalled.received();
    const body = dechunk(received.slice(received.indexOf('\r\n\r\n') + 4));
    const blocks = body.split('\n\n');
    const ids = blocks.filter((b) => b.includes('event: transition')).map((b) => /^id: (.*)$/m.exec(b)?.[1]);
    const overflow = blocks.find((b) => b.startsWith('event: overflow\n'));
    expect(ids.length)
      .to.be.greaterThan(0)
      .and.lessThan(reads * perRead);
    expect(JSON.parse(/^data: (.*)$/m.exec(overflow ?? '')?.[1] ?? '{}')).to.deep.equal({
      message: 'this watch left more than 65536 bytes unsent: the client reads too slowly; resume from the cursor',
      cursor: ids[ids.length - 1],
    });
    expect(blocks[blocks.length - 2], 'the last block').to.equal(overflow);
  });

  it('follows a repartition while watching: live watches, and watches resumed from before it, get every version once, in order', async () => {
    await recordPartitions(redis, streamKey, 2);
    relay(2);
    relay(2);
    const { url } = await serve();
    const ids = Array.from({ length: 12 }, () => randomUUID());
    const versions = async (from: number, to: number) => {
      for (let v = from; v <= to; v++) for (const id of ids) await applyVersions(service, id, v, v);
    };
    const live = await watch(`${url}/api/watch`);
    const some = await watch(`${url}/api/watch?deploymentId=${ids.slice(0, 3).join(',')}`);
    await versions(1, 2);
    await waitFor('24 live', () => (live.transitions().length >= 24 ? true : undefined));
    const before = live.lastEventId() ?? '';
    const writing = versions(3, 6);
    const outcome = await repartition({
      databaseUrl: db.url,
      redis,
      streamKey,
      to: 4,
      timeoutMs: 30_000,
      lockTimeoutMs: 30_000,
      pollMs: 50,
      report: () => undefined,
    });
    expect(outcome.kind).to.equal('repartitioned');
    await writing;
    await versions(7, 8);
    const every = (n: number) => Array.from({ length: n }, (_, i) => i + 1);
    await waitFor('96 live', () => (live.transitions().length >= 96 ? true : undefined));
    await waitFor('24 of some', () => (some.transitions().length >= 24 ? true : undefined));
    const stream = await onKeys([...new Set([...partitionKeys(streamKey, 2), ...partitionKeys(streamKey, 4)])]);
    expect(transitionIds(live.transitions().map((t) => t.entry))).to.deep.equal(transitionIds(stream));
    for (const id of ids) expect(versionsOf(live.transitions().map((t) => t.entry)).get(id), id).to.deep.equal(every(8));
    for (const id of ids.slice(0, 3)) expect(versionsOf(some.transitions().map((t) => t.entry)).get(id), id).to.deep.equal(every(8));
    expect(some.transitions()).to.have.length(24);
    expect(JSON.parse(Buffer.from(live.lastEventId() ?? '', 'base64url').toString('utf8'))).to.include({ p: 4, r: 1 });

    // from a cursor of the layout before: through this process's ring, and through a new process's catch-up from Redis
    const other = await serve();
    for (const [where, base] of [
      ['this process', url],
      ['a new process', other.url],
    ] as const) {
      const resumed = await watch(`${base}/api/watch`, { 'last-event-id': before }, false);
      await waitFor(`72 resumed on ${where}`, () => (resumed.transitions().length >= 72 ? true : undefined));
      for (const id of ids)
        expect(versionsOf(resumed.transitions().map((t) => t.entry)).get(id), `${where}: ${id}`).to.deep.equal([3, 4, 5, 6, 7, 8]);
      expect(resumed.transitions(), where).to.have.length(72);
    }
  });

  it('a reader that missed a whole layout ends its watches with a resync (repartitioned); the next watch gets a new reader', async () => {
    await recordPartitions(redis, streamKey, 2);
    const hub = new WatchHub({ streamKey, connect: () => testRedis(), blockMs: 100 });
    const { url } = await serve({}, { watch: { hub } });
    const live = await watch(`${url}/api/watch`);
    // 2 -> 4 -> 1 between two of its looks (as two repartitions' last steps)
    const multi = redis.multi().set(partitionsRecordKey(streamKey), '1');
    for (let i = 0; i < 2; i++) multi.incr(repartitionsKey(streamKey));
    await multi.exec();
    await live.ended;
    const resync = JSON.parse(live.blocks.find((b) => b.event === 'resync')?.data ?? '{}') as { reason?: string; message?: string };
    expect(resync.reason).to.equal('repartitioned');
    expect(resync.message).to.contain(`${streamKey} was repartitioned 2 times since this reader last looked`);
    // a new reader for the next watch, on the layout now
    const next = await watch(`${url}/api/watch`);
    await redis.xadd(streamKey, '*', 'type', 'state_transition', 'deploymentId', randomUUID(), 'version', '1', 'to', 'pending');
    await waitFor('the entry on the next watch', () => (next.transitions().length === 1 ? true : undefined));
    expect(hub.watchers).to.deep.equal({ open: 1, live: 1, waiting: 0 });
  });

  it('ends every watch when the server closes, without waiting for the streams', async () => {
    const { app, url } = await serve();
    const clients = await Promise.all([1, 2, 3].map(() => watch(`${url}/api/watch`)));
    const resuming = await watch(`${url}/api/watch?after=0`, {}, false);
    await app.close();
    for (const client of [...clients, resuming]) await client.ended;
    expect(await metricValue('fleet_watchers')).to.equal(0);
  });

  it('fleet http stops promptly on SIGTERM with a watcher connected, ending the watch', async () => {
    const port = await freePort();
    const env = {
      ...process.env,
      REDIS_URL: testEnv().redisUrl,
      DATABASE_URL: db.url,
      FLEET_PREFIX: prefix,
      FLEET_HTTP_PORT: String(port),
      LOG_FORMAT: 'json',
    };
    const child = spawn(process.execPath, [path.join(repoRoot(), 'bin', 'fleet.js'), 'http'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (out += chunk.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    closers.push(async () => {
      child.kill('SIGKILL');
      await exited;
    });
    await waitFor('fleet http to start', () => (out.includes('http started') ? true : undefined), 30_000);
    const client = await watch(`http://127.0.0.1:${port}/api/watch`);
    child.kill('SIGTERM');
    expect(await exited, out).to.equal(0);
    await client.ended;
    expect(out).to.not.contain('did not stop in time');
    expect(out).to.contain('"msg":"stopped"');
  });

  it('paces a catch-up by its client: one far behind that reads slowly gets everything, never an overflow', async () => {
    const maxUnsentBytes = 64 * 1024;
    const hub = new WatchHub({ streamKey, connect: () => testRedis() });
    const { app } = await serve({}, { watch: { hub, maxUnsentBytes } });
    // behind by more than three of the hub's reads (100 entries), and by four times what its kernel buffer and its
    // bound hold together
    const behind = 320;
    await appendBulky(1, behind, Math.ceil((4 * (SOCKET_HOLDS + maxUnsentBytes)) / behind));
    const slow = await stalledClient(app, 'GET /api/watch?after=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
    await waitFor('the catch-up to wait for its client', () => (hub.watchers.waiting === 1 ? true : undefined));
    expect(await metricValue('fleet_watch_overflows_total')).to.equal(0);
    slow.resume();
    await waitFor(`all ${behind}`, () => (slow.received().split('event: transition\n').length > behind ? true : undefined));
    await waitFor('the watch live', () => (hub.watchers.live === 1 ? true : undefined));
    expect(await metricValue('fleet_watch_overflows_total')).to.equal(0);
  });

  it('a catch-up that the ring left behind while it waited for its client goes back to Redis: everything once, in order', async () => {
    const ringSize = 8;
    const hub = new WatchHub({ streamKey, connect: () => testRedis(), ringSize });
    const { app, url } = await serve({}, { watch: { hub, maxUnsentBytes: 64 * 1024 * 1024 } });
    const reading = await watch(`${url}/api/watch`);
    const start = reading.lastEventId() ?? '';
    // a ring's worth holds twice what the client's kernel buffer does: its catch-up waits before the ring's middle
    const bytes = Math.ceil((2 * SOCKET_HOLDS) / ringSize);
    const add = async (from: number, to: number) => {
      await appendBulky(from, to, bytes);
      await waitFor(`${to} read by the hub`, () => (reading.transitions().length >= to ? true : undefined));
    };
    await add(1, ringSize); // all in the ring
    // a client from before them that reads nothing for now: its catch-up from the ring waits for it
    const slow = await stalledClient(app, `GET /api/watch HTTP/1.1\r\nHost: 127.0.0.1\r\nLast-Event-ID: ${start}\r\n\r\n`);
    await waitFor('the catch-up to wait for its client', () => (hub.watchers.waiting === 1 ? true : undefined));
    const total = ringSize + Math.ceil(1.5 * ringSize);
    await add(ringSize + 1, total); // the ring moves past where it waits
    slow.resume();
    await waitFor('the slow watch live', () => (hub.watchers.live === 2 ? true : undefined));
    await waitFor(`all ${total} on the slow watch`, () => (slow.received().split('event: transition\n').length > total ? true : undefined));
    const versions = [...slow.received().matchAll(/"version":"(\d+)"/g)].map((m) => Number(m[1]));
    expect(versions).to.deep.equal(Array.from({ length: total }, (_, i) => i + 1));
  });

  it('a catch-up read checks, after it read, that trimming took nothing after its position: a resync, not a gap', async () => {
    for (let i = 1; i <= 10; i++) await redis.xadd(streamKey, '*', 'n', String(i));
    const follower = new StreamFollower({ redis, streamKey, count: 3 });
    await follower.start('0');
    const first = await follower.read({ block: false, verify: true });
    expect(first.entries.map((e) => e.fields[1])).to.deep.equal(['1', '2', '3']);
    await redis.xtrim(streamKey, 'MAXLEN', 2); // 4 to 8 are gone
    const refused = await follower.read({ block: false, verify: true }).then(
      () => null,
      (err: unknown) => err,
    );
    expect(refused).to.be.instanceOf(ResyncRequiredError);
    expect((refused as ResyncRequiredError).firstRetained).to.equal((await redis.xrange(streamKey, '-', '+', 'COUNT', 1))[0]?.[0]);
  });

  /** A client of the server of `app` that sends its request and reads nothing until `resume()`. */
  interface StalledClient {
    resume(): void;
    /** what it read since it resumed, as it came (the raw HTTP answer) */
    received(): string;
  }

  /**
   * A stalled client comes in over a Unix socket, handed to the same HTTP server: the bytes the kernel takes from the
   * server for it are then at most its socket's send buffer and a write of half of it (`SOCKET_HOLDS`), fixed. Over
   * TCP they depend on the host: the send buffer grows with the connection up to tcp_wmem's maximum (4 MiB here, more
   * on hosts tuned for throughput), and the receive window up to tcp_rmem's, so a test that needs the server to find
   * its client not reading would need more bytes than any host can hold.
   */
  async function stalledClient(app: FastifyInstance, request: string): Promise<StalledClient> {
    const socketPath = path.join(dir, `${randomUUID().slice(0, 8)}.sock`);
    const door = net.createServer((socket) => app.server.emit('connection', socket));
    await new Promise<void>((resolve) => door.listen(socketPath, resolve));
    closers.push(async () => void door.close());
    const socket = net.connect(socketPath);
    socket.pause(); // paused before it connects: it reads nothing at all
    closers.push(async () => void socket.destroy());
    socket.write(request);
    let received = '';
    return {
      resume: () => {
        socket.setEncoding('utf8');
        socket.on('data', (chunk: string) => (received += chunk));
        socket.resume();
      },
      received: () => received,
    };
  }

  /** Appends versions `from` to `to` straight to the stream (no relay), each with `bytes` of reason: bulk that fills buffers. */
  async function appendBulky(from: number, to: number, bytes: number, deploymentId?: string): Promise<void> {
    const pipeline = redis.pipeline();
    for (let v = from; v <= to; v++) {
      const fields = ['type', 'state_transition', 'deploymentId', deploymentId ?? randomUUID(), 'version', String(v), 'to', 'pending'];
      pipeline.xadd(streamKey, '*', ...fields, 'reason', 'x'.repeat(bytes));
    }
    await pipeline.exec();
  }

  async function onKeys(keys: readonly string[]): Promise<Entry[]> {
    const out: Entry[] = [];
    for (const key of keys) {
      for (const [, fields] of await redis.xrange(key, '-', '+')) {
        const entry: Entry = {};
        for (let i = 0; i + 1 < fields.length; i += 2) entry[fields[i] ?? ''] = fields[i + 1] ?? '';
        out.push(entry);
      }
    }
    return out;
  }

  async function metricValue(name: string): Promise<number> {
    const line = (await metrics.text()).split('\n').find((l) => l.startsWith(`${name} `));
    return Number(line?.split(' ')[1] ?? NaN);
  }
});
