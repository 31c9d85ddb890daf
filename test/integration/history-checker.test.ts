import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { checkHistory, type HistoryCheckOptions, type SentEvent } from '../../chaos/history-checker';
import { TransitionService } from '../../src/services/transitions';
import { parseEntry } from '../../src/streams/consumer';
import { partitionKey, partitionOf, recordPartitions } from '../../src/streams/partitions';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';

interface Lifecycle {
  readonly deploymentId: string;
  readonly attempts: readonly [string, string];
  /** eventId -> what was sent */
  readonly sent: Map<string, SentEvent>;
}

describe('history checker', function () {
  this.timeout(30_000);
  let db: TestDatabase;
  let service: TransitionService;
  let redis: IORedis;
  let prefix: string;
  let streamKey: string;

  before(async () => {
    db = await openTestDatabase(8);
    service = new TransitionService({ dataSource: db.dataSource });
    redis = testRedis();
  });
  after(async () => {
    redis.disconnect();
    await db?.close();
  });
  beforeEach(() => {
    prefix = uniquePrefix();
    streamKey = `${prefix}:transitions`;
  });
  afterEach(async () => {
    await dropPrefix(prefix);
  });

  const q = <T = unknown>(sql: string, params: unknown[] = []): Promise<T[]> => db.dataSource.query<T[]>(sql, params);

  /**
   * A deployment through two attempts, with noops on the way: created; attempt A succeeds (its start arrives after
   * its end, and is a noop); a duplicate create (noop); attempt B starts and fails; a late success of B (noop).
   * Ends `failed` at version 6.
   */
  async function lifecycle(): Promise<Lifecycle> {
    const deploymentId = randomUUID();
    const a = randomUUID();
    const b = randomUUID();
    const sent = new Map<string, SentEvent>();
    const steps: Array<[string, Record<string, unknown>, string]> = [
      ['deployment.create', { name: 'web' }, 'applied'],
      ['attempt.create', { attemptId: a }, 'applied'],
      ['attempt.end', { attemptId: a, outcome: 'succeeded' }, 'applied'],
      ['attempt.start', { attemptId: a }, 'noop'],
      ['deployment.create', { name: 'web' }, 'noop'],
      ['attempt.create', { attemptId: b }, 'applied'],
      ['attempt.start', { attemptId: b }, 'applied'],
      ['attempt.end', { attemptId: b, outcome: 'failed' }, 'applied'],
      ['attempt.end', { attemptId: b, outcome: 'succeeded' }, 'noop'],
    ];
    for (const [name, rest, expected] of steps) {
      const eventId = randomUUID();
      const data = { deploymentId, ...rest };
      const result = await service.apply(name, data, { fallbackEventId: eventId });
      expect(result.outcome, `${name}`).to.equal(expected);
      sent.set(eventId, { name, data });
    }
    return { deploymentId, attempts: [a, b], sent };
  }

  /** What the relay does: every outbox row of these deployments onto the stream, in id order. */
  async function publish(deploymentIds: readonly string[]): Promise<void> {
    const rows = await q<{ fields: Record<string, string> }>(`SELECT fields FROM outbox WHERE deployment_id = ANY($1) ORDER BY id`, [deploymentIds]);
    for (const row of rows) await redis.xadd(streamKey, '*', ...Object.entries(row.fields).flat());
  }

  const check = (ids: readonly string[], extra: Partial<HistoryCheckOptions> = {}) =>
    checkHistory({ dataSource: db.dataSource, stream: { redis, key: streamKey }, deploymentIds: ids, ...extra });

  async function streamEntry(deploymentId: string, version: number): Promise<[string, string[]]> {
    const all = (await redis.xrange(streamKey, '-', '+')) as Array<[string, string[]]>;
    const found = all.find(([, f]) => f.includes(deploymentId) && f[f.indexOf('version') + 1] === String(version));
    if (found === undefined) throw new Error(`no stream entry for ${deploymentId} v${version}`);
    return found;
  }

  it('passes good histories: counts transitions, claims, noops and stream repeats', async () => {
    const runs = [await lifecycle(), await lifecycle(), await lifecycle()];
    const ids = runs.map((r) => r.deploymentId);
    await publish(ids);
    // at-least-once: a relay that crashed between XADD and the mark publishes a stretch again
    await publish([ids[0] ?? '']);
    const sent = new Map(runs.flatMap((r) => [...r.sent]));
    const report = await check(ids, { events: sent });
    expect(report.violations).to.deep.equal([]);
    expect(report).to.deep.include({ ok: true, deployments: 3, transitions: 18, appliedTwice: 0, historyGaps: 0 });
    expect(report.processed).to.deep.equal({ applied: 18, noop: 9 });
    expect(report.stream).to.deep.equal({ entries: 24, repeats: 6, gaps: 0, outOfOrder: 0, mismatches: 0 });
  });

  it('passes the whole database when no scope is given', async () => {
    const ids = [(await lifecycle()).deploymentId];
    await publish(ids);
    const report = await checkHistory({ dataSource: db.dataSource });
    expect(report.ok, JSON.stringify(report.violations)).to.equal(true);
    expect(report.stream).to.equal(null);
    expect(report.deployments).to.be.at.least(1);
  });

  it('finds a lost history row: a version gap, an applied claim without history, a replay that cannot continue', async () => {
    const { deploymentId } = await lifecycle();
    await publish([deploymentId]);
    await q(`DELETE FROM state_transitions WHERE deployment_id = $1 AND version = 3`, [deploymentId]);
    const report = await check([deploymentId]);
    expect(report.ok).to.equal(false);
    expect(report.historyGaps).to.equal(1);
    expect(report.violationCounts).to.include({ version_gap: 1, claim_without_history: 1, replay_mismatch: 1 });
    expect(report.violations[0]).to.include({ kind: 'version_gap', deploymentId });
    expect(report.violations[0]?.detail).to.match(/missing 3/);
    // the stream entry of version 3 has no history row any more
    expect(report.violationCounts.stream_unknown_entry).to.equal(1);
  });

  it('finds an event applied twice', async () => {
    const { deploymentId } = await lifecycle();
    // the last transition's event written again as version 7 (a redelivery that escaped the processed_events claim)
    await q(
      `INSERT INTO state_transitions (deployment_id, attempt_id, from_state, to_state, version, reason, event_id, actor, created_at)
       SELECT deployment_id, attempt_id, from_state, to_state, 7, reason, event_id, actor, now()
         FROM state_transitions WHERE deployment_id = $1 AND version = 6`,
      [deploymentId],
    );
    await q(`UPDATE deployments SET version = 7 WHERE id = $1`, [deploymentId]);
    const report = await checkHistory({ dataSource: db.dataSource, deploymentIds: [deploymentId] });
    expect(report.appliedTwice).to.equal(1);
    expect(report.violationCounts).to.include({ applied_twice: 1, history_without_claim: 1, replay_mismatch: 1 });
  });

  it('finds a transition whose processed_events claim is missing, or says noop', async () => {
    const one = await lifecycle();
    const two = await lifecycle();
    await q(`DELETE FROM processed_events WHERE event_id = (SELECT event_id FROM state_transitions WHERE deployment_id = $1 AND version = 2)`, [
      one.deploymentId,
    ]);
    await q(
      `UPDATE processed_events SET outcome = 'noop' WHERE event_id = (SELECT event_id FROM state_transitions WHERE deployment_id = $1 AND version = 4)`,
      [two.deploymentId],
    );
    const report = await checkHistory({ dataSource: db.dataSource, deploymentIds: [one.deploymentId, two.deploymentId] });
    expect(report.violationCounts).to.deep.equal({ history_without_claim: 2 });
    expect(report.violations.map((v) => [v.deploymentId, v.version])).to.deep.equal(
      [
        [one.deploymentId, 2],
        [two.deploymentId, 4],
      ].sort((x, y) => String(x[0]).localeCompare(String(y[0]))),
    );
  });

  it('needs no claim for transitions older than the processed_events retention', async () => {
    const { deploymentId } = await lifecycle();
    await q(`DELETE FROM processed_events WHERE deployment_id = $1`, [deploymentId]);
    await q(`UPDATE state_transitions SET created_at = now() - interval '8 days' WHERE deployment_id = $1 AND version <= 3`, [deploymentId]);
    const report = await checkHistory({
      dataSource: db.dataSource,
      deploymentIds: [deploymentId],
      claimsSince: new Date(Date.now() - 7 * 24 * 3600_000),
    });
    // the three recent transitions still need theirs
    expect(report.violationCounts).to.deep.equal({ history_without_claim: 3 });
    expect(report.violations.map((v) => v.version)).to.deep.equal([4, 5, 6]);
  });

  it('finds a final state the machine does not reach, and an attempt whose status drifted', async () => {
    const { deploymentId, attempts } = await lifecycle();
    await q(`UPDATE deployments SET state = 'ready' WHERE id = $1`, [deploymentId]);
    await q(`UPDATE attempts SET status = 'running' WHERE id = $1`, [attempts[0]]);
    const report = await checkHistory({ dataSource: db.dataSource, deploymentIds: [deploymentId] });
    expect(report.violationCounts).to.deep.equal({ final_state_mismatch: 1 });
    expect(report.violations[0]?.detail)
      .to.match(/state ready, replay failed/)
      .and.match(/running, replay succeeded/);
  });

  it('finds a transition the machine would not make', async () => {
    const { deploymentId } = await lifecycle();
    // version 3 (attempt A succeeded, from pending) rewritten as an orphaning: the machine orphans only running attempts
    await q(`UPDATE state_transitions SET to_state = 'unknown', reason = 'orphaned' WHERE deployment_id = $1 AND version = 3`, [deploymentId]);
    const report = await checkHistory({ dataSource: db.dataSource, deploymentIds: [deploymentId] });
    const details = report.violations.filter((v) => v.kind === 'replay_mismatch').map((v) => v.detail);
    expect(details).to.have.length(2);
    expect(details[0]).to.match(/reason orphaned comes from attempt.orphaned, but the event was attempt.end/);
    expect(details[1]).to.match(/pending -> unknown \(orphaned\); the machine at version 2: noop not_running/);
  });

  it('checks noops and applied events against what was sent', async () => {
    const run = await lifecycle();
    const [noopId] = (
      await q<{ event_id: string }>(
        `SELECT event_id FROM processed_events WHERE deployment_id = $1 AND outcome = 'noop' AND event_name = 'attempt.start'`,
        [run.deploymentId],
      )
    ).map((r) => r.event_id);
    await q(`UPDATE processed_events SET reason = 'stale_attempt' WHERE event_id = $1`, [noopId]);
    // the producer's record says attempt B's end was a success; history applied a failure
    const [endId] = (
      await q<{ event_id: string }>(`SELECT event_id FROM state_transitions WHERE deployment_id = $1 AND version = 6`, [run.deploymentId])
    ).map((r) => r.event_id);
    const sent = new Map(run.sent);
    sent.set(endId ?? '', { name: 'attempt.end', data: { deploymentId: run.deploymentId, attemptId: run.attempts[1], outcome: 'succeeded' } });
    const report = await checkHistory({ dataSource: db.dataSource, deploymentIds: [run.deploymentId], events: sent });
    expect(report.violationCounts).to.deep.equal({ noop_mismatch: 1, event_mismatch: 1 });
    expect(report.violations.find((v) => v.kind === 'noop_mismatch')?.detail).to.match(
      /recorded noop stale_attempt; the machine at version 3: noop already_ended/,
    );
  });

  it('finds stream gaps, first occurrences out of order, and entries that differ from history', async () => {
    const gap = await lifecycle();
    const order = await lifecycle();
    const differ = await lifecycle();
    const ids = [gap.deploymentId, order.deploymentId, differ.deploymentId];
    await publish(ids);
    const [lost] = await streamEntry(gap.deploymentId, 5);
    await redis.xdel(streamKey, lost);
    // version 2 of `order` taken out and appended after everything else
    const [movedId, movedFields] = await streamEntry(order.deploymentId, 2);
    await redis.xdel(streamKey, movedId);
    await redis.xadd(streamKey, '*', ...movedFields);
    // a repeat of `differ` v3 that says something else
    const [, fields] = await streamEntry(differ.deploymentId, 3);
    const changed = [...fields];
    changed[changed.indexOf('to') + 1] = 'unknown';
    await redis.xadd(streamKey, '*', ...changed);

    const report = await check(ids);
    expect(report.stream).to.deep.equal({ entries: 18, repeats: 1, gaps: 1, outOfOrder: 1, mismatches: 1 });
    expect(report.violationCounts).to.deep.equal({ stream_missing_version: 1, stream_out_of_order: 1, stream_entry_mismatch: 1 });
    expect(report.violations.find((v) => v.kind === 'stream_missing_version')).to.include({ deploymentId: gap.deploymentId });
    expect(report.violations.find((v) => v.kind === 'stream_out_of_order')).to.include({ deploymentId: order.deploymentId, version: 2 });
    expect(report.violations.find((v) => v.kind === 'stream_entry_mismatch')?.detail).to.match(/different to/);
  });

  it('reads every partition of a partitioned stream, and tells apart entries of two partitions with the same id', async () => {
    const runs = [await lifecycle(), await lifecycle(), await lifecycle(), await lifecycle(), await lifecycle(), await lifecycle()];
    const ids = runs.map((r) => r.deploymentId);
    const P = 4;
    await recordPartitions(redis, streamKey, P);
    // what the relay does with P = 4, but with ids that repeat across partitions (each partition counts from 1-1)
    const rows = await q<{ fields: Record<string, string> }>(`SELECT fields FROM outbox WHERE deployment_id = ANY($1) ORDER BY id`, [ids]);
    const next = new Map<number, number>();
    for (const row of rows) {
      const n = partitionOf(row.fields.deploymentId ?? '', P);
      next.set(n, (next.get(n) ?? 0) + 1);
      await redis.xadd(partitionKey(streamKey, n, P), `1-${next.get(n)}`, ...Object.entries(row.fields).flat());
    }
    const used = [...next.keys()];
    expect(used.length, 'the deployments cover two partitions at least').to.be.at.least(2);
    const report = await check(ids);
    expect(report.violations).to.deep.equal([]);
    expect(report.stream).to.deep.equal({ entries: 36, repeats: 0, gaps: 0, outOfOrder: 0, mismatches: 0 });

    // one partition's entries read by a consumer, then trimmed away: the same ids on the other partitions still count
    const first = partitionKey(streamKey, used[0] ?? 0, P);
    const read = ((await redis.xrange(first, '-', '+')) as Array<[string, string[]]>).map(([id, fields]) => parseEntry(id, fields));
    await redis.xtrim(first, 'MAXLEN', 0);
    const trimmed = await check(ids, { stream: { redis, key: streamKey, before: read } });
    expect(trimmed.violations).to.deep.equal([]);
    expect(trimmed.stream).to.deep.equal({ entries: 36, repeats: 0, gaps: 0, outOfOrder: 0, mismatches: 0 });

    // an entry lost on another partition is a gap of its deployment
    const other = partitionKey(streamKey, used[1] ?? 1, P);
    const [[lostId, lostFields] = ['', []]] = (await redis.xrange(other, '-', '+', 'COUNT', 1)) as Array<[string, string[]]>;
    await redis.xdel(other, lostId);
    const gap = await check(ids, { stream: { redis, key: streamKey, before: read } });
    expect(gap.violationCounts).to.deep.equal({ stream_missing_version: 1 });
    expect(gap.violations[0]).to.include({ deploymentId: parseEntry(lostId, lostFields).deploymentId });
  });

  it('lists at most maxViolations, and counts them all', async () => {
    const runs = [await lifecycle(), await lifecycle(), await lifecycle()];
    const ids = runs.map((r) => r.deploymentId);
    await q(`UPDATE deployments SET state = 'unknown' WHERE id = ANY($1)`, [ids]);
    const report = await checkHistory({ dataSource: db.dataSource, deploymentIds: ids, maxViolations: 2 });
    expect(report.violations).to.have.length(2);
    expect(report.violationCounts).to.deep.equal({ final_state_mismatch: 3 });
  });
});
