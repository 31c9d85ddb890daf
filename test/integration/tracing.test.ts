/**
 * Tracing (docs/architecture.md, "Tracing"), against real Redis and PostgreSQL: an in-memory exporter registered
 * through src/telemetry.ts's own entry point, and the producer SDK, a LifecycleWorker with the transition service,
 * the outbox relay and a TransitionConsumer in this process. Checks the chain of one event's spans from its enqueue
 * to the consumer's handler (printed as a tree), the group-commit batch's own span and its links, and that with
 * tracing off nothing of the SDK is loaded and no entry carries a `traceparent`.
 */
import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { trace, type SpanContext } from '@opentelemetry/api';
import { InMemorySpanExporter, type ReadableSpan } from '@opentelemetry/sdk-trace-node';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { silentLogger } from '../../src/log';
import { LifecycleProducer } from '../../src/queues/producer';
import { TransitionService } from '../../src/services/transitions';
import { TransitionConsumer, type TransitionEntry } from '../../src/streams/consumer';
import { OutboxRelay, transitionStreamKey } from '../../src/streams/outbox-relay';
import { startTracing, TRACING_OFF, type Tracing } from '../../src/telemetry';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { repoRoot } from '../../src/util';
import { forgetOutbox, openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

const run = promisify(execFile);

const ms = (span: ReadableSpan) => span.duration[0] * 1e3 + span.duration[1] / 1e6;
const parentOf = (span: ReadableSpan) => span.parentSpanContext?.spanId;
const idOf = (span: ReadableSpan) => span.spanContext().spanId;

/** The spans as an indented tree (children under their parent, in start order), with durations and links. */
function tree(spans: readonly ReadableSpan[]): string {
  const ids = new Set(spans.map(idOf));
  const children = new Map<string, ReadableSpan[]>();
  for (const s of spans) {
    const parent = parentOf(s);
    const key = parent !== undefined && ids.has(parent) ? parent : 'root';
    children.set(key, [...(children.get(key) ?? []), s]);
  }
  const start = (s: ReadableSpan) => s.startTime[0] * 1e9 + s.startTime[1];
  const lines: string[] = [];
  const walk = (key: string, depth: number) => {
    for (const s of (children.get(key) ?? []).sort((a, b) => start(a) - start(b))) {
      const links = s.links.length > 0 ? `  [links: ${s.links.map((l) => l.context.spanId.slice(0, 8)).join(', ')}]` : '';
      lines.push(`${'  '.repeat(depth)}${s.name}  ${ms(s).toFixed(2)} ms  (${idOf(s).slice(0, 8)})${links}`);
      walk(idOf(s), depth + 1);
    }
  };
  walk('root', 0);
  return lines.join('\n');
}

function traceparentOf(context: SpanContext): string {
  return `00-${context.traceId}-${context.spanId}-0${context.traceFlags}`;
}

describe('tracing: one trace per event, from the enqueue to the consumer (OpenTelemetry, in-memory exporter)', function () {
  this.timeout(90_000);
  const exporter = new InMemorySpanExporter();
  let tracing: Tracing | null;
  let db: TestDatabase;
  let redis: IORedis;
  let prefix: string;
  const closers: Array<() => Promise<void>> = [];
  /** entries the consumer's handler ran for, by eventId, with the span that was active in the handler */
  let handled: Map<string, { readonly entry: TransitionEntry; readonly active: SpanContext | undefined }>;

  before(async () => {
    tracing = await startTracing({ ...TRACING_OFF, serviceName: 'tracing-test' }, silentLogger, { exporter });
    db = await openTestDatabase(24);
    redis = testRedis();
  });
  after(async () => {
    redis?.disconnect();
    await db?.close();
    await tracing?.close();
  });
  beforeEach(async () => {
    exporter.reset();
    prefix = uniquePrefix();
    handled = new Map();
    // this test's relay publishes only this test's rows
    await forgetOutbox(db);
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    await dropPrefix(prefix);
  });

  /** Producer, relay, service, worker and consumer of one test, as `fleet worker` wires them, traced. */
  function pipeline(hooks: ConstructorParameters<typeof TransitionService>[0]['hooks'] = {}, autorun = true) {
    if (tracing === null) throw new Error('tracing did not start');
    const streamKey = transitionStreamKey(prefix);
    const producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix, telemetry: tracing.bullmq });
    closers.push(() => producer.close());
    const relay = new OutboxRelay({ databaseUrl: db.url, redis: testEnv().redisUrl, streamKey, standbyRetryMs: 200 });
    closers.push(() => relay.close());
    relay.start();
    const service = new TransitionService({ dataSource: db.dataSource, relay, hooks });
    const worker = new LifecycleWorker({ connection: testEnv().redisUrl, prefix, service, concurrency: 16, telemetry: tracing.bullmq, autorun });
    closers.push(() => worker.close(10_000));
    const consumer = new TransitionConsumer({
      redis: testEnv().redisUrl,
      streamKey,
      group: 'tracing-test',
      consumer: 'c1',
      startId: '0',
      blockMs: 200,
      handler: (entry) => void handled.set(entry.eventId, { entry, active: trace.getActiveSpan()?.spanContext() }),
    });
    const consuming = consumer.run();
    closers.push(async () => {
      await consumer.close();
      await consuming;
    });
    return { producer, service, worker, streamKey };
  }

  /** Every span of one trace, once the consumer's span for `eventId` has ended. */
  async function traceOf(eventId: string): Promise<ReadableSpan[]> {
    const handle = await waitFor(`the consumer's span for ${eventId}`, () =>
      exporter.getFinishedSpans().find((s) => s.name === 'handle transition' && s.attributes['fleet.event.id'] === eventId),
    );
    return exporter.getFinishedSpans().filter((s) => s.spanContext().traceId === handle.spanContext().traceId);
  }

  const one = (spans: readonly ReadableSpan[], name: string, where: (s: ReadableSpan) => boolean = () => true): ReadableSpan => {
    const found = spans.filter((s) => s.name === name && where(s));
    expect(
      found.map((s) => s.name),
      `exactly one "${name}" span`,
    ).to.deep.equal([name]);
    return found[0] as ReadableSpan;
  };

  it("chains attempt.end's spans from the SDK's enqueue through BullMQ, the transition, the publish to the consumer's handler", async () => {
    const { producer } = pipeline();
    const ids = { deploymentId: randomUUID(), attemptId: randomUUID() };
    const lifecycle: Array<[Parameters<LifecycleProducer['enqueue']>[0], Record<string, unknown>]> = [
      ['deployment.create', { deploymentId: ids.deploymentId, name: 'traced' }],
      ['attempt.create', ids],
      ['attempt.start', ids],
      ['attempt.end', { ...ids, outcome: 'succeeded' }],
    ];
    let endEventId = '';
    // one at a time, each handled before the next: each event takes the one-event path
    for (const [name, data] of lifecycle) {
      const { eventId } = await producer.enqueue(name, data);
      await waitFor(`${name} handled by the consumer`, () => handled.get(eventId));
      endEventId = eventId;
    }
    // the entry carries the trace on, so the consumer could continue it
    expect(handled.get(endEventId)?.entry.traceparent, "the attempt.end entry's traceparent").to.match(/^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/);
    const spans = await traceOf(endEventId);
    console.log(`\n    the trace of attempt.end (${spans[0]?.spanContext().traceId}):\n${tree(spans).replace(/^/gm, '      ')}\n`);

    const enqueue = one(spans, 'enqueue attempt.end');
    expect(parentOf(enqueue)).to.equal(undefined); // the trace starts at the SDK's enqueue
    expect(enqueue.attributes).to.include({
      'fleet.event.id': endEventId,
      'fleet.deployment.id': ids.deploymentId,
      'fleet.attempt.id': ids.attemptId,
    });
    const add = one(spans, 'add lifecycle.attempt.end'); // BullMQ's producer span (bullmq-otel)
    expect(parentOf(add)).to.equal(idOf(enqueue));
    const processJob = one(spans, 'process lifecycle'); // BullMQ's worker span continues the producer's context
    expect(parentOf(processJob)).to.equal(idOf(add));
    const transition = one(spans, 'transition attempt.end');
    expect(parentOf(transition)).to.equal(idOf(processJob));
    expect(transition.attributes).to.include({ 'fleet.outcome': 'applied', 'fleet.to': 'ready', 'fleet.event.id': endEventId });
    // a lone event: its statements are its own span's children
    for (const name of ['sql snapshot', 'sql write']) expect(parentOf(one(spans, name)), name).to.equal(idOf(transition));
    const publish = one(spans, 'publish');
    expect(parentOf(publish)).to.equal(idOf(transition));
    const handle = one(spans, 'handle transition');
    expect(parentOf(handle)).to.equal(idOf(publish));
    expect(handle.attributes).to.include({ 'fleet.event.id': endEventId, 'fleet.version': 4 });

    // the outbox row carries the transition span's context; the stream entry the publish span's, which the
    // consumer continued, and its handler ran inside the consumer's span
    const [row] = await db.dataSource.query<Array<{ fields: Record<string, string> }>>(
      `SELECT fields FROM outbox WHERE deployment_id = $1 AND version = 4`,
      [ids.deploymentId],
    );
    expect(row?.fields.traceparent).to.equal(traceparentOf(transition.spanContext()));
    const seen = handled.get(endEventId);
    expect(seen?.entry.traceparent).to.equal(traceparentOf(publish.spanContext()));
    expect(seen?.active?.spanId).to.equal(idOf(handle));
  });

  it('group commit: the batch has a span of its own with the statements, linked both ways to each job, and each job still reaches its own entry and consumer span', async () => {
    const deployments = Array.from({ length: 6 }, () => ({ deploymentId: randomUUID(), attemptId: randomUUID() }));
    // set up untraced, straight through a service: running attempts
    const setup = new TransitionService({ dataSource: db.dataSource });
    for (const ids of deployments) {
      await setup.apply('deployment.create', { deploymentId: ids.deploymentId, name: 'batched', eventId: `c-${ids.deploymentId}` });
      await setup.apply('attempt.create', { ...ids, eventId: `a-${ids.attemptId}` });
      await setup.apply('attempt.start', { ...ids, eventId: `s-${ids.attemptId}` });
    }
    // the first job's event goes alone (nothing is being written); it waits before its write until every job is
    // running, so that the other five wait in the coalescer meanwhile and go as one batch
    let first = true;
    const { producer, worker } = pipeline(
      {
        beforeUpdate: async () => {
          if (!first) return;
          first = false;
          await waitFor('every job running', async () => ((await producer.queue.getActiveCount()) === deployments.length ? true : undefined));
        },
      },
      false,
    );
    const eventIds: string[] = [];
    for (const ids of deployments) eventIds.push((await producer.enqueue('attempt.end', { ...ids, outcome: 'succeeded' })).eventId);
    void worker.worker.run();
    const traces = await Promise.all(eventIds.map((id) => traceOf(id)));
    expect([...worker.coalescer.sizes.entries()].sort()).to.deep.equal([
      [1, 1],
      [5, 1],
    ]);

    const batch = one(exporter.getFinishedSpans(), 'transition batch');
    expect(parentOf(batch)).to.equal(undefined); // a trace of its own
    const batchSpans = exporter.getFinishedSpans().filter((s) => s.spanContext().traceId === batch.spanContext().traceId);
    for (const name of ['sql snapshot', 'sql write']) expect(parentOf(one(batchSpans, name)), name).to.equal(idOf(batch));
    let batched = 0;
    traces.forEach((spans, i) => {
      const eventId = eventIds[i] as string;
      const transition = one(spans, 'transition attempt.end');
      const publish = one(spans, 'publish');
      const handle = one(spans, 'handle transition');
      // each job's own chain, whatever batch its event went in
      expect(parentOf(transition)).to.equal(idOf(one(spans, 'process lifecycle')));
      expect(parentOf(publish)).to.equal(idOf(transition));
      expect(parentOf(handle)).to.equal(idOf(publish));
      expect(handle.attributes['fleet.event.id']).to.equal(eventId);
      expect(handled.get(eventId)?.entry.traceparent).to.equal(traceparentOf(publish.spanContext()));
      if (transition.attributes['fleet.batch.span_id'] === undefined) {
        // the one that went alone: its statements under its own span
        expect(parentOf(one(spans, 'sql write'))).to.equal(idOf(transition));
        return;
      }
      batched++;
      expect(spans.filter((s) => s.name.startsWith('sql '))).to.deep.equal([]); // they are the batch's
      expect(transition.attributes['fleet.batch.span_id']).to.equal(idOf(batch));
      expect(transition.links.map((l) => l.context.spanId)).to.deep.equal([idOf(batch)]);
      expect(batch.links.map((l) => l.context.spanId)).to.include(idOf(transition));
    });
    expect(batched).to.equal(5);
    console.log(`\n    a group-commit batch (${batch.spanContext().traceId}):\n${tree(batchSpans).replace(/^/gm, '      ')}\n`);
    const batchedJob = traces.find((spans) => one(spans, 'transition attempt.end').attributes['fleet.batch.span_id'] !== undefined) ?? [];
    console.log(`    one batched job's trace:\n${tree(batchedJob).replace(/^/gm, '      ')}\n`);
  });

  it('off (no OTEL_* variable): a fleet loads nothing of the SDK, gives BullMQ no telemetry, and writes no traceparent', async () => {
    const child = await openTestDatabase(4);
    try {
      const env: NodeJS.ProcessEnv = {};
      for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('OTEL_') && k !== 'FLEET_TRACE_BENCH') env[k] = v;
      const { stdout } = await run(process.execPath, [path.join(repoRoot(), 'dist', 'test', 'fixtures', 'untraced-fleet.js')], {
        env: { ...env, DATABASE_URL: child.url, FLEET_PREFIX: prefix, LOG_LEVEL: 'silent' },
        timeout: 60_000,
      });
      const report = JSON.parse(stdout.trim()) as {
        sdkModules: string[];
        bullmqTelemetry: boolean;
        tracing: boolean;
        fields: Record<string, string>;
      };
      expect(report.sdkModules).to.deep.equal([]);
      expect(report.bullmqTelemetry).to.equal(false);
      expect(report.tracing).to.equal(false);
      expect(report.fields).to.include({ type: 'state_transition', to: 'pending' });
      expect(report.fields).to.not.have.property('traceparent');
    } finally {
      await child.close();
    }
  });
});
