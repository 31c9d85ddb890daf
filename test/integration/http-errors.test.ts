/**
 * One error shape for every HTTP error, and timeouts for slow clients (issue 15): requests that Node's parser or
 * Fastify refuse before any route runs, sent over a raw socket as a broken client would.
 */
import * as net from 'node:net';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import type IORedis from 'ioredis';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { TcpProxy } from '../helpers/proxy';
import { waitFor } from '../helpers/wait';
import { createDataSource } from '../../src/entities/schema/data-source';
import { testHttpServer } from '../helpers/http';

/** Sends `chunks` (a function may pace them) and returns what the server answered before it closed. */
function raw(port: number, send: (socket: net.Socket) => void): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    let data = '';
    socket.on('data', (c: Buffer) => (data += c.toString()));
    socket.on('error', reject);
    socket.on('close', () => {
      const [head = '', body = ''] = data.split('\r\n\r\n');
      resolve({ status: Number(head.split(' ')[1]), body });
    });
    socket.on('connect', () => send(socket));
  });
}

describe('HTTP errors: one shape, and timeouts for slow clients', function () {
  this.timeout(30_000);
  let db: TestDatabase;
  let prefix: string;
  let redis: IORedis;
  let producer: LifecycleProducer;
  let maintenance: Queue;
  let app: FastifyInstance;
  let port: number;

  before(async () => {
    db = await openTestDatabase(4);
    prefix = uniquePrefix();
    redis = testRedis();
    producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix });
    app = await testHttpServer(
      { prefix, dataSource: db.dataSource, producer, redis, maintenance },
      {},
      { requestTimeoutMs: 800, headersTimeoutMs: 800 },
    );
    await app.listen({ host: '127.0.0.1', port: 0 });
    port = (app.server.address() as net.AddressInfo).port;
  });
  after(async () => {
    await app?.close();
    await maintenance?.close();
    await producer?.close();
    redis?.disconnect();
    await dropPrefix(prefix);
    await db?.close();
  });

  const shape = (body: string) => JSON.parse(body) as { error: { code: string; message: string } };

  it('a URL that cannot be decoded: 400 bad_url', async () => {
    const res = await raw(port, (s) => s.end('GET /api/deployments/%E0%A4%A HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n'));
    expect(res.status).to.equal(400);
    expect(shape(res.body).error.code).to.equal('bad_url');
  });

  it('headers too large: 431 in the same shape', async () => {
    const res = await raw(port, (s) => s.end(`GET /api/deployments HTTP/1.1\r\nhost: x\r\nx-big: ${'a'.repeat(20_000)}\r\n\r\n`));
    expect(res.status).to.equal(431);
    expect(shape(res.body).error.code).to.equal('request_header_fields_too_large');
  });

  it('a body shorter than its Content-Length: 408 once the request timeout passes, not a connection held for ever', async () => {
    const res = await raw(port, (s) =>
      s.write('POST /api/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"name":'),
    );
    expect(res.status).to.equal(408);
    expect(shape(res.body).error.code).to.equal('request_timeout');
  });

  it('a body sent a byte at a time: 408 at the request timeout, whatever keeps trickling in', async () => {
    let timer: NodeJS.Timeout | undefined;
    const res = await raw(port, (s) => {
      s.write('POST /api/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n');
      timer = setInterval(() => s.writable && s.write('a'), 50);
    });
    clearInterval(timer);
    expect(res.status).to.equal(408);
    expect(shape(res.body).error.code).to.equal('request_timeout');
  });

  it("errors Fastify produces itself (an unsupported media type) carry the shape's code and message", async () => {
    const res = await app.inject({ method: 'POST', url: '/api/events', headers: { 'content-type': 'application/xml' }, payload: '<a/>' });
    expect(res.statusCode).to.equal(415);
    const body = res.json<{ error: { code: string; message: string } }>();
    expect(body.error.code).to.be.a('string');
    expect(body.error.message).to.be.a('string');
    expect(Object.keys(body)).to.deep.equal(['error']);
  });

  describe('Bull Board', () => {
    let board: FastifyInstance;
    const auth = { authorization: `Basic ${Buffer.from('ops:board-password-1').toString('base64')}` };
    before(async () => {
      board = await testHttpServer(
        { prefix, dataSource: db.dataSource, producer, redis, maintenance },
        { FLEET_BOARD_USER: 'ops', FLEET_BOARD_PASSWORD: 'board-password-1' },
      );
    });
    after(async () => {
      await board?.close();
    });

    it("answers its own errors in the API's shape", async () => {
      const res = await board.inject({ method: 'GET', url: '/admin/queues/api/queues/lifecycle/no-such-job', headers: auth });
      expect(res.statusCode).to.equal(404);
      expect(res.json()).to.deep.equal({ error: { code: 'not_found', message: 'job not found' } });
    });

    it("answers what Fastify refuses in the API's own codes, on the API's routes and the board's alike: no FST_ code reaches a client", async () => {
      const json = { 'content-type': 'application/json' };
      const bodies: Array<[string, Record<string, string>, string, number, string]> = [
        ['not JSON (FST_ERR_CTP_INVALID_MEDIA_TYPE)', { 'content-type': 'application/xml' }, '<a/>', 415, 'unsupported_media_type'],
        ['no content type (FST_ERR_CTP_INVALID_MEDIA_TYPE)', {}, 'hello', 415, 'unsupported_media_type'],
        ['an empty JSON body (FST_ERR_CTP_EMPTY_JSON_BODY)', json, '', 400, 'invalid_body'],
        ['broken JSON (FST_ERR_CTP_INVALID_JSON_BODY)', json, '{nope', 400, 'invalid_body'],
        ['a __proto__ key (FST_ERR_CTP_INVALID_JSON_BODY)', json, '{"__proto__":{"admin":true}}', 400, 'invalid_body'],
        ['a constructor.prototype key (FST_ERR_CTP_INVALID_JSON_BODY)', json, '{"constructor":{"prototype":{"admin":true}}}', 400, 'invalid_body'],
        [
          'a body shorter than its Content-Length (FST_ERR_CTP_INVALID_CONTENT_LENGTH)',
          { ...json, 'content-length': '10' },
          '{}',
          400,
          'invalid_body',
        ],
        ['a body over 64 KiB (FST_ERR_CTP_BODY_TOO_LARGE)', json, JSON.stringify({ name: 'x', data: 'y'.repeat(100_000) }), 413, 'payload_too_large'],
      ];
      const targets: Array<[string, string]> = [
        ['POST', '/api/events'],
        ['POST', '/admin/queues/api/queues/lifecycle/add'],
        ['PUT', '/admin/queues/api/queues/lifecycle/concurrency'],
        ['PATCH', '/admin/queues/api/queues/maintenance/job-schedulers/sweep'],
      ];
      const answers: string[] = [];
      for (const [method, url] of targets) {
        for (const [label, headers, payload, status, code] of bodies) {
          const res = await board.inject({ method: method as 'POST', url, headers: { ...auth, ...headers }, payload });
          answers.push(res.body);
          expect(res.statusCode, `${method} ${url}, ${label}: ${res.body}`).to.equal(status);
          expect(res.json(), `${method} ${url}, ${label}`).to.have.nested.property('error.code', code);
          expect(Object.keys(res.json<object>())).to.deep.equal(['error']);
        }
      }
      // no route (FST_ERR_NOT_FOUND), under the API, the board, the docs' assets, and anywhere
      for (const [method, url] of [
        ['GET', '/api/nowhere'],
        ['DELETE', '/api/events'],
        ['GET', '/admin/queues/api/nowhere'],
        ['GET', '/docs/static/nope.js'],
        ['GET', '/nowhere'],
      ] as const) {
        const res = await board.inject({ method, url, headers: auth });
        answers.push(res.body);
        expect(res.statusCode, `${method} ${url}`).to.equal(404);
        expect(res.json(), `${method} ${url}`).to.have.nested.property('error.code', 'not_found');
      }
      for (const body of answers) expect(body).to.not.contain('FST_');
      expect(await producer.queue.count()).to.equal(0);
    });

    it('refuses to clean a state that does not exist (Bull Board says 200 {})', async () => {
      const res = await board.inject({ method: 'PUT', url: '/admin/queues/api/queues/lifecycle/clean/bogus', headers: auth });
      expect(res.statusCode).to.equal(400);
      expect(res.json<{ error: { code: string; message: string } }>().error).to.include({ code: 'invalid_status' });
      const ok = await board.inject({ method: 'PUT', url: '/admin/queues/api/queues/lifecycle/clean/completed', headers: auth });
      expect(ok.statusCode).to.equal(200);
    });
  });

  it('reads answer 503 with Retry-After while PostgreSQL is away, and work again when it is back', async () => {
    const target = new URL(db.url);
    const proxy = new TcpProxy(target.hostname, Number(target.port));
    const proxied = createDataSource({ url: TcpProxy.rewrite(db.url, await proxy.listen()), poolSize: 2 });
    await proxied.initialize();
    const reads = await testHttpServer({ prefix, dataSource: proxied, producer, redis, maintenance });
    try {
      expect((await reads.inject({ method: 'GET', url: '/api/deployments' })).statusCode).to.equal(200);
      proxy.cut();
      const away = await reads.inject({ method: 'GET', url: '/api/deployments' });
      expect(away.statusCode, away.body).to.equal(503);
      expect(away.headers['retry-after']).to.equal('5');
      expect(away.json<{ error: { code: string } }>().error.code).to.equal('unavailable');
      proxy.restore();
      await waitFor('reads to work again', async () =>
        (await reads.inject({ method: 'GET', url: '/api/deployments' })).statusCode === 200 ? true : undefined,
      );
    } finally {
      await reads.close();
      await proxied.destroy();
      await proxy.close();
    }
  });
});
