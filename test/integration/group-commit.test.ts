/**
 * Group commit (issue 18): `TransitionService.applyMany` and the worker's `TransitionCoalescer` against a real
 * PostgreSQL. The property tests compare, for random mixes of events over a few deployments, the database and every
 * event's outcome after batched application with the same events applied one at a time.
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import fc from 'fast-check';
import type { Queue } from 'bullmq';
import { Database } from '../../src/entities/sql';
import { isTransient, NotYetError, ValidationError } from '../../src/errors';
import type { EventName } from '../../src/events/schemas';
import { LifecycleProducer } from '../../src/queues/producer';
import { StampBuffer } from '../../src/services/stamps';
import { TransitionCoalescer, TransitionService, type ApplyResult } from '../../src/services/transitions';
import type { ApplyOptions } from '../../src/services/transitions';
import { LifecycleWorker } from '../../src/workers/lifecycle-worker';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { runningAttempt } from '../helpers/lifecycle';
import { TcpProxy } from '../helpers/proxy';
import { dropPrefix, uniquePrefix } from '../helpers/redis';
import { barrier, waitFor } from '../helpers/wait';

const NOW = new Date('2026-12-02T12:00:00.000Z');
/** The events the machine decides (stamps take another path). */
type Kind = Exclude<EventName, 'attempt.heartbeat' | 'deployment.readiness'>;

/** One generated event, before it is given ids. */
interface Cmd {
  readonly d: number;
  readonly kind: Kind;
  readonly a: number;
  readonly flag: boolean;
  /** producedAt offset: 0 s (orphans alive, expiries not due), 200 s (orphans due), 2000 s (expiries due too) */
  readonly when: 0 | 200 | 2000;
  /** reuse the eventId of an earlier event (index modulo the earlier ones in scope), or a fresh one */
  readonly reuse: number | null;
  /** with reuse: send the earlier event again as it was (a duplicate delivery), not this one under its id */
  readonly same: boolean;
}

interface Item {
  readonly name: string;
  readonly data: Record<string, unknown>;
  readonly options: ApplyOptions;
  readonly d: number;
}

const kind = (name: Kind, weight: number) => ({ arbitrary: fc.constant(name), weight });
const cmd: fc.Arbitrary<Cmd> = fc.record({
  d: fc.nat({ max: 2 }),
  // weighted towards what moves a deployment along, so that long lifecycles happen within one batch
  kind: fc.oneof(
    kind('deployment.create', 2),
    kind('attempt.create', 3),
    kind('attempt.start', 4),
    kind('attempt.end', 2),
    kind('attempt.cancel', 1),
    kind('attempt.orphaned', 2),
    kind('attempt.expired', 2),
    kind('deployment.teardown', 1),
    kind('deployment.resolve', 1),
  ),
  a: fc.nat({ max: 1 }),
  flag: fc.boolean(),
  when: fc.constantFrom(0 as const, 200 as const, 2000 as const),
  reuse: fc.option(fc.nat({ max: 20 }), { freq: 5 }),
  same: fc.boolean(),
});

/** A whole lifecycle of one attempt in a row (create, attempt, start, an ending), so that batches often hold one. */
const lifecycle: fc.Arbitrary<Cmd[]> = fc
  .record({
    d: fc.nat({ max: 2 }),
    a: fc.nat({ max: 1 }),
    flag: fc.boolean(),
    when: fc.constantFrom(0 as const, 200 as const, 2000 as const),
    end: fc.constantFrom('attempt.end' as const, 'attempt.cancel' as const, 'attempt.orphaned' as const, 'attempt.expired' as const),
  })
  .map(({ d, a, flag, when, end }) =>
    (['deployment.create', 'attempt.create', 'attempt.start', end] as const).map((k) => ({ d, kind: k, a, flag, when, reuse: null, same: false })),
  );

/** Random events, with whole lifecycles mixed in. */
const events: fc.Arbitrary<Cmd[]> = fc
  .array(fc.oneof({ arbitrary: cmd.map((c) => [c]), weight: 4 }, { arbitrary: lifecycle, weight: 1 }), { minLength: 1, maxLength: 40 })
  .map((xs) => xs.flat());

/**
 * Gives the commands ids. `shared`: attempt ids and eventIds may be shared across deployments (the outcome then
 * depends on the order across deployments too); otherwise each deployment has its own.
 */
function materialize(cmds: readonly Cmd[], shared: boolean): Item[] {
  const deployments = [randomUUID(), randomUUID(), randomUUID()];
  const attempts = deployments.map(() => [randomUUID(), randomUUID(), randomUUID()]);
  const items: Item[] = [];
  cmds.forEach((c, i) => {
    const deploymentId = deployments[c.d] as string;
    const attemptId = (attempts[shared ? (c.a + c.d) % 3 : c.d] as string[])[c.a] as string;
    const scope = shared ? items : items.filter((it) => it.d === c.d);
    const earlier = c.reuse === null || scope.length === 0 ? undefined : scope[c.reuse % scope.length];
    if (earlier !== undefined && c.same) {
      items.push(earlier);
      return;
    }
    const eventId = earlier === undefined ? `e${i}-${deploymentId.slice(0, 8)}` : (earlier.data.eventId as string);
    const producedAt = new Date(NOW.getTime() + c.when * 1000);
    const endpoint = { url: `http://127.0.0.1:${30000 + c.a}`, kind: 'node_port' };
    const data: Record<string, unknown> = (() => {
      switch (c.kind) {
        case 'deployment.create':
          return { deploymentId, name: c.flag ? 'web' : 'api', ...(c.a === 0 ? { endpoint } : {}) };
        case 'attempt.end':
          return {
            deploymentId,
            attemptId,
            outcome: c.flag ? 'succeeded' : 'failed',
            ...(c.a === 1 ? { endpoint } : {}),
            ...(c.flag ? {} : { reason: 'boom' }),
          };
        case 'attempt.cancel':
          return { deploymentId, attemptId, ...(c.flag ? { reason: 'stop' } : {}) };
        case 'deployment.teardown':
          return { deploymentId, force: c.flag };
        case 'deployment.resolve':
          return { deploymentId, outcome: c.flag ? 'ready' : 'failed' };
        default:
          return { deploymentId, attemptId };
      }
    })();
    items.push({ name: c.kind, data: { ...data, eventId, actor: `actor-${c.d}` }, options: { producedAt }, d: c.d });
  });
  return items;
}

type Outcome = Omit<ApplyResult, 'transitionId'> | { readonly error: string; readonly code: unknown };

function outcomeOf(r: PromiseSettledResult<ApplyResult>): Outcome {
  if (r.status === 'rejected') {
    const err = r.reason as Error & { code?: unknown };
    return { error: err.constructor.name, code: err.code };
  }
  if (r.value.outcome !== 'applied') return r.value;
  const { transitionId: _, ...rest } = r.value;
  return rest;
}

describe('group commit: applyMany and the coalescer (PostgreSQL)', function () {
  this.timeout(120_000);
  let db: TestDatabase;
  let service: TransitionService;

  before(async () => {
    db = await openTestDatabase(24);
  });
  after(async () => {
    await db?.close();
  });
  beforeEach(() => {
    service = new TransitionService({ dataSource: db.dataSource, now: () => NOW });
  });

  const q = <T>(sql: string, params: unknown[] = []): Promise<T[]> => db.dataSource.query<T[]>(sql, params);

  async function reset(): Promise<void> {
    await q(`TRUNCATE deployments, attempts, state_transitions, outbox, processed_events RESTART IDENTITY CASCADE`);
  }

  /** Everything the events wrote, without the ids a sequence hands out. */
  async function tables() {
    const [order] = await q<{ bad: string }>(
      // a deployment's outbox rows in version order, each naming its history row
      `SELECT count(*) AS bad FROM (
         SELECT o.version, lag(o.version) OVER (PARTITION BY o.deployment_id ORDER BY o.id) AS before, t.id AS t_id,
                (o.fields->>'transitionId')::bigint AS named
           FROM outbox o LEFT JOIN state_transitions t ON t.deployment_id = o.deployment_id AND t.version = o.version) x
        WHERE (before IS NOT NULL AND before >= version) OR t_id IS DISTINCT FROM named`,
    );
    return {
      outboxOutOfOrder: Number(order?.bad),
      deployments: await q(
        `SELECT id, name, state, version, current_attempt_id, endpoint_url, endpoint_kind, last_ready_at, state_changed_at,
                created_at, updated_at FROM deployments ORDER BY id`,
      ),
      attempts: await q(
        `SELECT id, deployment_id, number, status, started_at, ended_at, last_heartbeat_at, reason, created_at
           FROM attempts ORDER BY id`,
      ),
      history: await q(
        `SELECT deployment_id, attempt_id, from_state, to_state, version, reason, event_id, actor, created_at
           FROM state_transitions ORDER BY deployment_id, version`,
      ),
      outbox: await q(`SELECT deployment_id, version, fields - 'transitionId' AS fields, created_at FROM outbox ORDER BY deployment_id, version`),
      processed: await q(
        `SELECT event_id, event_name, deployment_id, outcome, reason, version, payload_sha256, processed_at
           FROM processed_events ORDER BY event_id`,
      ),
    };
  }

  async function oneAtATime(items: readonly Item[]): Promise<Outcome[]> {
    const out: Outcome[] = [];
    for (const it of items) {
      out.push(
        outcomeOf(
          await service.apply(it.name, it.data, it.options).then(
            (value) => ({ status: 'fulfilled', value }) as const,
            (reason: unknown) => ({ status: 'rejected', reason }) as const,
          ),
        ),
      );
    }
    return out;
  }

  it('batches of any size give the same database and outcomes as one at a time, in the same order', async () => {
    let batchedEvents = 0;
    await fc.assert(
      fc.asyncProperty(events, fc.array(fc.integer({ min: 1, max: 16 }), { minLength: 1 }), async (cmds, sizes) => {
        const items = materialize(cmds, true);
        await reset();
        const expected = await oneAtATime(items);
        const expectedTables = await tables();
        await reset();
        const got: Outcome[] = [];
        for (let i = 0, k = 0; i < items.length; k++) {
          const size = sizes[k % sizes.length] as number;
          const chunk = items.slice(i, i + size);
          if (chunk.length > 1) batchedEvents += chunk.length;
          got.push(...(await service.applyMany(chunk)).map(outcomeOf));
          i += size;
        }
        expect(got).to.deep.equal(expected);
        const gotTables = await tables();
        expect(gotTables.outboxOutOfOrder).to.equal(0);
        expect(gotTables).to.deep.equal(expectedTables);
      }),
      { numRuns: 80 },
    );
    expect(batchedEvents).to.be.greaterThan(200);
  });

  it('batches of any size and any order across deployments (the coalescer, two batches at once) match one at a time in each deployment order', async () => {
    await fc.assert(
      fc.asyncProperty(
        events,
        // maxBatch 1 is group commit off: every event on its own, at once, in no order (the worker's order)
        fc.integer({ min: 2, max: 16 }),
        fc.integer({ min: 1, max: 3 }),
        fc.infiniteStream(fc.nat({ max: 2 })),
        async (cmds, maxBatch, maxBatches, picks) => {
          const items = materialize(cmds, false);
          // reference: deployment by deployment, each in its own order
          const byDeployment = [0, 1, 2].map((d) => items.map((it, i) => ({ it, i })).filter((x) => x.it.d === d));
          await reset();
          const expected = new Array<Outcome>(items.length);
          for (const list of byDeployment) {
            (await oneAtATime(list.map((x) => x.it))).forEach((o, k) => (expected[(list[k] as { i: number }).i] = o));
          }
          const expectedTables = await tables();
          // batched: the deployments' sequences interleaved at random, each keeping its order, all in flight at once
          await reset();
          const cursors = [0, 0, 0];
          const order: number[] = [];
          const it = picks[Symbol.iterator]();
          while (order.length < items.length) {
            const d = (it.next().value as number) % 3;
            const list = byDeployment[d] as Array<{ i: number }>;
            const c = cursors[d] as number;
            if (c < list.length) {
              order.push((list[c] as { i: number }).i);
              cursors[d] = c + 1;
            }
          }
          const coalescer = new TransitionCoalescer(service, { maxBatch, maxBatches });
          const settled = await Promise.allSettled(order.map((i) => coalescer.apply(items[i]!.name, items[i]!.data, items[i]!.options)));
          const got = new Array<Outcome>(items.length);
          settled.forEach((r, k) => (got[order[k] as number] = outcomeOf(r)));
          expect(got).to.deep.equal(expected);
          const gotTables = await tables();
          expect(gotTables.outboxOutOfOrder).to.equal(0);
          expect(gotTables).to.deep.equal(expectedTables);
        },
      ),
      { numRuns: 80 },
    );
  });

  /** Transaction ids that wrote the rows of these deployments (each row's xmin). */
  async function writers(deploymentIds: readonly string[]): Promise<string[]> {
    const rows = await q<{ x: string }>(
      `SELECT DISTINCT x FROM (
         SELECT xmin::text AS x FROM deployments WHERE id = ANY($1::uuid[])
         UNION ALL SELECT xmin::text FROM attempts WHERE deployment_id = ANY($1::uuid[])
         UNION ALL SELECT xmin::text FROM state_transitions WHERE deployment_id = ANY($1::uuid[])
         UNION ALL SELECT xmin::text FROM outbox WHERE deployment_id = ANY($1::uuid[])
         UNION ALL SELECT xmin::text FROM processed_events WHERE deployment_id = ANY($1::uuid[])) s`,
      [deploymentIds],
    );
    return rows.map((r) => r.x);
  }

  const summary = (r: PromiseSettledResult<ApplyResult>): string =>
    r.status === 'rejected'
      ? `error ${(r.reason as Error).constructor.name}`
      : r.value.outcome === 'applied'
        ? `applied v${r.value.version}`
        : r.value.outcome === 'noop'
          ? `noop ${r.value.reason}`
          : `rejected ${r.value.code}`;

  it('writes a batch, its outbox rows included, in one commit', async () => {
    const ids = Array.from({ length: 6 }, () => randomUUID());
    const attempt = randomUUID();
    const results = await service.applyMany([
      ...ids.map((deploymentId, i) => ({ name: 'deployment.create', data: { deploymentId, name: `b${i}`, eventId: `one-${deploymentId}` } })),
      { name: 'attempt.create', data: { deploymentId: ids[0], attemptId: attempt, eventId: `two-${attempt}` } },
      { name: 'attempt.start', data: { deploymentId: ids[0], attemptId: attempt, eventId: `three-${attempt}` } },
    ]);
    expect(results.map(summary)).to.deep.equal([...ids.map(() => 'applied v1'), 'applied v2', 'applied v3']);
    const [counts] = await q<{ o: string; t: string }>(
      `SELECT (SELECT count(*) FROM outbox WHERE deployment_id = ANY($1::uuid[])) AS o,
              (SELECT count(*) FROM state_transitions WHERE deployment_id = ANY($1::uuid[])) AS t`,
      [ids],
    );
    expect([Number(counts?.o), Number(counts?.t)]).to.deep.equal([8, 8]);
    expect(await writers(ids)).to.have.length(1);
  });

  /**
   * A service whose first batch meets `meanwhile` between its snapshot and its write (another writer gets there
   * first); `batches()` counts the batches that reached their write.
   */
  function interleaved(meanwhile: () => Promise<unknown>): { service: TransitionService; batches: () => number } {
    let batches = 0;
    const service = new TransitionService({
      dataSource: db.dataSource,
      now: () => NOW,
      hooks: {
        beforeBatchWrite: async () => {
          if (batches++ === 0) await meanwhile();
        },
      },
    });
    return { service, batches: () => batches };
  }

  it('a deployment whose version check lost is redone alone; the rest of the batch commits at once', async () => {
    const [d1, d2] = [randomUUID(), randomUUID()];
    await service.apply('deployment.create', { deploymentId: d1, name: 'lost', eventId: `c-${d1}` });
    await service.apply('deployment.create', { deploymentId: d2, name: 'kept', eventId: `c-${d2}` });
    const other = new TransitionService({ dataSource: db.dataSource, now: () => NOW });
    const [a0, a1, b1] = [randomUUID(), randomUUID(), randomUUID()];
    // a writer elsewhere gets to d1 between the batch's snapshot and its write
    const { service: hooked, batches } = interleaved(() => other.apply('attempt.create', { deploymentId: d1, attemptId: a0, eventId: `x-${a0}` }));
    const results = await hooked.applyMany([
      { name: 'attempt.create', data: { deploymentId: d1, attemptId: a1, eventId: `a-${a1}` } },
      { name: 'attempt.start', data: { deploymentId: d1, attemptId: a1, eventId: `s-${a1}` } },
      { name: 'attempt.create', data: { deploymentId: d2, attemptId: b1, eventId: `a-${b1}` } },
      { name: 'attempt.start', data: { deploymentId: d2, attemptId: b1, eventId: `s-${b1}` } },
    ]);
    // d1's events come after the other writer's (version 2): its attempt a0 is superseded by a1
    expect(results.map(summary)).to.deep.equal(['applied v3', 'applied v4', 'applied v2', 'applied v3']);
    expect(batches()).to.equal(1);
    const attempts = await q<{ id: string; status: string }>(`SELECT id, status FROM attempts WHERE deployment_id = $1 ORDER BY number`, [d1]);
    expect(attempts).to.deep.equal([
      { id: a0, status: 'superseded' },
      { id: a1, status: 'running' },
    ]);
    const history = await q<{ version: number; event_id: string }>(
      `SELECT version, event_id FROM state_transitions WHERE deployment_id = $1 ORDER BY version`,
      [d1],
    );
    expect(history.map((h) => h.event_id)).to.deep.equal([`c-${d1}`, `x-${a0}`, `a-${a1}`, `s-${a1}`]);
    // d2 in the batch's one commit; d1's redone events on their own
    const [batchTx] = await q<{ x: string }>(`SELECT xmin::text AS x FROM deployments WHERE id = $1`, [d2]);
    expect(await q(`SELECT 1 FROM state_transitions WHERE deployment_id = $1 AND version > 1 AND xmin::text <> $2`, [d2, batchTx?.x])).to.have.length(
      0,
    );
    expect(await q(`SELECT 1 FROM state_transitions WHERE deployment_id = $1 AND version > 2 AND xmin::text = $2`, [d1, batchTx?.x])).to.have.length(
      0,
    );
  });

  it('an eventId claimed meanwhile by another delivery makes that event a duplicate and applies the others once', async () => {
    const ids = [randomUUID(), randomUUID(), randomUUID()];
    const other = new TransitionService({ dataSource: db.dataSource, now: () => NOW });
    const items = ids.map((deploymentId, i) => ({
      name: 'deployment.create',
      data: { deploymentId, name: `d${i}`, eventId: `dup-${deploymentId}` },
    }));
    // another worker runs the same job (a stalled lock handed it out again) and commits first
    const { service: hooked } = interleaved(() => other.apply(items[1]!.name, items[1]!.data));
    const results = await hooked.applyMany(items);
    expect(results.map(summary)).to.deep.equal(['applied v1', 'noop duplicate_event', 'applied v1']);
    const [n] = await q<{ t: string; o: string }>(
      `SELECT (SELECT count(*) FROM state_transitions WHERE deployment_id = ANY($1::uuid[])) AS t,
              (SELECT count(*) FROM outbox WHERE deployment_id = ANY($1::uuid[])) AS o`,
      [ids],
    );
    expect([Number(n?.t), Number(n?.o)]).to.deep.equal([3, 3]);
  });

  it('a noop decided on top of a write that then lost its version check is redone too, not taken for a duplicate', async () => {
    const d1 = randomUUID();
    const a1 = randomUUID();
    await service.apply('deployment.create', { deploymentId: d1, name: 'torn', eventId: `c-${d1}` });
    await service.apply('attempt.create', { deploymentId: d1, attemptId: a1, eventId: `a-${a1}` });
    const other = new TransitionService({ dataSource: db.dataSource, now: () => NOW });
    // the batch decides the teardown (applied), and on top of it the attempt's end (a noop: no current attempt);
    // meanwhile another worker starts the attempt, so the teardown's version check loses
    const { service: hooked } = interleaved(() => other.apply('attempt.start', { deploymentId: d1, attemptId: a1, eventId: `s-${a1}` }));
    const results = await hooked.applyMany([
      { name: 'deployment.teardown', data: { deploymentId: d1, eventId: `t-${d1}` } },
      { name: 'attempt.end', data: { deploymentId: d1, attemptId: a1, outcome: 'succeeded', eventId: `e-${a1}` } },
    ]);
    // one at a time after the start: the teardown is refused and the end applies
    expect(results.map(summary)).to.deep.equal(['rejected attempt_in_progress', 'applied v4']);
    const [row] = await q<{ state: string; version: number }>(`SELECT state, version FROM deployments WHERE id = $1`, [d1]);
    expect(row).to.deep.equal({ state: 'ready', version: 4 });
    expect(await q(`SELECT outcome FROM processed_events WHERE event_id = $1`, [`e-${a1}`])).to.deep.equal([{ outcome: 'applied' }]);
  });

  it('two batches racing to claim one noop event: one claims it, the other is duplicate_event with what the first did', async () => {
    const d = randomUUID();
    const a = randomUUID();
    await service.apply('deployment.create', { deploymentId: d, name: 'raced', eventId: `c-${d}` });
    await service.apply('attempt.create', { deploymentId: d, attemptId: a, eventId: `a-${a}` });
    await service.apply('attempt.start', { deploymentId: d, attemptId: a, eventId: `s-${a}` });
    // two workers each hold a delivery of one event (a stalled job handed out again) in a batch; both batches have
    // read and decided before either writes
    const bothDecided = barrier(2);
    const worker = () => new TransitionService({ dataSource: db.dataSource, now: () => NOW, hooks: { beforeBatchWrite: bothDecided } });
    const again = { name: 'attempt.start', data: { deploymentId: d, attemptId: a, eventId: 'start-again' } };
    const batch = () => {
      const fresh = randomUUID();
      return [again, { name: 'deployment.create', data: { deploymentId: fresh, name: 'beside', eventId: `c-${fresh}` } }];
    };
    const [one, two] = await Promise.all([worker().applyMany(batch()), worker().applyMany(batch())]);
    expect([...(one ?? []), ...(two ?? [])].map(summary).sort()).to.deep.equal([
      'applied v1',
      'applied v1',
      'noop duplicate',
      'noop duplicate_event',
    ]);
    const lost = [one?.[0], two?.[0]].find((r) => r?.status === 'fulfilled' && r.value.outcome === 'noop' && r.value.reason === 'duplicate_event');
    expect(lost?.status === 'fulfilled' && lost.value, 'the losing delivery says what the first did').to.deep.include({
      previous: { outcome: 'noop', reason: 'duplicate', version: 3 },
    });
  });

  it('an orphan whose buffered heartbeat cannot be written (its Redis is away) fails alone: the rest of the batch applies', async () => {
    const redis = new URL(testEnv().redisUrl);
    const proxy = new TcpProxy(redis.hostname, Number(redis.port));
    const prefix = uniquePrefix();
    // the stamp buffer reaches Redis through a line the test can cut; PostgreSQL stays up
    const buffer = new StampBuffer({ redis: TcpProxy.rewrite(testEnv().redisUrl, await proxy.listen()), db: new Database(db.dataSource), prefix });
    const buffered = new TransitionService({ dataSource: db.dataSource, now: () => NOW, stampBuffer: buffer });
    try {
      const ids = await runningAttempt(buffered); // started at NOW
      // its last heartbeat (NOW + 60 s) is still in Redis; the sweep declared it at NOW + 100 s from PostgreSQL's view
      await buffer.absorbHeartbeat(ids.attemptId, ids.deploymentId, new Date(NOW.getTime() + 60_000));
      const orphan = {
        name: 'attempt.orphaned',
        data: { ...ids, eventId: `attempt.orphaned.${ids.attemptId}.${NOW.getTime()}`, actor: 'sweep' },
        options: { producedAt: new Date(NOW.getTime() + 100_000) },
      };
      const fresh = randomUUID();
      const create = { name: 'deployment.create', data: { deploymentId: fresh, name: 'unrelated', eventId: `c-${fresh}` } };
      proxy.cut();
      const results = await buffered.applyMany([orphan, create]);
      expect(results.map((r) => r.status)).to.deep.equal(['rejected', 'fulfilled']);
      expect(summary(results[1] as PromiseSettledResult<ApplyResult>), 'the unrelated create').to.equal('applied v1');
      // Redis's error (which one depends on when ioredis sees the line go): an outage, so the worker retries the orphan
      expect(isTransient((results[0] as PromiseRejectedResult).reason), 'an outage: the worker retries the orphan').to.equal(true);
      expect(await q(`SELECT state FROM deployments WHERE id = $1`, [fresh])).to.deep.equal([{ state: 'pending' }]);
      expect(await q(`SELECT status FROM attempts WHERE id = $1`, [ids.attemptId])).to.deep.equal([{ status: 'running' }]);
      expect(await q(`SELECT 1 FROM processed_events WHERE event_id = $1`, [orphan.data.eventId])).to.have.length(0);

      // Redis back: the orphan retried alone finds the heartbeat, as it would have had Redis been there
      proxy.restore();
      await waitFor('the buffer to reach Redis again', async () => ((await buffer.latestHeartbeat([ids])).size === 1 ? true : undefined));
      const [retried] = await buffered.applyMany([orphan]);
      expect(retried?.status === 'fulfilled' && retried.value).to.deep.include({ outcome: 'noop', reason: 'alive' });
    } finally {
      await buffer.close();
      await proxy.close();
      await dropPrefix(prefix);
    }
  });

  it('a rejection, bad input and an event that must wait fail alone: the others of the batch apply', async () => {
    const [d1, d2, d3] = [randomUUID(), randomUUID(), randomUUID()];
    await service.apply('deployment.create', { deploymentId: d3, name: 'pending', eventId: `c-${d3}` });
    const results = await service.applyMany([
      { name: 'deployment.create', data: { deploymentId: d1, name: 'first', eventId: `c-${d1}` } },
      { name: 'deployment.create', data: { deploymentId: 'not-a-uuid', name: 'bad' } },
      { name: 'deployment.resolve', data: { deploymentId: d3, outcome: 'ready', eventId: `r-${d3}` } },
      { name: 'attempt.start', data: { deploymentId: d3, attemptId: randomUUID(), eventId: `s-${d3}` } },
      { name: 'deployment.create', data: { deploymentId: d2, name: 'second', eventId: `c-${d2}` } },
    ]);
    expect(results.map(summary)).to.deep.equal(['applied v1', 'error ValidationError', 'rejected not_unknown', 'error NotYetError', 'applied v1']);
    expect((results[1] as PromiseRejectedResult).reason).to.be.instanceOf(ValidationError);
    expect((results[3] as PromiseRejectedResult).reason).to.be.instanceOf(NotYetError);
    expect(await q(`SELECT 1 FROM processed_events WHERE deployment_id = $1`, [d3])).to.have.length(1); // its create only
  });

  it('the coalescer batches only what is in flight (one at a time goes alone), up to its cap', async () => {
    const coalescer = new TransitionCoalescer(service, { maxBatch: 8, maxBatches: 2 });
    for (let i = 0; i < 5; i++)
      await coalescer.apply('deployment.create', { deploymentId: randomUUID(), name: `s${i}` }, { fallbackEventId: randomUUID() });
    expect([...coalescer.sizes]).to.deep.equal([[1, 5]]);
    const results = await Promise.all(
      Array.from({ length: 40 }, (_, i) =>
        coalescer.apply('deployment.create', { deploymentId: randomUUID(), name: `p${i}` }, { fallbackEventId: randomUUID() }),
      ),
    );
    expect(results.every((r) => r.outcome === 'applied')).to.equal(true);
    const sizes = [...coalescer.sizes.keys()];
    expect(Math.max(...sizes)).to.equal(8);
    // the burst's first event went at once, alone: nothing waits for a batch to fill
    expect(coalescer.sizes.get(1), JSON.stringify([...coalescer.sizes])).to.equal(5 + 1);
  });

  it('the coalescer keeps a deployment in one batch at a time whatever the casing of its id', async () => {
    const d = randomUUID();
    const a = randomUUID();
    await service.apply('deployment.create', { deploymentId: d, name: 'cased', eventId: `c-${d}` });
    let entered = (): void => undefined;
    const writing = new Promise<void>((resolve) => (entered = resolve));
    let release = (): void => undefined;
    const released = new Promise<void>((resolve) => (release = resolve));
    // the first event's write waits until the test lets it go
    const hooked = new TransitionService({
      dataSource: db.dataSource,
      now: () => NOW,
      hooks: {
        beforeUpdate: async (event) => {
          if (event.eventId !== `a-${a}`) return;
          entered();
          await released;
        },
      },
    });
    const coalescer = new TransitionCoalescer(hooked, { maxBatch: 2, maxBatches: 2 });
    const settle = (p: Promise<ApplyResult>) =>
      p.then(
        (value) => ({ status: 'fulfilled', value }) as const,
        (reason: unknown) => ({ status: 'rejected', reason }) as const,
      );
    const first = settle(coalescer.apply('attempt.create', { deploymentId: d, attemptId: a, eventId: `a-${a}` }));
    await writing;
    // the same deployment in capitals, then a full batch's worth waiting: a second batch may start beside the first
    const second = settle(coalescer.apply('attempt.start', { deploymentId: d.toUpperCase(), attemptId: a, eventId: `s-${a}` }));
    const fresh = randomUUID();
    const third = settle(coalescer.apply('deployment.create', { deploymentId: fresh, name: 'beside', eventId: `c-${fresh}` }));
    expect(summary(await third)).to.equal('applied v1');
    release();
    // had the start gone into that second batch, it would have been decided before the attempt existed
    expect([summary(await first), summary(await second)]).to.deep.equal(['applied v2', 'applied v3']);
    expect([...coalescer.sizes]).to.deep.equal([[1, 3]]);
  });

  describe('in the worker, through real BullMQ queues', () => {
    let prefix: string;
    let producer: LifecycleProducer;
    let queue: Queue;
    let worker: LifecycleWorker | null = null;

    beforeEach(() => {
      prefix = uniquePrefix();
      producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
      queue = producer.queue;
    });
    afterEach(async () => {
      await worker?.close(5000);
      worker = null;
      await producer.close();
      await dropPrefix(prefix);
    });

    it('every job of a batch gets its own outcome: completed, failed without retries, or delayed for a retry', async () => {
      const pending = randomUUID();
      await service.apply('deployment.create', { deploymentId: pending, name: 'pending', eventId: `c-${pending}` });
      const fresh = Array.from({ length: 24 }, () => randomUUID());
      await queue.addBulk([
        ...fresh.map((deploymentId, i) => ({
          name: 'deployment.create',
          data: { deploymentId, name: `w${i}`, eventId: `c-${deploymentId}` },
          opts: { jobId: `c-${deploymentId}` },
        })),
        { name: 'deployment.resolve', data: { deploymentId: pending, outcome: 'ready', eventId: 'rejected-one' }, opts: { jobId: 'rejected-one' } },
        { name: 'attempt.start', data: { deploymentId: pending, attemptId: randomUUID(), eventId: 'waiting-one' }, opts: { jobId: 'waiting-one' } },
        { name: 'deployment.create', data: { deploymentId: 'nope', name: 'bad' }, opts: { jobId: 'invalid-one' } },
      ]);
      worker = new LifecycleWorker({ connection: testEnv().redisUrl, prefix, service, concurrency: 32 });
      const coalescer = worker.coalescer;
      await waitFor('every job to settle', async () => {
        const counts = await queue.getJobCounts('completed', 'failed', 'delayed');
        return counts.completed === 24 && counts.failed === 2 && counts.delayed === 1 ? counts : undefined;
      });
      expect((await queue.getJob('rejected-one'))?.failedReason).to.match(/^not_unknown: /);
      expect((await queue.getJob('invalid-one'))?.failedReason).to.match(/deploymentId: must be a UUID/);
      expect(await queue.getJobState('waiting-one')).to.equal('delayed');
      expect(Math.max(...coalescer.sizes.keys())).to.be.greaterThan(1);
      expect(await q(`SELECT 1 FROM deployments WHERE id = ANY($1::uuid[])`, [fresh])).to.have.length(24);
    });
  });
});
