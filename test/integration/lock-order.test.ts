/**
 * One lock order (docs/architecture.md, "One lock order"): every statement that can lock more than one row of
 * `deployments` or `attempts` locks them by id, whatever order it is given them in and whatever plan PostgreSQL
 * picks; and a lock conflict that still happens (a deadlock PostgreSQL breaks) is retried, not reported as an outage.
 *
 * Every statement here is the product's own text (the builders in src/entities/sql), run on real sessions. The
 * interleavings are staged with sessions of the test's own that hold rows (`BEGIN; SELECT ... FOR UPDATE`); each step
 * waits for a session to be blocked on a row lock (pg_stat_activity), never for time. Only PostgreSQL's own deadlock
 * check takes time: deadlock_timeout (1 s) after a session starts waiting.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { Writable } from 'node:stream';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { Client } from 'pg';
import {
  Database,
  sessionOf,
  STAMP_BATCH_SQL,
  SWEEP_SQL,
  TRANSITION_SQL,
  transitionWriteParams,
  type Session,
  type TransitionWrite,
} from '../../src/entities/sql';
import { createLogger, type Logger } from '../../src/log';
import { LifecycleProducer } from '../../src/queues/producer';
import { ServerWatch } from '../../src/redis/connection';
import { StampBuffer } from '../../src/services/stamps';
import { Sweeper, type SweeperOptions } from '../../src/services/sweep/sweeper';
import { TransitionService } from '../../src/services/transitions';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { runningAttempt } from '../helpers/lifecycle';
import { ReadyServer } from '../helpers/ready-server';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

type Table = 'deployments' | 'attempts';

/** Rows of one table. */
interface Rows {
  readonly table: Table;
  readonly ids: readonly string[];
}

/** A connection of the test's own, beside the product's pool. */
interface Conn {
  readonly client: Client;
  readonly pid: number;
  /** the product's runner on this connection: named prepared statements, as in production */
  readonly session: Session;
}

/** Collects everything a pino logger writes, one JSON record a line. */
class Capture extends Writable {
  text = '';
  override _write(chunk: Buffer, _encoding: string, callback: () => void): void {
    this.text += chunk.toString();
    callback();
  }
  records(): Array<Record<string, unknown>> {
    return this.text
      .split('\n')
      .filter((line) => line.trim() !== '')
      .map((line) => JSON.parse(line) as Record<string, unknown>);
  }
  messages(): string[] {
    return this.records().map((r) => String(r.msg));
  }
}

/** What a settled promise says, for an assertion message: the error's SQLSTATE and message. */
function failureOf(what: string, result: PromiseSettledResult<unknown>): string[] {
  if (result.status === 'fulfilled') return [];
  const err = result.reason as { code?: unknown; message?: unknown };
  return [`${what}: ${String(err.code)} ${String(err.message)}`];
}

function settle<T>(promise: Promise<T>): Promise<PromiseSettledResult<T>> {
  return promise.then(
    (value) => ({ status: 'fulfilled', value }),
    (reason: unknown) => ({ status: 'rejected', reason }),
  );
}

const T0 = new Date('2031-03-01T12:00:00.000Z');
const at = (s: number): Date => new Date(T0.getTime() + s * 1000);

describe('lock order: every multi-row write of deployments and attempts locks its rows by id', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let redis: IORedis;
  let prefix: string;
  const conns: Client[] = [];
  const closers: Array<() => Promise<void>> = [];

  before(async () => {
    db = await openTestDatabase(12);
    redis = testRedis();
  });
  after(async () => {
    redis?.disconnect();
    await db?.close();
  });
  beforeEach(async () => {
    await db.dataSource.query(`TRUNCATE deployments, attempts, state_transitions, outbox, processed_events`);
    prefix = uniquePrefix();
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    await Promise.all(conns.splice(0).map((c) => c.end()));
    await dropPrefix(prefix);
  });

  const q = <T>(text: string, params: unknown[] = []): Promise<T[]> => db.dataSource.query<T[]>(text, params);

  /** The database's URL as the local servers' admin: setting deadlock_timeout, and seeing every session's wait, take one. */
  function adminUrl(): string {
    const url = new URL(testEnv().adminDatabaseUrl);
    url.pathname = new URL(db.url).pathname;
    return url.toString();
  }

  /** Reads pg_stat_activity as the admin: a role that is no superuser sees no other role's waits there. */
  async function activity<T extends object>(text: string, params: unknown[]): Promise<T[]> {
    const client = new Client({ connectionString: adminUrl() });
    await client.connect();
    try {
      return (await client.query<T>(text, params)).rows;
    } finally {
      await client.end();
    }
  }

  /** `count` ids of one test, in id order: the same random head, then 1, 2, 3... */
  function orderedIds(count: number): string[] {
    const head = randomBytes(4).toString('hex');
    return Array.from({ length: count }, (_, i) => `${head}-0000-4000-8000-${String(i + 1).padStart(12, '0')}`);
  }

  /**
   * Tables the size of a small fleet, analyzed, as the planner sees them in production: on near-empty tables it scans
   * the (state, id) index and so happens to lock by id whatever a statement is given.
   */
  async function fleetSized(): Promise<void> {
    await q(
      `INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, state_changed_at)
       SELECT gen_random_uuid(), 'filler', 'ready', 1, 'http://127.0.0.1:9/', 'node_port', $1 FROM generate_series(1, 5000)`,
      [T0],
    );
    await q(
      `INSERT INTO attempts (id, deployment_id, number, status, started_at)
       SELECT gen_random_uuid(), id, 1, 'running', $1 FROM deployments WHERE name = 'filler'`,
      [T0],
    );
    await q(`ANALYZE deployments, attempts`);
  }

  /** Ready deployments, inserted in the order given (so their order in the heap is that one). */
  async function deployments(ids: readonly string[], kind: 'node_port' | 'cluster_dns' = 'node_port', url = 'http://127.0.0.1:9/'): Promise<void> {
    for (const id of ids) {
      await q(
        `INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, state_changed_at)
         VALUES ($1, 'web', 'ready', 1, $2, $3, $4)`,
        [id, url, kind, T0],
      );
    }
  }

  /** Running attempts, inserted in the order given, each of a deploying deployment of its own; returns those. */
  async function attempts(ids: readonly string[]): Promise<string[]> {
    const owners: string[] = [];
    for (const id of ids) {
      const deploymentId = randomUUID();
      owners.push(deploymentId);
      await q(`INSERT INTO deployments (id, name, state, version, state_changed_at) VALUES ($1, 'web', 'deploying', 1, $2)`, [deploymentId, T0]);
      await q(`INSERT INTO attempts (id, deployment_id, number, status, started_at) VALUES ($1, $2, 1, 'running', $3)`, [id, deploymentId, T0]);
      await q(`UPDATE deployments SET current_attempt_id = $1 WHERE id = $2`, [id, deploymentId]);
    }
    return owners;
  }

  /** Running attempts of one deployment (numbered in the order given); resolves to their deployment, once per attempt. */
  async function attemptsOfOne(ids: readonly string[]): Promise<string[]> {
    const deploymentId = randomUUID();
    await q(`INSERT INTO deployments (id, name, state, version, state_changed_at) VALUES ($1, 'web', 'deploying', 1, $2)`, [deploymentId, T0]);
    await q(
      `INSERT INTO attempts (id, deployment_id, number, status, started_at)
       SELECT a.id, $2, a.n, 'running', $3 FROM unnest($1::uuid[]) WITH ORDINALITY AS a(id, n)`,
      [ids, deploymentId, T0],
    );
    return ids.map(() => deploymentId);
  }

  async function connect(settings: Readonly<Record<string, string>> = {}): Promise<Conn> {
    // setting deadlock_timeout takes a superuser: such sessions connect as the admin
    const client = new Client({ connectionString: Object.keys(settings).length === 0 ? db.url : adminUrl() });
    await client.connect();
    conns.push(client);
    for (const [name, value] of Object.entries(settings)) await client.query(`SET ${name} = ${value}`);
    const pid = (await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]?.pid;
    if (pid === undefined) throw new Error('no backend pid');
    return { client, pid, session: sessionOf(client) };
  }

  /** Opens a transaction on `conn` that holds these rows until it ends. */
  async function hold(conn: Conn, rows: Rows): Promise<void> {
    await conn.client.query('BEGIN');
    await lockRows(conn, rows);
  }

  function lockRows(conn: Conn, rows: Rows): Promise<unknown> {
    return conn.client.query(`SELECT id FROM ${rows.table} WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE`, [rows.ids]);
  }

  /** Waits until backend `pid` waits for a lock. */
  async function blocked(what: string, pid: number): Promise<void> {
    await waitFor(`${what} to wait for a row lock`, async () => {
      const [row] = await activity<{ wait: string | null }>(`SELECT wait_event_type AS wait FROM pg_stat_activity WHERE pid = $1`, [pid]);
      return row?.wait === 'Lock' ? true : undefined;
    });
  }

  /** Waits until one of the product's pooled connections waits for a lock in a statement containing `fragment`. */
  async function productBlocked(what: string, fragment: string): Promise<void> {
    await waitFor(`${what} to wait for a row lock`, async () => {
      const [row] = await activity<{ pid: number }>(
        `SELECT pid FROM pg_stat_activity
          WHERE datname = current_database() AND application_name = 'lifecycle-fleet-test' AND wait_event_type = 'Lock'
            AND strpos(query, $1) > 0`,
        [fragment],
      );
      return row?.pid;
    });
  }

  /**
   * Stages one deadlock that the product's statement loses. A gate session holds `gate` and a holder holds `held`;
   * `product()` starts, takes what it can and waits at the gate; the holder then asks for `wanted` (which the product
   * holds, or waits for first) and waits; the gate opens, and the product asks for `held`: the cycle closes on the product's
   * wait. The holder's deadlock_timeout is long, so the product's own check finds the cycle: PostgreSQL aborts the
   * product's statement (40P01) and the holder gets `wanted`, then commits. Resolves to how the product's work ended.
   */
  async function productLosesADeadlock<T>(stage: {
    readonly gate: Rows;
    readonly held: Rows;
    readonly wanted: Rows;
    /** a part of the product statement's text that waits at the gate */
    readonly fragment: string;
    readonly product: () => Promise<T>;
  }): Promise<PromiseSettledResult<T>> {
    const gate = await connect();
    const holder = await connect({ deadlock_timeout: `'10min'` });
    await hold(gate, stage.gate);
    await hold(holder, stage.held);
    const product = settle(stage.product());
    await productBlocked('the product at the gate', stage.fragment);
    const asked = settle(lockRows(holder, stage.wanted));
    await blocked('the holder', holder.pid);
    await gate.client.query('COMMIT');
    const got = await asked;
    expect(failureOf('the holder', got), 'the product, not the holder, lost the deadlock').to.deep.equal([]);
    await holder.client.query('COMMIT');
    return product;
  }

  /** A write (TRANSITION_SQL.write's parameters) of version-checked deployment updates and attempt changes only. */
  function batchWrite(updates: readonly string[], changed: ReadonlyArray<{ id: string; deploymentId: string }> = []): unknown[] {
    const write: TransitionWrite = {
      updates: updates.map((id) => ({
        id,
        from_version: 1,
        to_version: 2,
        state: 'ready',
        at: T0,
        set_current: false,
        current_attempt_id: null,
        set_endpoint: false,
        endpoint_url: null,
        endpoint_kind: null,
        set_ready: false,
        last_ready_at: null,
      })),
      inserts: [],
      applied: [],
      noopClaims: [],
      newAttempts: [],
      changedAttempts: changed.map((c) => ({
        id: c.id,
        deployment_id: c.deploymentId,
        status: 'succeeded',
        reason: null,
        started_at: null,
        ended_at: T0,
      })),
    };
    return transitionWriteParams(write);
  }

  describe('the statements, over several sessions', () => {
    it("the flush's readiness UPDATE, a probe shard's UPDATE and the group-commit write never deadlock, in whatever orders they are given rows", async () => {
      // In the orders each caller gives (the flush: oldest stamp first; the shard: the order its probes finished;
      // group commit: by id), these three form a cycle: the batch holds a and wants c, the flush holds c and wants b,
      // the shard holds b and wants a. Gates (g1, g2, g3, held by a fourth session) stop each one after its first row,
      // so every one holds its first row before any asks for its last.
      await fleetSized();
      const [a, g1, b, g3, c, g2] = orderedIds(6) as [string, string, string, string, string, string];
      await deployments([a, g1, b, g3, c, g2]);
      const gates = await connect();
      await hold(gates, { table: 'deployments', ids: [g1, g2, g3] });
      const [batch, flush, shard] = [await connect(), await connect(), await connect()];

      const batched = settle(batch.session.run(TRANSITION_SQL.write, batchWrite([a, g1, c])));
      await blocked('the group-commit write', batch.pid);
      const flushed = settle(
        flush.session.run(STAMP_BATCH_SQL.readiness, [
          [c, g2, b],
          [at(1), at(2), at(3)],
        ]),
      );
      await blocked('the readiness flush', flush.pid);
      const url = 'http://127.0.0.1:9/';
      const stamped = settle(
        shard.session.run(SWEEP_SQL.stamp, [
          [b, g3, a],
          [url, url, url],
          [at(4), at(4), at(4)],
          [true, true, true],
        ]),
      );
      await blocked('the probe shard', shard.pid);
      await gates.client.query('COMMIT');

      const failures = [
        ...failureOf('group-commit write', await batched),
        ...failureOf('readiness flush', await flushed),
        ...failureOf('probe shard', await stamped),
      ];
      expect(failures).to.deep.equal([]);
      const rows = await q<{ id: string; version: number; last_ready_at: Date | null }>(
        `SELECT id, version, last_ready_at FROM deployments WHERE id = ANY($1) ORDER BY id`,
        [[a, b, c]],
      );
      expect(rows.map((r) => [r.version, r.last_ready_at?.toISOString() ?? null])).to.deep.equal([
        [2, at(4).toISOString()],
        [1, at(4).toISOString()],
        [2, at(1).toISOString()],
      ]);
    });

    it('the heartbeat flush and the group-commit write never deadlock on attempts, in whatever orders they are given rows', async () => {
      // the flush holds x and wants y (oldest stamp first), the batch's attempt changes hold y and want x
      await fleetSized();
      const [x, g1, y, g2] = orderedIds(4) as [string, string, string, string];
      const [dx, dg1, dy, dg2] = (await attempts([x, g1, y, g2])) as [string, string, string, string];
      const gates = await connect();
      await hold(gates, { table: 'attempts', ids: [g1, g2] });
      const [flush, batch] = [await connect(), await connect()];

      const flushed = settle(
        flush.session.run(STAMP_BATCH_SQL.heartbeats, [
          [x, g1, y],
          [dx, dg1, dy],
          [at(1), at(2), at(3)],
        ]),
      );
      await blocked('the heartbeat flush', flush.pid);
      const changed = [
        { id: y, deploymentId: dy },
        { id: g2, deploymentId: dg2 },
        { id: x, deploymentId: dx },
      ];
      const batched = settle(batch.session.run(TRANSITION_SQL.write, batchWrite([dx, dy, dg2].sort(), changed)));
      await blocked('the group-commit write', batch.pid);
      await gates.client.query('COMMIT');

      const failures = [...failureOf('heartbeat flush', await flushed), ...failureOf('group-commit write', await batched)];
      expect(failures).to.deep.equal([]);
      const rows = await q<{ status: string }>(`SELECT status FROM attempts WHERE id = ANY($1) ORDER BY id`, [[x, y, g2]]);
      expect(rows.map((r) => r.status)).to.deep.equal(['succeeded', 'succeeded', 'succeeded']);
    });
  });

  describe('each statement locks by id, whatever plan PostgreSQL picks', () => {
    // An UPDATE ... FROM unnest(...) locks rows in the order its join produces them: the array's order in a nested
    // loop driven by the array, the heap's in a hash join that scans the table. So sorting the input is not enough.
    // The rows sit in the heap from the highest id down, and each statement gets them from the highest id down.
    const PLANS: ReadonlyArray<readonly [string, Readonly<Record<string, string>>]> = [
      ["the planner's choice", {}],
      ['hash joins only', { enable_nestloop: 'off', enable_mergejoin: 'off' }],
      ['merge joins only', { enable_nestloop: 'off', enable_hashjoin: 'off' }],
      ['nested loops only', { enable_hashjoin: 'off', enable_mergejoin: 'off' }],
      // a bitmap scan returns rows in the heap's order: the lock's ORDER BY is what sorts them
      ['no index scans', { enable_indexscan: 'off', enable_indexonlyscan: 'off' }],
    ];
    const url = 'http://127.0.0.1:9/';
    const STATEMENTS: ReadonlyArray<{
      readonly name: string;
      readonly table: Table;
      /** runs the statement over `ids` in the order given; `owners`: each attempt's deployment */
      readonly run: (s: Session, ids: readonly string[], owners: readonly string[]) => Promise<unknown>;
      /** makes the attempts (default: each of a deployment of its own); resolves to their deployments */
      readonly attempts?: (ids: readonly string[]) => Promise<string[]>;
    }> = [
      {
        name: 'the readiness flush (STAMP_BATCH_SQL.readiness)',
        table: 'deployments',
        run: (s, ids) => s.run(STAMP_BATCH_SQL.readiness, [ids, ids.map(() => at(1))]),
      },
      {
        name: "a probe shard's stamp (SWEEP_SQL.stamp)",
        table: 'deployments',
        run: (s, ids) => s.run(SWEEP_SQL.stamp, [ids, ids.map(() => url), ids.map(() => at(1)), ids.map(() => true)]),
      },
      {
        name: "the group-commit write's deployments (TRANSITION_SQL.write)",
        table: 'deployments',
        run: (s, ids) => s.run(TRANSITION_SQL.write, batchWrite(ids)),
      },
      {
        name: 'the heartbeat flush (STAMP_BATCH_SQL.heartbeats)',
        table: 'attempts',
        run: (s, ids, owners) => s.run(STAMP_BATCH_SQL.heartbeats, [ids, owners, ids.map(() => at(1))]),
      },
      {
        name: "the group-commit write's attempts (TRANSITION_SQL.write)",
        table: 'attempts',
        run: (s, ids, owners) =>
          s.run(
            TRANSITION_SQL.write,
            batchWrite(
              [...owners].sort(),
              ids.map((id, i) => ({ id, deploymentId: owners[i] ?? '' })),
            ),
          ),
      },
      {
        name: "a lone event's write's attempts (TRANSITION_SQL.write, a batch of one: one deployment)",
        table: 'attempts',
        attempts: attemptsOfOne,
        run: (s, ids, owners) =>
          s.run(
            TRANSITION_SQL.write,
            batchWrite(
              [owners[0] ?? ''],
              ids.map((id, i) => ({ id, deploymentId: owners[i] ?? '' })),
            ),
          ),
      },
    ];

    for (const statement of STATEMENTS) {
      it(`${statement.name}`, async () => {
        await fleetSized();
        for (const [plan, settings] of PLANS) {
          const [lo, mid, hi] = orderedIds(3) as [string, string, string];
          const given = [hi, mid, lo];
          const owners = statement.table === 'deployments' ? (await deployments(given), []) : await (statement.attempts ?? attempts)(given);
          const gate = await connect();
          await hold(gate, { table: statement.table, ids: [mid] });
          const product = await connect(settings);
          const ran = settle(statement.run(product.session, given, owners));
          await blocked(`${statement.name} under ${plan}`, product.pid);
          // which of the other two it locked before it came to wait for the middle one: SKIP LOCKED leaves those out
          const probe = await connect();
          const free = (
            await probe.client.query<{ id: string }>(
              `SELECT id FROM ${statement.table} WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE SKIP LOCKED`,
              [[lo, hi]],
            )
          ).rows.map((r) => r.id);
          await gate.client.query('COMMIT');
          expect(failureOf(statement.name, await ran)).to.deep.equal([]);
          const label = (id: string): string => (id === lo ? 'lo' : id === hi ? 'hi' : id);
          expect(free.map(label), `under ${plan}: the rows it had not locked while it waited for the middle one`).to.deep.equal(['hi']);
        }
      });
    }
  });

  describe('a deadlock that still happens is retried, not reported as an outage', () => {
    /** A sweep whose tick flushes `buffer` first; its log and its PostgreSQL watch's reports are captured. */
    function sweeper(buffer: StampBuffer, options: Partial<SweeperOptions> = {}) {
      const log = new Capture();
      const reports: string[] = [];
      const producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
      closers.push(() => producer.close());
      const logger: Logger = createLogger('debug', log);
      const sweep = new Sweeper({
        dataSource: db.dataSource,
        producer,
        now: () => at(10),
        flushStamps: async (now) => (await buffer.flush(now)).stamped,
        pgWatch: new ServerWatch('PostgreSQL (test)', (_level, message) => reports.push(message)),
        logger,
        ...options,
      });
      return { sweep, log, reports };
    }

    function stampBuffer(logger?: Logger): StampBuffer {
      return new StampBuffer({ redis, db: new Database(db.dataSource), prefix, ...(logger === undefined ? {} : { logger }) });
    }

    /** The lock conflicts retried, as logged: [code, what]. */
    function retriesLogged(log: Capture): string[][] {
      return log
        .records()
        .filter((r) => r.msg === 'lock conflict: running it again')
        .map((r) => [String(r.code), String(r.what)]);
    }

    it("the flush's readiness UPDATE: the sweep tick completes, and says nothing of a server away", async () => {
      const [lo, mid, hi] = orderedIds(3) as [string, string, string];
      await deployments([lo, mid, hi], 'cluster_dns'); // not probed: only the flush writes them
      const log = new Capture();
      const buffer = stampBuffer(createLogger('debug', log));
      // oldest first is id order here: the flush takes lo, then waits for mid
      for (const [i, id] of [lo, mid, hi].entries()) await buffer.absorbReadiness(id, at(i + 1));
      const { sweep, log: sweepLog, reports } = sweeper(buffer);

      const tick = await productLosesADeadlock({
        gate: { table: 'deployments', ids: [mid] },
        held: { table: 'deployments', ids: [hi] },
        wanted: { table: 'deployments', ids: [lo] },
        fragment: 'SET last_ready_at = GREATEST',
        product: () => sweep.sweep(),
      });

      expect(failureOf('the sweep tick', tick)).to.deep.equal([]);
      expect(tick.status === 'fulfilled' ? tick.value.flushed : null).to.equal(3);
      expect(retriesLogged(log)).to.deep.equal([['40P01', 'the readiness flush']]);
      expect(sweepLog.messages().filter((m) => /server is away|sweep failed/.test(m))).to.deep.equal([]);
      expect(reports).to.deep.equal([]);
      const stamps = await q<{ last_ready_at: Date }>(`SELECT last_ready_at FROM deployments WHERE id = ANY($1) ORDER BY id`, [[lo, mid, hi]]);
      expect(stamps.map((r) => r.last_ready_at.toISOString())).to.deep.equal([at(1), at(2), at(3)].map((d) => d.toISOString()));
    });

    it('the heartbeat flush: the sweep tick completes, and says nothing of a server away', async () => {
      const [lo, mid, hi] = orderedIds(3) as [string, string, string];
      const owners = (await attempts([lo, mid, hi])) as [string, string, string];
      const log = new Capture();
      const buffer = stampBuffer(createLogger('debug', log));
      for (const [i, id] of [lo, mid, hi].entries()) await buffer.absorbHeartbeat(id, owners[i] as string, at(i + 1));
      const { sweep, log: sweepLog, reports } = sweeper(buffer);

      const tick = await productLosesADeadlock({
        gate: { table: 'attempts', ids: [mid] },
        held: { table: 'attempts', ids: [hi] },
        wanted: { table: 'attempts', ids: [lo] },
        fragment: 'SET last_heartbeat_at = GREATEST',
        product: () => sweep.sweep(),
      });

      expect(failureOf('the sweep tick', tick)).to.deep.equal([]);
      expect(tick.status === 'fulfilled' ? [tick.value.flushed, tick.value.orphaned] : null).to.deep.equal([3, 0]);
      expect(retriesLogged(log)).to.deep.equal([['40P01', 'the heartbeat flush']]);
      expect(sweepLog.messages().filter((m) => /server is away|sweep failed/.test(m))).to.deep.equal([]);
      expect(reports).to.deep.equal([]);
      const stamps = await q<{ last_heartbeat_at: Date }>(`SELECT last_heartbeat_at FROM attempts WHERE id = ANY($1) ORDER BY id`, [[lo, mid, hi]]);
      expect(stamps.map((r) => r.last_heartbeat_at.toISOString())).to.deep.equal([at(1), at(2), at(3)].map((d) => d.toISOString()));
    });

    it("a probe shard's UPDATE: the shard's results are written, not lost", async () => {
      const node = new ReadyServer('ok');
      const base = await node.listen();
      closers.push(() => node.close());
      const [lo, mid, hi] = orderedIds(3) as [string, string, string];
      await deployments([lo, mid, hi], 'node_port', `${base}/`);
      const log = new Capture();
      // one probe lane: the probes finish in the shard's order (lo, mid, hi), which is id order here
      const { sweep } = sweeper(stampBuffer(), { probeConcurrency: 1, logger: createLogger('debug', log) });

      const shard = await productLosesADeadlock({
        gate: { table: 'deployments', ids: [mid] },
        held: { table: 'deployments', ids: [hi] },
        wanted: { table: 'deployments', ids: [lo] },
        fragment: 'SET last_probed_at = GREATEST',
        product: () => sweep.runShard({ tick: '1', shard: 0, at: at(10).toISOString(), deadline: at(20).getTime(), ids: [lo, mid, hi] }),
      });

      expect(failureOf('the probe shard', shard)).to.deep.equal([]);
      expect(shard.status === 'fulfilled' ? [shard.value.probed, shard.value.stamped] : null).to.deep.equal([3, 3]);
      expect(retriesLogged(log)).to.deep.equal([['40P01', "the probe shard's stamp"]]);
      const stamps = await q<{ last_ready_at: Date | null }>(`SELECT last_ready_at FROM deployments WHERE id = ANY($1) ORDER BY id`, [[lo, mid, hi]]);
      expect(stamps.map((r) => r.last_ready_at?.toISOString())).to.deep.equal([at(10), at(10), at(10)].map((d) => d.toISOString()));
    });

    it('the one-event write (deployment, then attempt): the event applies', async () => {
      const log = new Capture();
      const service = new TransitionService({ dataSource: db.dataSource, now: () => at(5), logger: createLogger('debug', log) });
      const ids = await runningAttempt(service);
      const result = await productLosesADeadlock({
        // the write waits at its deployment, then asks for the attempt the holder has
        gate: { table: 'deployments', ids: [ids.deploymentId] },
        held: { table: 'attempts', ids: [ids.attemptId] },
        wanted: { table: 'deployments', ids: [ids.deploymentId] },
        fragment: 'upd AS (', // near the start: pg_stat_activity keeps the first 1 kB of a text
        product: () => service.apply('attempt.end', { ...ids, outcome: 'succeeded', eventId: `end.${randomUUID()}` }),
      });
      expect(failureOf('attempt.end', result)).to.deep.equal([]);
      expect(result.status === 'fulfilled' && result.value.outcome === 'applied' ? result.value.to : null).to.equal('ready');
      expect(retriesLogged(log)).to.deep.equal([['40P01', 'the one-event write']]);
    });

    it('the group-commit write (its attempts): every event of the batch applies', async () => {
      const log = new Capture();
      const service = new TransitionService({ dataSource: db.dataSource, now: () => at(5), logger: createLogger('debug', log) });
      const running = [await runningAttempt(service), await runningAttempt(service), await runningAttempt(service)].sort((x, y) =>
        x.attemptId < y.attemptId ? -1 : 1,
      );
      const [lo, mid, hi] = running as [(typeof running)[0], (typeof running)[0], (typeof running)[0]];
      const results = await productLosesADeadlock({
        gate: { table: 'attempts', ids: [mid.attemptId] },
        held: { table: 'attempts', ids: [hi.attemptId] },
        wanted: { table: 'attempts', ids: [lo.attemptId] },
        fragment: 'upd AS (', // near the start: pg_stat_activity keeps the first 1 kB of a text
        product: () =>
          service.applyMany(running.map((ids) => ({ name: 'attempt.end', data: { ...ids, outcome: 'succeeded', eventId: `end.${randomUUID()}` } }))),
      });
      expect(failureOf('applyMany', results)).to.deep.equal([]);
      const outcomes =
        results.status === 'fulfilled' ? results.value.map((r) => (r.status === 'fulfilled' ? r.value.outcome : String(r.reason))) : [];
      expect(outcomes).to.deep.equal(['applied', 'applied', 'applied']);
      expect(retriesLogged(log)).to.deep.equal([['40P01', 'the group-commit write, one event at a time']]);
    });

    it('a tick whose flush lost a deadlock on every try is logged as a lock conflict, not as a server away', async () => {
      // a real 40P01 from PostgreSQL: two sessions of the test's own, each holding what the other asks for
      const [lo, hi] = orderedIds(2) as [string, string];
      await deployments([lo, hi], 'cluster_dns');
      // (the one that waits first has the long deadlock_timeout, so the other's check finds the cycle)
      const [one, two] = [await connect(), await connect({ deadlock_timeout: `'10min'` })];
      await hold(one, { table: 'deployments', ids: [lo] });
      await hold(two, { table: 'deployments', ids: [hi] });
      const waits = settle(lockRows(two, { table: 'deployments', ids: [lo] }));
      await blocked('the second session', two.pid);
      const deadlock = await settle(lockRows(one, { table: 'deployments', ids: [hi] }));
      await one.client.query('ROLLBACK');
      expect(failureOf('the second session', await waits)).to.deep.equal([]);
      await two.client.query('COMMIT');
      expect(deadlock.status === 'rejected' ? (deadlock.reason as { code?: unknown }).code : null).to.equal('40P01');

      const { sweep, log, reports } = sweeper(stampBuffer(), {
        flushStamps: () => Promise.reject((deadlock as PromiseRejectedResult).reason as Error),
      });
      const tick = await settle(sweep.sweep());
      expect(tick.status).to.equal('rejected');
      expect(
        log
          .records()
          .filter((r) => r.level === 40 || r.level === 50)
          .map((r) => [r.msg, r.code]),
      ).to.deep.equal([['sweep failed: a lock conflict (deadlock) lost on every try; the next tick tries again', '40P01']]);
      expect(reports).to.deep.equal([]);
    });
  });
});
