import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { ConflictError, NotYetError, ValidationError } from '../../src/errors';
import { payloadDigest } from '../../src/events/schemas';
import { TransitionService, type ApplyResult } from '../../src/services/transitions';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { barrier } from '../helpers/wait';

describe('transition service (PostgreSQL)', () => {
  let db: TestDatabase;
  let clock: Date;
  let service: TransitionService;

  before(async () => {
    db = await openTestDatabase(24);
  });
  after(async () => {
    await db?.close();
  });
  beforeEach(() => {
    clock = new Date('2026-11-23T12:00:00.000Z');
    service = new TransitionService({ dataSource: db.dataSource, now: () => clock });
  });

  const q = <T>(sql: string, params: unknown[] = []): Promise<T[]> => db.dataSource.query<T[]>(sql, params);

  async function counts(deploymentId: string) {
    const [row] = await q<{ t: string; o: string; p: string; a: string; v: number | null }>(
      `SELECT (SELECT count(*) FROM state_transitions WHERE deployment_id = $1) AS t,
              (SELECT count(*) FROM outbox WHERE deployment_id = $1) AS o,
              (SELECT count(*) FROM processed_events WHERE deployment_id = $1) AS p,
              (SELECT count(*) FROM attempts WHERE deployment_id = $1) AS a,
              (SELECT version FROM deployments WHERE id = $1) AS v`,
      [deploymentId],
    );
    return { transitions: Number(row?.t), outbox: Number(row?.o), processed: Number(row?.p), attempts: Number(row?.a), version: row?.v ?? null };
  }

  async function created(): Promise<string> {
    const id = randomUUID();
    await service.apply('deployment.create', { deploymentId: id, name: 'web' }, { fallbackEventId: `c-${id}` });
    return id;
  }

  it('applies a full lifecycle: create -> attempt.create -> start -> end ok is ready at version 4', async () => {
    const deploymentId = randomUUID();
    const attemptId = randomUUID();
    const endpoint = { url: 'http://127.0.0.1:30080', kind: 'node_port' };
    const results: ApplyResult[] = [];
    results.push(await service.apply('deployment.create', { deploymentId, name: 'web', eventId: 'e1' }));
    results.push(await service.apply('attempt.create', { deploymentId, attemptId, eventId: 'e2' }));
    clock = new Date('2026-11-23T12:00:10.000Z');
    results.push(await service.apply('attempt.start', { deploymentId, attemptId, eventId: 'e3' }));
    clock = new Date('2026-11-23T12:01:00.000Z');
    results.push(await service.apply('attempt.end', { deploymentId, attemptId, outcome: 'succeeded', endpoint, eventId: 'e4' }));

    expect(results.map((r) => (r.outcome === 'applied' ? `${r.from ?? ''}>${r.to}@${r.version}` : r.outcome))).to.deep.equal([
      '>pending@1',
      'pending>pending@2',
      'pending>deploying@3',
      'deploying>ready@4',
    ]);
    const [d] = await q<Record<string, unknown>>(`SELECT * FROM deployments WHERE id = $1`, [deploymentId]);
    expect(d).to.deep.include({
      state: 'ready',
      version: 4,
      current_attempt_id: attemptId,
      endpoint_url: `${endpoint.url}/`, // stored as WHATWG URL normalises it
      endpoint_kind: 'node_port',
    });
    expect((d?.last_ready_at as Date).toISOString()).to.equal('2026-11-23T12:01:00.000Z');
    const [a] = await q<Record<string, unknown>>(`SELECT * FROM attempts WHERE id = $1`, [attemptId]);
    expect(a).to.deep.include({ status: 'succeeded', number: 1 });
    expect((a?.started_at as Date).toISOString()).to.equal('2026-11-23T12:00:10.000Z');

    const history = await q<{ from_state: string | null; to_state: string; version: number; reason: string; event_id: string }>(
      `SELECT from_state, to_state, version, reason, event_id FROM state_transitions WHERE deployment_id = $1 ORDER BY version`,
      [deploymentId],
    );
    expect(history.map((h) => [h.from_state, h.to_state, h.version, h.reason, h.event_id])).to.deep.equal([
      [null, 'pending', 1, 'created', 'e1'],
      ['pending', 'pending', 2, 'attempt_created', 'e2'],
      ['pending', 'deploying', 3, 'attempt_started', 'e3'],
      ['deploying', 'ready', 4, 'attempt_succeeded', 'e4'],
    ]);
    const outbox = await q<{ version: number; fields: Record<string, string> }>(
      `SELECT version, fields FROM outbox WHERE deployment_id = $1 ORDER BY id`,
      [deploymentId],
    );
    expect(outbox.map((o) => o.version)).to.deep.equal([1, 2, 3, 4]);
    const last = outbox[3]?.fields;
    expect(last).to.deep.include({
      type: 'state_transition',
      deploymentId,
      attemptId,
      from: 'deploying',
      to: 'ready',
      version: '4',
      reason: 'attempt_succeeded',
      eventId: 'e4',
      at: '2026-11-23T12:01:00.000Z',
    });
    expect(last?.transitionId).to.match(/^\d+$/);
    expect(outbox[0]?.fields).to.deep.include({ from: '', attemptId: '' });
  });

  /** An attempt's row, the history row of `eventId` and its outbox entry, as PostgreSQL holds them. */
  async function rowsOf(attemptId: string, eventId: string) {
    const [attempt] = await q<{ status: string; reason: string | null; ended_at: Date | null }>(
      `SELECT status, reason, ended_at FROM attempts WHERE id = $1`,
      [attemptId],
    );
    const [history] = await q<{ id: string; attempt_id: string | null; reason: string; actor: string }>(
      `SELECT id::text AS id, attempt_id, reason, actor FROM state_transitions WHERE event_id = $1`,
      [eventId],
    );
    const entries = await q<{ fields: Record<string, string> }>(`SELECT fields FROM outbox WHERE fields->>'eventId' = $1`, [eventId]);
    return {
      attempt:
        attempt === undefined ? undefined : { status: attempt.status, reason: attempt.reason, endedAt: attempt.ended_at?.toISOString() ?? null },
      history,
      entries: entries.map((e) => e.fields),
    };
  }

  it("writes a lone attempt.end's, attempt.cancel's and supersede's rows as decided: the attempt's status, end and reason, the history row's actor, the whole entry", async () => {
    // the property test in group-commit.test.ts compares batches with this same path, so a bug in the shared write
    // cancels out there; these are the rows themselves
    const deploymentId = await created();
    const [first, second, third] = [randomUUID(), randomUUID(), randomUUID()];
    const entry = (eventId: string, transitionId: string | undefined, fields: Record<string, string>) => ({
      type: 'state_transition',
      transitionId,
      deploymentId,
      eventId,
      at: clock.toISOString(),
      ...fields,
    });
    await service.apply('attempt.create', { deploymentId, attemptId: first, eventId: 'rows-c1', actor: 'ci' });

    clock = new Date('2026-11-23T12:00:05.000Z');
    await service.apply('attempt.create', { deploymentId, attemptId: second, eventId: 'rows-c2', actor: 'deployer' });
    const superseded = await rowsOf(first, 'rows-c2');
    expect(superseded.attempt, 'the superseded attempt').to.deep.equal({ status: 'superseded', reason: 'superseded', endedAt: clock.toISOString() });
    expect(superseded.history).to.deep.include({ attempt_id: second, reason: 'attempt_created', actor: 'deployer' });
    expect(superseded.entries).to.deep.equal([
      entry('rows-c2', superseded.history?.id, {
        attemptId: second,
        from: 'pending',
        to: 'pending',
        version: '3',
        reason: 'attempt_created',
        actor: 'deployer',
      }),
    ]);
    expect((await rowsOf(second, 'rows-c2')).attempt, 'the new attempt').to.deep.equal({ status: 'pending', reason: null, endedAt: null });

    await service.apply('attempt.start', { deploymentId, attemptId: second, eventId: 'rows-s2' });
    clock = new Date('2026-11-23T12:00:30.000Z');
    const end = { deploymentId, attemptId: second, outcome: 'failed', reason: 'image pull failed', eventId: 'rows-e2', actor: 'runner-7' };
    expect(await service.apply('attempt.end', end)).to.deep.include({ outcome: 'applied', to: 'failed' });
    const ended = await rowsOf(second, 'rows-e2');
    expect(ended.attempt, 'the ended attempt').to.deep.equal({ status: 'failed', reason: 'image pull failed', endedAt: clock.toISOString() });
    expect(ended.history).to.deep.include({ attempt_id: second, reason: 'attempt_failed', actor: 'runner-7' });
    expect(ended.entries).to.deep.equal([
      entry('rows-e2', ended.history?.id, {
        attemptId: second,
        from: 'deploying',
        to: 'failed',
        version: '5',
        reason: 'attempt_failed',
        actor: 'runner-7',
      }),
    ]);

    await service.apply('attempt.create', { deploymentId, attemptId: third, eventId: 'rows-c3' });
    clock = new Date('2026-11-23T12:01:00.000Z');
    expect(
      await service.apply('attempt.cancel', { deploymentId, attemptId: third, reason: 'operator', eventId: 'rows-x3', actor: 'oncall' }),
    ).to.deep.include({
      outcome: 'applied',
      to: 'failed',
    });
    const cancelled = await rowsOf(third, 'rows-x3');
    expect(cancelled.attempt, 'the cancelled attempt').to.deep.equal({ status: 'cancelled', reason: 'operator', endedAt: clock.toISOString() });
    expect(cancelled.history).to.deep.include({ attempt_id: third, reason: 'cancelled', actor: 'oncall' });
    expect(cancelled.entries).to.deep.equal([
      entry('rows-x3', cancelled.history?.id, {
        attemptId: third,
        from: 'pending',
        to: 'failed',
        version: '7',
        reason: 'cancelled',
        actor: 'oncall',
      }),
    ]);
  });

  it('records noops without transitions, and rejections without writing anything', async () => {
    const deploymentId = await created();
    const attemptId = randomUUID();
    await service.apply('attempt.create', { deploymentId, attemptId, eventId: `ac-${attemptId}` });
    await service.apply('attempt.start', { deploymentId, attemptId, eventId: `as-${attemptId}` });
    const before = await counts(deploymentId);

    const noop = await service.apply('attempt.start', { deploymentId, attemptId, eventId: 'dup-start' });
    expect(noop).to.deep.include({ outcome: 'noop', reason: 'duplicate' });
    const rejected = await service.apply('deployment.teardown', { deploymentId, eventId: 'td' });
    expect(rejected).to.deep.include({ outcome: 'rejected', code: 'attempt_in_progress' });

    const after = await counts(deploymentId);
    expect(after).to.deep.equal({ ...before, processed: before.processed + 1 });
  });

  it('makes the same eventId applied twice a recorded noop: one transition, one outbox row', async () => {
    const deploymentId = await created();
    const attemptId = randomUUID();
    const first = await service.apply('attempt.create', { deploymentId, attemptId, eventId: 'same' });
    const second = await service.apply('attempt.create', { deploymentId, attemptId, eventId: 'same' });
    expect(first.outcome).to.equal('applied');
    expect(second).to.deep.include({ outcome: 'noop', reason: 'duplicate_event' });
    expect(second.outcome === 'noop' && second.previous).to.deep.equal({ outcome: 'applied', reason: 'attempt_created', version: 2 });
    expect(await counts(deploymentId)).to.deep.include({ transitions: 2, outbox: 2, version: 2 });
  });

  it('takes a retry of an event processed before endpoint URLs were normalised as the duplicate it is, one at a time and in a batch; another URL under its id is still a conflict', async () => {
    const sent = (deploymentId: string, url = 'http://10.0.0.1:30000') => ({ deploymentId, name: 'web', endpoint: { url, kind: 'node_port' } });
    const ids = [randomUUID(), randomUUID(), randomUUID()];
    for (const id of ids) {
      expect(await service.apply('deployment.create', { ...sent(id), eventId: `old-${id}` })).to.deep.include({ outcome: 'applied' });
      // the row as a worker wrote it before issue 28: the digest of the URL as sent (WHATWG URL adds the "/")
      const [row] = await q<{ payload_sha256: string }>(`SELECT payload_sha256 FROM processed_events WHERE event_id = $1`, [`old-${id}`]);
      expect(row?.payload_sha256).to.not.equal(payloadDigest(sent(id)));
      await q(`UPDATE processed_events SET payload_sha256 = $2 WHERE event_id = $1`, [`old-${id}`, payloadDigest(sent(id))]);
    }
    const [one, two, three] = ids as [string, string, string];
    const outcomes = (settled: Array<PromiseSettledResult<ApplyResult>>): unknown[] =>
      settled.map((r): unknown => (r.status === 'fulfilled' ? r.value : r.reason));
    expect(await service.apply('deployment.create', { ...sent(one), eventId: `old-${one}` })).to.deep.include({
      outcome: 'noop',
      reason: 'duplicate_event',
    });
    for (const result of outcomes(
      await service.applyMany([two, three].map((id) => ({ name: 'deployment.create', data: { ...sent(id), eventId: `old-${id}` } }))),
    )) {
      expect(result).to.deep.include({ outcome: 'noop', reason: 'duplicate_event' });
    }
    const other = (id: string) => ({ ...sent(id, 'http://10.0.0.2:30000'), eventId: `old-${id}` });
    expect(await service.apply('deployment.create', other(one))).to.deep.include({ outcome: 'rejected', code: 'event_id_conflict' });
    for (const result of outcomes(await service.applyMany([two, three].map((id) => ({ name: 'deployment.create', data: other(id) }))))) {
      expect(result).to.deep.include({ outcome: 'rejected', code: 'event_id_conflict' });
    }
    for (const id of ids) expect(await counts(id)).to.deep.include({ transitions: 1, processed: 1, version: 1 });
  });

  it('applies the same eventId delivered 8 times concurrently exactly once', async () => {
    const deploymentId = await created();
    const attemptId = randomUUID();
    await service.apply('attempt.create', { deploymentId, attemptId, eventId: `ac-${attemptId}` });
    const results = await Promise.all(
      Array.from({ length: 8 }, () => service.apply('attempt.start', { deploymentId, attemptId, eventId: 'start-once' })),
    );
    expect(results.filter((r) => r.outcome === 'applied')).to.have.length(1);
    expect(results.filter((r) => r.outcome === 'noop' && r.reason === 'duplicate_event')).to.have.length(7);
    expect(await counts(deploymentId)).to.deep.include({ transitions: 3, outbox: 3, processed: 3, version: 3 });
  });

  it('two deliveries of one noop racing to its claim: one claims it, the other is duplicate_event with what the first did', async () => {
    const deploymentId = await created();
    const attemptId = randomUUID();
    await service.apply('attempt.create', { deploymentId, attemptId, eventId: `ac-${attemptId}` });
    await service.apply('attempt.start', { deploymentId, attemptId, eventId: `as-${attemptId}` });
    // two workers each run a delivery of one event (a stalled job handed out again); both have read and decided
    // (a noop: the attempt already runs) before either claims the eventId
    const bothDecided = barrier(2);
    const worker = () => new TransitionService({ dataSource: db.dataSource, now: () => clock, hooks: { beforeClaim: bothDecided } });
    const event = { deploymentId, attemptId, eventId: 'start-again' };
    const results = await Promise.all([worker().apply('attempt.start', event), worker().apply('attempt.start', event)]);
    const won = results.filter((r) => r.outcome === 'noop' && r.reason === 'duplicate');
    const lost = results.filter((r) => r.outcome === 'noop' && r.reason === 'duplicate_event');
    expect([won.length, lost.length], JSON.stringify(results)).to.deep.equal([1, 1]);
    expect(lost[0], 'the losing delivery says what the first did').to.deep.include({
      previous: { outcome: 'noop', reason: 'duplicate', version: 3 },
    });
    expect(await counts(deploymentId)).to.deep.include({ transitions: 3, processed: 4, version: 3 });
  });

  it('loses no update under 16 concurrent appliers with conflicting events', async () => {
    const deploymentId = await created();
    const appliers = 16;
    const rounds = 6;
    const results = (
      await Promise.all(
        Array.from({ length: appliers }, async (_, worker) => {
          const mine: ApplyResult[] = [];
          for (let round = 0; round < rounds; round++) {
            const attemptId = randomUUID();
            // Each create supersedes or races another applier's; each cancel hits a current or a stale attempt.
            mine.push(await service.apply('attempt.create', { deploymentId, attemptId, eventId: `w${worker}-r${round}-c` }));
            mine.push(await service.apply('attempt.cancel', { deploymentId, attemptId, eventId: `w${worker}-r${round}-x` }));
          }
          return mine;
        }),
      )
    ).flat();

    const applied = results.filter((r) => r.outcome === 'applied');
    const noops = results.filter((r) => r.outcome === 'noop');
    expect(results.filter((r) => r.outcome === 'rejected')).to.have.length(0);
    expect(applied.length).to.be.greaterThan(appliers); // contention really happened and writes really landed
    const c = await counts(deploymentId);
    // +1 for the deployment.create
    expect(c.version).to.equal(applied.length + 1);
    expect(c.transitions).to.equal(applied.length + 1);
    expect(c.outbox).to.equal(applied.length + 1);
    expect(c.processed).to.equal(applied.length + noops.length + 1);
    expect(c.attempts).to.equal(appliers * rounds);

    const versions = (
      await q<{ version: number }>(`SELECT version FROM state_transitions WHERE deployment_id = $1 ORDER BY version`, [deploymentId])
    ).map((r) => r.version);
    expect(versions).to.deep.equal(Array.from({ length: c.transitions }, (_, i) => i + 1));
    const outboxVersions = (await q<{ version: number }>(`SELECT version FROM outbox WHERE deployment_id = $1 ORDER BY id`, [deploymentId])).map(
      (r) => r.version,
    );
    expect(outboxVersions).to.deep.equal(versions); // id order is version order
    // every attempt is current-and-cancelled, superseded, or stale-cancelled; never two current
    const [current] = await q<{ n: string }>(`SELECT count(*) AS n FROM attempts WHERE deployment_id = $1 AND status IN ('pending', 'running')`, [
      deploymentId,
    ]);
    expect(Number(current?.n)).to.be.at.most(1);
  });

  it('retries a lost version check, and gives up with ConflictError when it keeps losing, writing nothing', async () => {
    const deploymentId = await created();
    const bumpUnderneath = async () => {
      // a competing writer commits between our read and our version-checked UPDATE
      await db.dataSource.query(`UPDATE deployments SET version = version + 1 WHERE id = $1`, [deploymentId]);
    };
    let tries = 0;
    // The first, optimistic try loses; the retry holds the row lock, so nobody can bump underneath it any more.
    const losesOnce = new TransitionService({
      dataSource: db.dataSource,
      now: () => clock,
      hooks: { beforeUpdate: async () => (tries++ === 0 ? bumpUnderneath() : undefined) },
    });
    const won = await losesOnce.apply('attempt.create', { deploymentId, attemptId: randomUUID(), eventId: 'contended-1' });
    expect(tries).to.equal(2);
    expect(won).to.deep.include({ outcome: 'applied', version: 3 }); // 1 + the competing bump + ours

    const alwaysLoses = new TransitionService({
      dataSource: db.dataSource,
      now: () => clock,
      maxConflictRetries: 1,
      hooks: { beforeUpdate: bumpUnderneath },
    });
    const err = await alwaysLoses.apply('attempt.create', { deploymentId, attemptId: randomUUID(), eventId: 'contended-2' }).catch((e: unknown) => e);
    expect(err).to.be.instanceOf(ConflictError);
    expect(err).to.deep.include({ code: 'version_conflict', tries: 1 });
    expect(await q(`SELECT 1 FROM processed_events WHERE event_id = 'contended-2'`)).to.have.length(0);
    expect(await counts(deploymentId)).to.deep.include({ transitions: 2, outbox: 2 });
  });

  it('writes nothing at all when the last part of the one write statement fails (the outbox row)', async () => {
    // The production path, unmodified: a trigger makes the outbox insert, the statement's last CTE, fail.
    const deploymentId = await created();
    const attemptId = randomUUID();
    const before = await counts(deploymentId);
    await q(`CREATE FUNCTION fail_boom() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN IF NEW.fields->>'eventId' = 'boom' THEN RAISE EXCEPTION 'injected at the outbox insert'; END IF; RETURN NEW; END $$`);
    await q(`CREATE TRIGGER fail_boom BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION fail_boom()`);
    const written: boolean[] = [];
    const observed = new TransitionService({ dataSource: db.dataSource, now: () => clock, hooks: { afterWrite: (_e, w) => void written.push(w) } });
    try {
      const err = await observed.apply('attempt.create', { deploymentId, attemptId, eventId: 'boom' }).catch((e: unknown) => e);
      expect((err as Error).message).to.equal('injected at the outbox insert');
      expect(written).to.deep.equal([]); // the statement itself failed
      expect(await counts(deploymentId)).to.deep.equal(before);
      expect(await q(`SELECT 1 FROM processed_events WHERE event_id = 'boom'`)).to.have.length(0);
      expect(await q(`SELECT 1 FROM attempts WHERE id = $1`, [attemptId])).to.have.length(0);
    } finally {
      await q(`DROP TRIGGER fail_boom ON outbox`);
      await q(`DROP FUNCTION fail_boom()`);
    }
    // the same event applies cleanly afterwards, and the hook saw its write
    expect((await observed.apply('attempt.create', { deploymentId, attemptId, eventId: 'boom' })).outcome).to.equal('applied');
    expect(written).to.deep.equal([true]);
  });

  describe('bad input is rejected with a named code and writes nothing', () => {
    const cases: Array<[string, string, unknown, string, string]> = [
      ['an unknown event name', 'deployment.explode', { deploymentId: randomUUID() }, 'unknown_event', 'name'],
      ['a malformed deployment id', 'deployment.create', { deploymentId: 'not-a-uuid', name: 'web' }, 'invalid_payload', 'deploymentId'],
      ['a malformed attempt id', 'attempt.start', { deploymentId: randomUUID(), attemptId: '42' }, 'invalid_payload', 'attemptId'],
      ['a bad name', 'deployment.create', { deploymentId: randomUUID(), name: 'Web_1' }, 'invalid_payload', 'name'],
      ['an unknown field', 'deployment.teardown', { deploymentId: randomUUID(), forced: true }, 'invalid_payload', '(root)'],
      ['a wrong type', 'deployment.teardown', { deploymentId: randomUUID(), force: 'yes' }, 'invalid_payload', 'force'],
      ['a bad eventId', 'deployment.teardown', { deploymentId: randomUUID(), eventId: 'a:b' }, 'invalid_payload', 'eventId'],
      ['a missing field', 'attempt.end', { deploymentId: randomUUID(), attemptId: randomUUID() }, 'invalid_payload', 'outcome'],
      ['a non-object payload', 'attempt.start', 'hello', 'invalid_payload', '(root)'],
      [
        'an oversized payload',
        'attempt.end',
        { deploymentId: randomUUID(), attemptId: randomUUID(), outcome: 'failed', reason: 'x'.repeat(17 * 1024) },
        'invalid_payload',
        '(root)',
      ],
    ];
    for (const [label, name, data, code, field] of cases) {
      it(label, async () => {
        const [before] = await q<Record<string, string>>(
          `SELECT (SELECT count(*) FROM deployments) d, (SELECT count(*) FROM processed_events) p, (SELECT count(*) FROM outbox) o`,
        );
        const err = await service.apply(name, data, { fallbackEventId: 'bad-input' }).catch((e: unknown) => e);
        expect(err).to.be.instanceOf(ValidationError);
        const v = err as ValidationError;
        expect(v.code).to.equal(code);
        expect(v.issues.map((i) => i.field)).to.include(field);
        expect(v.message).to.contain(field);
        const [after] = await q<Record<string, string>>(
          `SELECT (SELECT count(*) FROM deployments) d, (SELECT count(*) FROM processed_events) p, (SELECT count(*) FROM outbox) o`,
        );
        expect(after).to.deep.equal(before);
      });
    }

    it('an event with no eventId anywhere', async () => {
      const err = await service.apply('deployment.create', { deploymentId: randomUUID(), name: 'web' }).catch((e: unknown) => e);
      expect(err).to.be.instanceOf(ValidationError);
      expect((err as ValidationError).issues[0]?.field).to.equal('eventId');
    });

    it('an attempt id that belongs to another deployment is rejected id_conflict', async () => {
      const one = await created();
      const other = await created();
      const attemptId = randomUUID();
      await service.apply('attempt.create', { deploymentId: one, attemptId, eventId: `x-${attemptId}` });
      const result = await service.apply('attempt.create', { deploymentId: other, attemptId, eventId: `y-${attemptId}` });
      expect(result).to.deep.include({ outcome: 'rejected', code: 'id_conflict' });
      expect(await counts(other)).to.deep.include({ version: 1, attempts: 0 });
    });
  });

  it('defers events for a deployment or attempt that does not exist yet', async () => {
    const missing = await service
      .apply('attempt.start', { deploymentId: randomUUID(), attemptId: randomUUID(), eventId: 'early' })
      .catch((e: unknown) => e);
    expect(missing).to.be.instanceOf(NotYetError);
    expect((missing as NotYetError).code).to.equal('deployment_not_found');

    const deploymentId = await created();
    const noAttempt = await service
      .apply('attempt.end', { deploymentId, attemptId: randomUUID(), outcome: 'succeeded', eventId: 'early2' })
      .catch((e: unknown) => e);
    expect((noAttempt as NotYetError).code).to.equal('attempt_not_found');
    expect(await q(`SELECT 1 FROM processed_events WHERE event_id IN ('early', 'early2')`)).to.have.length(0);
  });

  it('treats an event for an older attempt as the stale_attempt noop', async () => {
    const deploymentId = await created();
    const [a1, a2] = [randomUUID(), randomUUID()];
    await service.apply('attempt.create', { deploymentId, attemptId: a1, eventId: 'a1' });
    await service.apply('attempt.create', { deploymentId, attemptId: a2, eventId: 'a2' });
    const [old] = await q<{ status: string; number: number }>(`SELECT status, number FROM attempts WHERE id = $1`, [a1]);
    expect(old).to.deep.equal({ status: 'superseded', number: 1 });
    expect(await service.apply('attempt.start', { deploymentId, attemptId: a1, eventId: 'a1s' })).to.deep.include({
      outcome: 'noop',
      reason: 'stale_attempt',
    });
  });

  it('stamps heartbeats and readiness without bumping the version, never backwards', async () => {
    const deploymentId = await created();
    const attemptId = randomUUID();
    await service.apply('attempt.create', { deploymentId, attemptId, eventId: `hc-${attemptId}` });
    const notRunning = await service.apply('attempt.heartbeat', { deploymentId, attemptId, eventId: 'hb0' });
    expect(notRunning).to.deep.include({ outcome: 'noop', reason: 'not_running' });
    await service.apply('attempt.start', { deploymentId, attemptId, eventId: `hs-${attemptId}` });
    const { version } = await counts(deploymentId);

    clock = new Date('2026-11-23T12:05:00.000Z');
    // the stamp is the service's clock when it is processed, not the job's timestamp (the producer's clock, here
    // two minutes behind)
    const hb = await service.apply(
      'attempt.heartbeat',
      { deploymentId, attemptId, eventId: 'hb1' },
      { producedAt: new Date('2026-11-23T12:03:00.000Z') },
    );
    expect(hb).to.deep.include({ outcome: 'noop', reason: 'stamped' });
    // a heartbeat processed by a worker whose clock reads earlier does not move the stamp back
    clock = new Date('2026-11-23T12:04:59.000Z');
    await service.apply('attempt.heartbeat', { deploymentId, attemptId, eventId: 'hb2' });
    const [a] = await q<{ last_heartbeat_at: Date }>(`SELECT last_heartbeat_at FROM attempts WHERE id = $1`, [attemptId]);
    expect(a?.last_heartbeat_at.toISOString()).to.equal('2026-11-23T12:05:00.000Z');

    expect(await service.apply('deployment.readiness', { deploymentId, eventId: 'r0' })).to.deep.include({ reason: 'not_ready' });
    await service.apply('attempt.end', { deploymentId, attemptId, outcome: 'succeeded', eventId: `he-${attemptId}` });
    clock = new Date('2026-11-23T12:10:00.000Z');
    // an observation from the future is clamped to now
    const r = await service.apply('deployment.readiness', { deploymentId, eventId: 'r1', observedAt: '2030-01-01T00:00:00Z' });
    expect(r).to.deep.include({ outcome: 'noop', reason: 'stamped' });
    const [d] = await q<{ last_ready_at: Date; version: number }>(`SELECT last_ready_at, version FROM deployments WHERE id = $1`, [deploymentId]);
    expect(d?.last_ready_at.toISOString()).to.equal('2026-11-23T12:10:00.000Z');
    expect(d?.version).to.equal((version ?? 0) + 1); // the end only

    const unknown = await service.apply('attempt.heartbeat', { deploymentId: randomUUID(), attemptId, eventId: 'hb3' }).catch((e: unknown) => e);
    expect((unknown as NotYetError).code).to.equal('deployment_not_found');
  });
});
