/**
 * The one planner of transitions (src/services/transitions/batch-plan.ts), with plain objects and no server: what a
 * set of events decides, the rows of the one write it comes to, and what each event comes to once the write has
 * reported. The integration tests (group-commit.test.ts) check the same against PostgreSQL, batches against one at
 * a time.
 */
import { expect } from 'chai';
import type { TransitionSnapshotRow, TransitionWriteRow } from '../../src/entities/sql';
import type { NotYetError } from '../../src/errors';
import { parseEvent, payloadDigest } from '../../src/events/schemas';
import { cutoffsAt } from '../../src/machine';
import { planBatch, splitBatch, verdictOf, writeReportOf, type BatchPlan, type PreparedEvent } from '../../src/services/transitions/batch-plan';
import { toMachineEvent, type StateEvent } from '../../src/services/transitions/outcomes';

const NOW = new Date('2026-12-02T12:00:00.000Z');
const D = '00000000-0000-4000-8000-00000000000d';
const E = '00000000-0000-4000-8000-00000000000e';
const A1 = '00000000-0000-4000-8000-0000000000a1';
const A2 = '00000000-0000-4000-8000-0000000000a2';
const LIMITS = { orphanAfterS: 90, progressDeadlineS: 1800 };
const EMPTY: TransitionSnapshotRow = { deployments: null, attempts: null, processed: null };
const ENDPOINT = { url: 'http://10.0.0.1:30000/', kind: 'node_port' as const };

/** An event as the service prepares it, declared at `declared` (an orphan's or an expiry's time). */
function prepared(name: string, data: Record<string, unknown>, declared = NOW): PreparedEvent {
  const event = parseEvent(name, data) as StateEvent;
  return { event, machineEvent: toMachineEvent(event, cutoffsAt(declared, LIMITS)), trace: null };
}

/** One existing deployment (and its attempts) as the snapshot reads it. */
function snapshotOf(
  deployment: { state: string; version: number; current?: string | null; maxNumber?: number | null },
  attempts: Array<{ id: string; status: string; lastHeartbeatAt?: Date | null; startedAt?: Date | null; deploymentId?: string }> = [],
): TransitionSnapshotRow {
  return {
    deployments: [
      {
        id: D,
        name: 'web',
        state: deployment.state as 'pending',
        version: deployment.version,
        current_attempt_id: deployment.current ?? null,
        max_number: deployment.maxNumber ?? null,
      },
    ],
    attempts: attempts.map((a) => ({
      id: a.id,
      deployment_id: a.deploymentId ?? D,
      status: a.status as 'pending',
      last_heartbeat_at: a.lastHeartbeatAt?.toISOString() ?? null,
      started_at: a.startedAt?.toISOString() ?? null,
    })),
    processed: null,
  };
}

/** The write's report had every deployment of the plan won its version check, history ids 1, 2, ... in order. */
function allWon(plan: BatchPlan): TransitionWriteRow {
  return {
    won: [...plan.writes],
    transitions: Object.fromEntries(plan.write.applied.map((r, i) => [r.event_id, String(i + 1)])),
    noop_claimed: plan.write.noopClaims.map((n) => n.event_id),
    handoff: null,
  };
}

function summaries(plan: BatchPlan, row: TransitionWriteRow | null): string[] {
  const report = writeReportOf(row);
  return plan.events.map((p) => {
    const v = verdictOf(p, plan, report);
    if (v.kind !== 'settled') return v.kind === 'failed' ? `failed ${v.error.constructor.name}` : v.kind;
    const r = v.result;
    return r.outcome === 'applied' ? `applied v${r.version} #${r.transitionId}` : r.outcome === 'noop' ? `noop ${r.reason}` : `rejected ${r.code}`;
  });
}

describe('the transition planner (pure)', () => {
  it('plans a lone event as a batch of one: a new deployment, its claim, history and stream entry', () => {
    const create = prepared('deployment.create', { deploymentId: D, name: 'web', endpoint: ENDPOINT, eventId: 'c1', actor: 'ci' });
    const plan = planBatch([create], EMPTY, NOW);
    expect(plan.write.inserts).to.deep.equal([
      {
        id: D,
        name: 'web',
        state: 'pending',
        version: 1,
        endpoint_url: ENDPOINT.url,
        endpoint_kind: 'node_port',
        current_attempt_id: null,
        last_ready_at: null,
        at: NOW,
      },
    ]);
    expect(plan.write.updates).to.deep.equal([]);
    expect(plan.write.applied).to.deep.equal([
      {
        event_id: 'c1',
        event_name: 'deployment.create',
        deployment_id: D,
        attempt_id: null,
        from_state: null,
        to_state: 'pending',
        version: 1,
        reason: 'created',
        actor: 'ci',
        payload_sha256: payloadDigest(create.event.data),
        at: NOW,
        traceparent: null,
      },
    ]);
    expect([...plan.writes]).to.deep.equal([D]);
    expect(summaries(plan, allWon(plan))).to.deep.equal(['applied v1 #1']);
  });

  it('plans a whole lifecycle in one batch as the rows one at a time would leave', () => {
    const events = [
      prepared('deployment.create', { deploymentId: D, name: 'web', eventId: 'c1' }),
      prepared('attempt.create', { deploymentId: D, attemptId: A1, eventId: 'a1' }),
      prepared('attempt.start', { deploymentId: D, attemptId: A1, eventId: 's1' }),
      prepared('attempt.end', { deploymentId: D, attemptId: A1, outcome: 'succeeded', endpoint: ENDPOINT, eventId: 'e1' }),
    ];
    const plan = planBatch(events, EMPTY, NOW);
    expect(plan.write.inserts).to.deep.equal([
      {
        id: D,
        name: 'web',
        state: 'ready',
        version: 4,
        endpoint_url: ENDPOINT.url,
        endpoint_kind: 'node_port',
        current_attempt_id: A1,
        last_ready_at: NOW,
        at: NOW,
      },
    ]);
    // the new attempt goes in as the batch left it; nothing else of it is changed
    expect(plan.write.newAttempts).to.deep.equal([
      { id: A1, deployment_id: D, status: 'succeeded', reason: null, started_at: NOW, ended_at: NOW, number: 1, at: NOW },
    ]);
    expect(plan.write.changedAttempts).to.deep.equal([]);
    expect(plan.write.applied.map((r) => [r.event_id, r.from_state, r.to_state, r.version])).to.deep.equal([
      ['c1', null, 'pending', 1],
      ['a1', 'pending', 'pending', 2],
      ['s1', 'pending', 'deploying', 3],
      ['e1', 'deploying', 'ready', 4],
    ]);
    expect(plan.events.map((p) => p.dirty)).to.deep.equal([false, true, true, true]);
    expect(summaries(plan, allWon(plan))).to.deep.equal(['applied v1 #1', 'applied v2 #2', 'applied v3 #3', 'applied v4 #4']);
  });

  it('version-checks an existing deployment, numbers a new attempt after its others and supersedes a pending one', () => {
    const snapshot = snapshotOf({ state: 'pending', version: 5, current: A1, maxNumber: 3 }, [{ id: A1, status: 'pending' }]);
    const plan = planBatch([prepared('attempt.create', { deploymentId: D, attemptId: A2, eventId: 'a2' })], snapshot, NOW);
    expect(plan.write.updates).to.deep.equal([
      {
        id: D,
        from_version: 5,
        to_version: 6,
        state: 'pending',
        at: NOW,
        set_current: true,
        current_attempt_id: A2,
        set_endpoint: false,
        endpoint_url: null,
        endpoint_kind: null,
        set_ready: false,
        last_ready_at: null,
      },
    ]);
    expect(plan.write.newAttempts.map((a) => [a.id, a.number, a.status])).to.deep.equal([[A2, 4, 'pending']]);
    expect(plan.write.changedAttempts).to.deep.equal([
      { id: A1, deployment_id: D, status: 'superseded', reason: 'superseded', started_at: null, ended_at: NOW },
    ]);
  });

  it("claims a noop, on top of the batch's own write when it was decided on it", () => {
    const snapshot = snapshotOf({ state: 'deploying', version: 3, current: A1 }, [{ id: A1, status: 'running', startedAt: NOW }]);
    const again = prepared('attempt.start', { deploymentId: D, attemptId: A1, eventId: 'again' });
    const alone = planBatch([again], snapshot, NOW);
    expect(alone.write.noopClaims).to.deep.equal([
      {
        event_id: 'again',
        event_name: 'attempt.start',
        deployment_id: D,
        reason: 'duplicate',
        version: 3,
        payload_sha256: payloadDigest(again.event.data),
        at: NOW,
        needs_win: false,
      },
    ]);
    expect(summaries(alone, allWon(alone))).to.deep.equal(['noop duplicate']);
    // another delivery claimed it first: the claim did not take
    expect(summaries(alone, { won: null, transitions: null, noop_claimed: null, handoff: null })).to.deep.equal(['claimed_elsewhere']);

    const cancel = prepared('attempt.cancel', { deploymentId: D, attemptId: A1, eventId: 'x1' });
    const late = prepared('attempt.end', { deploymentId: D, attemptId: A1, outcome: 'succeeded', eventId: 'e1' });
    const onTop = planBatch([cancel, late], snapshot, NOW);
    expect(onTop.write.noopClaims.map((n) => [n.event_id, n.reason, n.version, n.needs_win])).to.deep.equal([['e1', 'first_outcome_wins', 4, true]]);
  });

  it('redoes what was decided on a write whose version check lost; what was decided on the snapshot alone stands', () => {
    const snapshot = snapshotOf({ state: 'deploying', version: 3, current: A1 }, [{ id: A1, status: 'running', startedAt: NOW }]);
    const events = [
      prepared('attempt.start', { deploymentId: D, attemptId: A1, eventId: 'again' }),
      prepared('attempt.cancel', { deploymentId: D, attemptId: A1, eventId: 'x1' }),
      prepared('attempt.end', { deploymentId: D, attemptId: A1, outcome: 'succeeded', eventId: 'e1' }),
    ];
    const plan = planBatch(events, snapshot, NOW);
    expect(summaries(plan, { won: null, transitions: null, noop_claimed: ['again'], handoff: null })).to.deep.equal([
      'noop duplicate',
      'redo',
      'redo',
    ]);
  });

  it('answers what the snapshot settles without writing: duplicates, reused eventIds, foreign attempts, not yet', () => {
    const create = prepared('deployment.create', { deploymentId: D, name: 'web', eventId: 'c1' });
    const processed = (digest: string): TransitionSnapshotRow => ({
      ...snapshotOf({ state: 'pending', version: 1 }),
      processed: [
        {
          event_id: 'c1',
          event_name: 'deployment.create',
          deployment_id: D,
          payload_sha256: digest,
          outcome: 'applied',
          reason: 'created',
          version: 1,
        },
      ],
    });
    const duplicate = planBatch([create], processed(payloadDigest(create.event.data)), NOW);
    const reused = planBatch([create], processed('0'.repeat(64)), NOW);
    const foreign = planBatch(
      [prepared('attempt.start', { deploymentId: D, attemptId: A2, eventId: 's2' })],
      snapshotOf({ state: 'pending', version: 1 }, [{ id: A2, status: 'pending', deploymentId: E }]),
      NOW,
    );
    const notYet = planBatch([prepared('attempt.start', { deploymentId: D, attemptId: A2, eventId: 's2' })], EMPTY, NOW);
    expect([duplicate, reused, foreign, notYet].flatMap((p) => summaries(p, null))).to.deep.equal([
      'noop duplicate_event',
      'rejected event_id_conflict',
      'rejected id_conflict',
      'failed NotYetError',
    ]);
    expect(notYet.events[0]?.outcome).to.deep.include({ kind: 'deferred' });
    expect((notYet.events[0]?.outcome as { error: NotYetError }).error.code).to.equal('deployment_not_found');
    for (const plan of [duplicate, reused, foreign, notYet]) expect(plan.writes.size + plan.write.noopClaims.length).to.equal(0);
  });

  it('judges an orphan by liveness as the batch left it: an attempt started in the same batch is alive', () => {
    const snapshot = snapshotOf({ state: 'pending', version: 2, current: A1 }, [{ id: A1, status: 'pending' }]);
    const start = prepared('attempt.start', { deploymentId: D, attemptId: A1, eventId: 's1' });
    const orphan = (declaredS: number) =>
      prepared(
        'attempt.orphaned',
        { deploymentId: D, attemptId: A1, eventId: `o${declaredS}`, actor: 'sweep' },
        new Date(NOW.getTime() + declaredS * 1000),
      );
    const alive = planBatch([start, orphan(60)], snapshot, NOW);
    expect(summaries(alive, allWon(alive))).to.deep.equal(['applied v3 #1', 'noop alive']);
    // `alive` is no claim: the orphan stays free to apply later
    expect(alive.write.noopClaims).to.deep.equal([]);
    const due = planBatch([start, orphan(100)], snapshot, NOW);
    expect(summaries(due, allWon(due))).to.deep.equal(['applied v3 #1', 'applied v4 #2']);
  });

  it('keeps an eventId and an attempt to one event and one deployment per batch; what waits holds back what follows it', () => {
    const events = [
      prepared('attempt.start', { deploymentId: D, attemptId: A1, eventId: 'same' }),
      prepared('attempt.start', { deploymentId: E, attemptId: A2, eventId: 'same' }),
      prepared('attempt.end', { deploymentId: E, attemptId: A2, outcome: 'failed', eventId: 'after' }),
      prepared('attempt.cancel', { deploymentId: E, attemptId: A1, eventId: 'foreign' }),
      prepared('deployment.teardown', { deploymentId: D, eventId: 'td' }),
    ];
    expect(splitBatch(events)).to.deep.equal({ now: [0, 4], later: [1, 2, 3] });
  });
});
