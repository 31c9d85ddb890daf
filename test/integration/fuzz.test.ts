import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue, type Job } from 'bullmq';
import fc from 'fast-check';
import type { FastifyInstance } from 'fastify';
import type IORedis from 'ioredis';
import { ValidationError } from '../../src/errors';
import { EVENT_NAMES, parsePayload } from '../../src/events/schemas';
import { MAINTENANCE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { TransitionService } from '../../src/services/transitions';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, enqueueTraces, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';
import { testHttpServer } from '../helpers/http';

/** A valid payload for every event: the fuzzer's starting points. */
function validPayload(name: string): Record<string, unknown> {
  const base = { deploymentId: randomUUID() };
  const attempt = { ...base, attemptId: randomUUID() };
  switch (name) {
    case 'deployment.create':
      return { ...base, name: 'web', endpoint: { url: 'http://127.0.0.1:8080', kind: 'node_port' } };
    case 'attempt.end':
      return { ...attempt, outcome: 'succeeded', reason: 'ok' };
    case 'attempt.cancel':
      return { ...attempt, reason: 'because' };
    case 'deployment.teardown':
      return { ...base, force: true };
    case 'deployment.resolve':
      return { ...base, outcome: 'ready' };
    case 'deployment.readiness':
      return { ...base, observedAt: '2026-11-23T12:00:00Z' };
    default:
      return attempt;
  }
}

/** An object nested `depth` levels deep, as an array or object chain. */
function deep(depth: number, array: boolean): unknown {
  let value: unknown = 'x';
  for (let i = 0; i < depth; i++) value = array ? [value] : { a: value };
  return value;
}

/** A key that attacks prototypes; own properties made with defineProperty, as JSON.parse makes them. */
const POLLUTING_KEYS = ['__proto__', 'constructor', 'prototype', '__defineGetter__', 'hasOwnProperty', 'toString', 'valueOf'];

const hostileValue: fc.Arbitrary<unknown> = fc.oneof(
  fc.anything({ maxDepth: 3 }),
  fc.constantFrom(null, undefined, true, 0, -1, 1e308, Number.NaN, '', ' ', '\u0000', '\ud800', '💥'.repeat(10)),
  fc.integer({ min: 1, max: 200_000 }).map((n) => 'x'.repeat(n)), // huge strings
  fc.integer({ min: 50, max: 2000 }).chain((d) => fc.boolean().map((a) => deep(d, a))), // deep nesting
  fc.constantFrom(...POLLUTING_KEYS).map((k) => JSON.parse(`{"${k}": {"polluted": true}}`) as unknown),
  fc.array(fc.uuid(), { maxLength: 3 }),
  fc.date({ noInvalidDate: true }).map((d) => d.toISOString()),
);

type Mutation =
  | { readonly kind: 'set'; readonly key: string; readonly value: unknown }
  | { readonly kind: 'delete'; readonly key: string }
  | { readonly kind: 'pollute'; readonly key: string; readonly value: unknown };

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({
    kind: fc.constant('set' as const),
    key: fc.oneof(
      fc.constantFrom('deploymentId', 'attemptId', 'name', 'outcome', 'reason', 'endpoint', 'force', 'observedAt', 'eventId'),
      fc.string({ maxLength: 20 }),
    ),
    value: hostileValue,
  }),
  fc.record({ kind: fc.constant('delete' as const), key: fc.constantFrom('deploymentId', 'attemptId', 'name', 'outcome') }),
  fc.record({ kind: fc.constant('pollute' as const), key: fc.constantFrom(...POLLUTING_KEYS), value: hostileValue }),
);

/** A valid payload with 1-3 hostile changes, or something that is not a payload at all. */
const hostileEvent: fc.Arbitrary<{ name: string; data: unknown }> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.tuple(fc.constantFrom(...EVENT_NAMES), fc.array(mutation, { minLength: 1, maxLength: 3 })).map(([name, muts]) => {
      const data: Record<string, unknown> = validPayload(name);
      for (const m of muts) {
        if (m.kind === 'delete') delete data[m.key];
        else Object.defineProperty(data, m.key, { value: m.value, enumerable: true, configurable: true, writable: true });
      }
      return { name, data };
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      name: fc.oneof(fc.constantFrom(...EVENT_NAMES), fc.string(), fc.constantFrom('__proto__', 'constructor', 'toString')),
      data: hostileValue,
    }),
  },
);

function jsonOrNull(value: unknown): string {
  try {
    return JSON.stringify(value) ?? 'null';
  } catch {
    return 'null';
  }
}

function isValid(name: string, data: unknown): boolean {
  try {
    parsePayload(name, data);
    return true;
  } catch {
    return false;
  }
}

function assertNotPolluted(): void {
  expect(({} as Record<string, unknown>).polluted).to.equal(undefined);
  expect(Object.prototype).not.to.have.property('polluted');
}

describe('payload fuzzing: job schemas, the worker and the HTTP intake', function () {
  this.timeout(120_000);
  let db: TestDatabase;
  let prefix: string;
  let redis: IORedis;
  let producer: LifecycleProducer;

  const tables = ['deployments', 'attempts', 'state_transitions', 'outbox', 'processed_events'];
  const rowCounts = async () =>
    Promise.all(tables.map(async (t) => Number((await db.dataSource.query<Array<{ n: string }>>(`SELECT count(*) AS n FROM ${t}`))[0]?.n)));

  before(async () => {
    db = await openTestDatabase(8);
  });
  after(async () => {
    await db?.close();
  });
  beforeEach(() => {
    prefix = uniquePrefix();
    redis = testRedis();
    producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
  });
  afterEach(async () => {
    await producer.close();
    redis.disconnect();
    await dropPrefix(prefix);
  });

  it('schemas and the transition service: 3,000 hostile payloads rejected with ValidationError before any query', async () => {
    const service = new TransitionService({ dataSource: db.dataSource });
    const before = await rowCounts();
    let rejected = 0;
    await fc.assert(
      fc.asyncProperty(hostileEvent, async ({ name, data }) => {
        fc.pre(!isValid(name, data));
        let error: unknown = null;
        try {
          await service.apply(name, data, { fallbackEventId: 'fuzz' });
        } catch (err) {
          error = err;
        }
        expect(error).to.be.instanceOf(ValidationError);
        expect((error as ValidationError).code).to.be.oneOf(['invalid_payload', 'unknown_event']);
        // the message is bounded: a 200 kB string is not echoed back
        expect((error as ValidationError).message.length).to.be.below(4000);
        assertNotPolluted();
        rejected++;
      }),
      { numRuns: 3000, seed: 20261123 },
    );
    expect(rejected).to.be.at.least(2900);
    expect(await rowCounts()).to.deep.equal(before);
  });

  it('the producer SDK: 1,000 hostile payloads refused before anything is enqueued', async () => {
    await fc.assert(
      fc.asyncProperty(hostileEvent, async ({ name, data }) => {
        fc.pre(!isValid(name, data));
        let error: unknown = null;
        try {
          await producer.enqueue(name, data);
        } catch (err) {
          error = err;
        }
        expect(error).to.be.instanceOf(ValidationError);
      }),
      { numRuns: 1000, seed: 7 },
    );
    // no job and no event (its queue's meta key may be there: the queue writes it once its connection is ready)
    expect(await enqueueTraces(redis, producer.queue)).to.deep.equal({ jobs: 0, events: 0, otherKeys: [] });
    assertNotPolluted();
  });

  it('the worker: 300 hostile jobs from a raw producer fail once, unretried, with no write', async () => {
    const before = await rowCounts();
    const queue = new Queue('lifecycle', { connection: redis, prefix });
    const worker = new LifecycleWorker({
      connection: testEnv().redisUrl,
      prefix,
      service: new TransitionService({ dataSource: db.dataSource }),
      concurrency: 16,
    });
    try {
      // what a raw producer can send at all: BullMQ stores job data as JSON
      const samples = fc
        .sample(hostileEvent, { numRuns: 600, seed: 99 })
        .filter(({ data }) => jsonOrNull(data) !== 'null' || data === null)
        .filter(({ name, data }) => !isValid(name, data) && !isValid(name, JSON.parse(jsonOrNull(data))))
        .slice(0, 300);
      expect(samples).to.have.length(300);
      const added: Job[] = [];
      for (const [i, { name, data }] of samples.entries()) {
        added.push(await queue.add(name, data === undefined ? null : data, { jobId: `fuzz-${i}`, attempts: 5 }));
      }
      await waitFor(
        'every hostile job to fail',
        async () => ((await queue.getJobCounts('failed')).failed === added.length ? true : undefined),
        60_000,
      );
      const failed = await queue.getJobs(['failed'], 0, -1);
      for (const job of failed) {
        expect(job.attemptsMade, job.failedReason).to.equal(1);
        expect(job.failedReason).to.match(/^(invalid_payload|unknown_event)/);
      }
      expect((await queue.getJobCounts('completed')).completed).to.equal(0);
      expect(await rowCounts()).to.deep.equal(before);
      assertNotPolluted();
    } finally {
      await worker.close(5000);
      await queue.close();
    }
  });

  describe('the HTTP intake', () => {
    let app: FastifyInstance;
    let maintenance: Queue;

    beforeEach(async () => {
      maintenance = new Queue(MAINTENANCE_QUEUE, { connection: redis, prefix });
      app = await testHttpServer({ prefix, dataSource: db.dataSource, producer, redis, maintenance });
    });
    afterEach(async () => {
      await app.close();
      await maintenance.close();
    });

    /** JSON text for a body, keeping own `__proto__` keys (JSON.stringify writes them as data). */
    const bodyText: fc.Arbitrary<string> = fc.oneof(
      { weight: 6, arbitrary: hostileEvent.map((e) => jsonOrNull(e)) },
      {
        weight: 1,
        arbitrary: fc
          .constantFrom(...POLLUTING_KEYS)
          .map((k) => `{"name":"deployment.create","data":{"deploymentId":"${randomUUID()}","name":"web","${k}":{"polluted":true}}}`),
      },
      { weight: 1, arbitrary: fc.constantFrom(...POLLUTING_KEYS).map((k) => `{"${k}":{"polluted":true},"name":"deployment.create","data":{}}`) },
      {
        weight: 1,
        arbitrary: fc.integer({ min: 1000, max: 100_000 }).map((d) => `{"name":"attempt.start","data":${'['.repeat(d)}${']'.repeat(d)}}`),
      },
      { weight: 1, arbitrary: fc.string({ maxLength: 200 }) }, // not JSON at all
      {
        weight: 1,
        arbitrary: fc.integer({ min: 60_000, max: 300_000 }).map((n) => `{"name":"deployment.create","data":{"name":"${'a'.repeat(n)}"}}`),
      },
    );

    it('2,000 hostile bodies: 4xx with a JSON error, never a 2xx or a 5xx, nothing enqueued, nothing written', async () => {
      const before = await rowCounts();
      const statuses = new Map<number, number>();
      await fc.assert(
        fc.asyncProperty(
          bodyText,
          fc.constantFrom('application/json', 'application/json; charset=utf-8', 'text/plain', 'application/x-www-form-urlencoded'),
          async (payload, contentType) => {
            let parsed: unknown = undefined;
            try {
              parsed = JSON.parse(payload);
            } catch {
              // not JSON
            }
            const body = parsed as { name?: unknown; data?: unknown } | undefined;
            fc.pre(!(contentType.startsWith('application/json') && typeof body?.name === 'string' && isValid(body.name, body.data)));
            const res = await app.inject({ method: 'POST', url: '/api/events', payload, headers: { 'content-type': contentType } });
            statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1);
            expect(res.statusCode, res.body.slice(0, 300)).to.be.within(400, 499);
            const error = (JSON.parse(res.body) as { error?: { code?: unknown } }).error;
            expect(error?.code).to.be.a('string');
            assertNotPolluted();
          },
        ),
        { numRuns: 2000, seed: 42 },
      );
      expect(await enqueueTraces(redis, producer.queue)).to.deep.equal({ jobs: 0, events: 0, otherKeys: [] });
      expect(await rowCounts()).to.deep.equal(before);
      expect([...statuses.keys()].every((s) => s >= 400 && s < 500)).to.equal(true);
      process.stdout.write(`      (statuses: ${[...statuses].map(([s, n]) => `${s} x${n}`).join(', ')})\n`);
    });
  });
});
