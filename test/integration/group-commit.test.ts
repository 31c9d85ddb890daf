/**
 * Group commit (issue 18): `TransitionService.applyMany` and the worker's `TransitionCoalescer` against a real
 * PostgreSQL. The property tests compare, for random mixes of events over a few deployments, the database and every
 * event's outcome after batched application with the same events applied one at a time.
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import fc from 'fast-check';
import { TransitionCoalescer, TransitionService, type ApplyResult } from '../../src/services/transitions';
import type { ApplyOptions } from '../../src/services/transitions';
import { openTestDatabase, type TestDatabase } from '../helpers/db';

const NOW = new Date('2026-12-02T12:00:00.000Z');
const _KINDS = [
  'deployment.create',
  'attempt.create',
  'attempt.start',
  'attempt.end',
  'attempt.cancel',
  'attempt.orphaned',
  'attempt.expired',
  'deployment.teardown',
  'deployment.resolve',
] as const;

/** One generated event, before it is given ids. */
interface Cmd {
  readonly d: number;
  readonly kind: (typeof _KINDS)[number];
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

const kind = (name: (typeof _KINDS)[number], weight: number) => ({ arbitrary: fc.constant(name), weight });
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
          return { deploymentId, attemptId, outcome: c.flag ? 'succeeded' : 'failed', ...(c.a === 1 ? { endpoint } : {}), ...(c.flag ? {} : { reason: 'boom' }) };
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
});
