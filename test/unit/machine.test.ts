import { expect } from 'chai';
import fc from 'fast-check';
import { decide } from '../../src/machine';
import type { AttemptStatus, Decision, DeploymentState, MachineEvent, Snapshot } from '../../src/machine';

const NOW = new Date('2026-11-23T12:00:00.000Z');
const A = '00000000-0000-4000-8000-00000000000a';
const B = '00000000-0000-4000-8000-00000000000b';

/** The status the current attempt has in each state when the deployment got there the usual way. */
const CURRENT_STATUS: Record<DeploymentState, AttemptStatus> = {
  pending: 'pending',
  deploying: 'running',
  ready: 'succeeded',
  failed: 'failed',
  unknown: 'abandoned',
};

function snapshotIn(state: DeploymentState, attempt: string | null = A): Snapshot {
  const current = { id: A, status: CURRENT_STATUS[state] };
  return {
    deployment: { name: 'web', state, version: 3, currentAttemptId: A },
    attempt: attempt === A ? current : attempt === null ? null : { id: attempt, status: 'superseded' },
    currentAttempt: current,
  };
}

type Expect = `applied:${DeploymentState}:${string}` | `noop:${string}` | `rejected:${string}`;

function summarize(d: Decision): string {
  switch (d.kind) {
    case 'applied':
      return `applied:${d.to}:${d.reason}`;
    case 'noop':
      return `noop:${d.why}`;
    case 'rejected':
      return `rejected:${d.code}`;
    case 'deferred':
      return `deferred:${d.why}`;
  }
}

const STATES: DeploymentState[] = ['pending', 'deploying', 'ready', 'failed', 'unknown'];

/** docs/state-machine.md's table, row by row: event -> outcome in [pending, deploying, ready, failed, unknown]. */
const TABLE: ReadonlyArray<readonly [string, MachineEvent, readonly [Expect, Expect, Expect, Expect, Expect]]> = [
  [
    'attempt.create (new attempt B)',
    { type: 'attempt.create', attemptId: B },
    [
      'applied:pending:attempt_created',
      'rejected:attempt_in_progress',
      'applied:pending:attempt_created',
      'applied:pending:attempt_created',
      'applied:pending:attempt_created',
    ],
  ],
  [
    'attempt.start (A)',
    { type: 'attempt.start', attemptId: A },
    ['applied:deploying:attempt_started', 'noop:duplicate', 'noop:already_ended', 'noop:already_ended', 'noop:already_ended'],
  ],
  [
    'attempt.end ok (A)',
    { type: 'attempt.end', attemptId: A, outcome: 'succeeded' },
    [
      'applied:ready:attempt_succeeded',
      'applied:ready:attempt_succeeded',
      'noop:already_ended',
      'noop:first_outcome_wins',
      'applied:ready:attempt_succeeded',
    ],
  ],
  [
    'attempt.end fail (A)',
    { type: 'attempt.end', attemptId: A, outcome: 'failed', reason: 'image pull failed' },
    [
      'applied:failed:attempt_failed',
      'applied:failed:attempt_failed',
      'noop:first_outcome_wins',
      'noop:already_ended',
      'applied:failed:attempt_failed',
    ],
  ],
  [
    'attempt.cancel (A)',
    { type: 'attempt.cancel', attemptId: A },
    ['applied:failed:cancelled', 'applied:failed:cancelled', 'noop:already_ended', 'noop:already_ended', 'applied:failed:cancelled'],
  ],
  [
    'attempt.orphaned (A)',
    { type: 'attempt.orphaned', attemptId: A },
    ['noop:not_running', 'applied:unknown:orphaned', 'noop:already_ended', 'noop:already_ended', 'noop:already_ended'],
  ],
  [
    'attempt.expired (A)',
    { type: 'attempt.expired', attemptId: A },
    ['noop:not_running', 'applied:failed:progress_deadline_exceeded', 'noop:already_ended', 'noop:already_ended', 'noop:already_ended'],
  ],
  [
    'deployment.teardown',
    { type: 'deployment.teardown' },
    ['applied:pending:torn_down', 'rejected:attempt_in_progress', 'applied:pending:torn_down', 'applied:pending:torn_down', 'rejected:unknown_state'],
  ],
  [
    'deployment.teardown force',
    { type: 'deployment.teardown', force: true },
    [
      'applied:pending:torn_down',
      'rejected:attempt_in_progress',
      'applied:pending:torn_down',
      'applied:pending:torn_down',
      'applied:pending:torn_down',
    ],
  ],
  [
    'deployment.resolve ready',
    { type: 'deployment.resolve', outcome: 'ready' },
    ['rejected:not_unknown', 'rejected:not_unknown', 'rejected:not_unknown', 'rejected:not_unknown', 'applied:ready:resolved'],
  ],
  [
    'deployment.resolve failed',
    { type: 'deployment.resolve', outcome: 'failed' },
    ['rejected:not_unknown', 'rejected:not_unknown', 'rejected:not_unknown', 'rejected:not_unknown', 'applied:failed:resolved'],
  ],
  [
    'deployment.create (same id, same name)',
    { type: 'deployment.create', name: 'web' },
    ['noop:duplicate', 'noop:duplicate', 'noop:duplicate', 'noop:duplicate', 'noop:duplicate'],
  ],
  [
    'deployment.create (same id, other name)',
    { type: 'deployment.create', name: 'api' },
    ['rejected:id_conflict', 'rejected:id_conflict', 'rejected:id_conflict', 'rejected:id_conflict', 'rejected:id_conflict'],
  ],
];

describe('state machine: the transition table', () => {
  for (const [label, event, row] of TABLE) {
    STATES.forEach((state, i) => {
      it(`${label} in ${state} -> ${row[i]}`, () => {
        expect(summarize(decide(snapshotIn(state), event, NOW))).to.equal(row[i]);
      });
    });
  }

  it('deployment.create with no row creates it pending at version 1 with its endpoint', () => {
    const d = decide(
      { deployment: null, attempt: null, currentAttempt: null },
      { type: 'deployment.create', name: 'web', endpoint: { url: 'http://10.0.0.1:30080', kind: 'node_port' } },
      NOW,
    );
    expect(d).to.deep.equal({
      kind: 'applied',
      from: null,
      to: 'pending',
      reason: 'created',
      effects: { attempts: [], endpoint: { url: 'http://10.0.0.1:30080', kind: 'node_port' } },
    });
  });

  it('every other event for a missing deployment is deferred, not rejected', () => {
    const events: MachineEvent[] = [
      { type: 'attempt.create', attemptId: A },
      { type: 'attempt.start', attemptId: A },
      { type: 'attempt.end', attemptId: A, outcome: 'succeeded' },
      { type: 'deployment.teardown' },
      { type: 'deployment.resolve', outcome: 'ready' },
    ];
    for (const event of events) {
      expect(decide({ deployment: null, attempt: null, currentAttempt: null }, event, NOW)).to.deep.equal({
        kind: 'deferred',
        why: 'deployment_not_found',
      });
    }
  });

  it('an attempt event naming an attempt the deployment never had is deferred', () => {
    for (const state of STATES) {
      const snapshot = { ...snapshotIn(state), attempt: null };
      expect(summarize(decide(snapshot, { type: 'attempt.start', attemptId: B }, NOW))).to.equal('deferred:attempt_not_found');
    }
  });

  it('an attempt event naming an older attempt is the stale_attempt noop, in every state', () => {
    const events: MachineEvent[] = [
      { type: 'attempt.start', attemptId: B },
      { type: 'attempt.end', attemptId: B, outcome: 'succeeded' },
      { type: 'attempt.end', attemptId: B, outcome: 'failed' },
      { type: 'attempt.cancel', attemptId: B },
      { type: 'attempt.orphaned', attemptId: B },
      { type: 'attempt.expired', attemptId: B },
      { type: 'attempt.create', attemptId: B },
    ];
    for (const state of STATES) {
      for (const event of events) {
        expect(summarize(decide(snapshotIn(state, B), event, NOW)), `${event.type} in ${state}`).to.equal('noop:stale_attempt');
      }
    }
  });

  it('attempt.create of the current attempt again is a duplicate noop', () => {
    expect(summarize(decide(snapshotIn('pending'), { type: 'attempt.create', attemptId: A }, NOW))).to.equal('noop:duplicate');
  });

  it('attempt.create supersedes an unstarted current attempt and makes the new one current', () => {
    const d = decide({ ...snapshotIn('pending'), attempt: null }, { type: 'attempt.create', attemptId: B }, NOW);
    expect(d.kind).to.equal('applied');
    if (d.kind !== 'applied') return;
    expect(d.effects.createAttempt).to.deep.equal({ attemptId: B });
    expect(d.effects.currentAttemptId).to.equal(B);
    expect(d.effects.attempts).to.deep.equal([{ attemptId: A, status: 'superseded', reason: 'superseded', endedAt: NOW }]);
  });

  it('attempt.create after an ended attempt leaves the ended attempt alone', () => {
    const d = decide({ ...snapshotIn('failed'), attempt: null }, { type: 'attempt.create', attemptId: B }, NOW);
    expect(d.kind === 'applied' && d.effects.attempts).to.deep.equal([]);
  });

  it('becoming ready through attempt.end stamps last_ready_at and stores the endpoint; resolve does not stamp', () => {
    const endpoint = { url: 'http://10.0.0.2:31000', kind: 'node_port' } as const;
    const end = decide(snapshotIn('deploying'), { type: 'attempt.end', attemptId: A, outcome: 'succeeded', endpoint }, NOW);
    expect(end.kind === 'applied' && end.effects).to.deep.include({ lastReadyAt: NOW, endpoint });
    const resolve = decide(snapshotIn('unknown'), { type: 'deployment.resolve', outcome: 'ready' }, NOW);
    expect(resolve.kind === 'applied' && resolve.effects.lastReadyAt).to.equal(undefined);
  });

  it('teardown clears the endpoint, last_ready_at and the current attempt', () => {
    const d = decide(snapshotIn('ready'), { type: 'deployment.teardown' }, NOW);
    expect(d.kind === 'applied' && d.effects).to.deep.include({ currentAttemptId: null, endpoint: null, lastReadyAt: null });
  });

  it('attempt status follows the event', () => {
    const statusAfter = (state: DeploymentState, event: MachineEvent) => {
      const d = decide(snapshotIn(state), event, NOW);
      return d.kind === 'applied' ? d.effects.attempts.find((a) => a.attemptId === A)?.status : undefined;
    };
    expect(statusAfter('pending', { type: 'attempt.start', attemptId: A })).to.equal('running');
    expect(statusAfter('deploying', { type: 'attempt.end', attemptId: A, outcome: 'succeeded' })).to.equal('succeeded');
    expect(statusAfter('deploying', { type: 'attempt.end', attemptId: A, outcome: 'failed' })).to.equal('failed');
    expect(statusAfter('deploying', { type: 'attempt.cancel', attemptId: A })).to.equal('cancelled');
    expect(statusAfter('deploying', { type: 'attempt.orphaned', attemptId: A })).to.equal('abandoned');
    expect(statusAfter('deploying', { type: 'attempt.expired', attemptId: A })).to.equal('failed');
  });
});

/**
 * A tiny in-memory model of one deployment with one attempt, applying the machine's decisions, to check the
 * convergence property without a database.
 */
function run(events: readonly MachineEvent[]): { state: DeploymentState; status: AttemptStatus; version: number } {
  let state: DeploymentState = 'pending';
  let status: AttemptStatus = 'pending';
  let version = 2; // created, attempt created
  for (const event of events) {
    const d = decide(
      {
        deployment: { name: 'web', state, version, currentAttemptId: A },
        attempt: { id: A, status },
        currentAttempt: { id: A, status },
      },
      event,
      NOW,
    );
    if (d.kind === 'rejected' || d.kind === 'deferred') throw new Error(`unexpected ${summarize(d)}`);
    if (d.kind === 'applied') {
      state = d.to;
      version += 1;
      status = d.effects.attempts.find((a) => a.attemptId === A)?.status ?? status;
    }
  }
  return { state, status, version };
}

describe('state machine: convergence (property)', () => {
  const start: MachineEvent = { type: 'attempt.start', attemptId: A };
  const endOk: MachineEvent = { type: 'attempt.end', attemptId: A, outcome: 'succeeded' };
  const endFail: MachineEvent = { type: 'attempt.end', attemptId: A, outcome: 'failed' };

  /** a permutation of the attempt's events, each delivered one to three times */
  const deliveries = (end: MachineEvent) =>
    fc.tuple(fc.integer({ min: 1, max: 3 }), fc.integer({ min: 1, max: 3 })).chain(([starts, ends]) =>
      fc.shuffledSubarray([...Array<MachineEvent>(starts).fill(start), ...Array<MachineEvent>(ends).fill(end)], {
        minLength: starts + ends,
        maxLength: starts + ends,
      }),
    );

  for (const [label, end] of [
    ['succeeded', endOk],
    ['failed', endFail],
  ] as const) {
    it(`any order and duplication of start/end(${label}) ends where the in-order sequence ends`, () => {
      const expected = run([start, end]);
      fc.assert(
        fc.property(deliveries(end), (events) => {
          const got = run(events);
          expect(got.state).to.equal(expected.state);
          expect(got.status).to.equal(expected.status);
        }),
        { numRuns: 500 },
      );
    });
  }

  it('the in-order sequences end where the table says', () => {
    expect(run([start, endOk])).to.deep.equal({ state: 'ready', status: 'succeeded', version: 4 });
    expect(run([start, endFail])).to.deep.equal({ state: 'failed', status: 'failed', version: 4 });
  });
});

describe('decide: the promises that a table of usual snapshots does not pin (issue 13)', () => {
  it('cancel takes precedence: a failed deployment whose attempt was cancelled stays failed whatever end comes late', () => {
    const cancelled: Snapshot = {
      deployment: { name: 'web', state: 'failed', version: 4, currentAttemptId: A },
      attempt: { id: A, status: 'cancelled' },
      currentAttempt: { id: A, status: 'cancelled' },
    };
    const endpoint = { url: 'http://10.0.0.1:30000', kind: 'node_port' as const };
    expect(summarize(decide(cancelled, { type: 'attempt.end', attemptId: A, outcome: 'succeeded', endpoint }, NOW))).to.equal(
      'noop:first_outcome_wins',
    );
    expect(summarize(decide(cancelled, { type: 'attempt.end', attemptId: A, outcome: 'failed' }, NOW))).to.equal('noop:already_ended');
    for (const type of ['attempt.cancel', 'attempt.orphaned', 'attempt.expired', 'attempt.start'] as const) {
      expect(decide(cancelled, { type, attemptId: A }, NOW).kind, type).to.equal('noop');
    }
  });

  it('an orphan or expiry is re-checked against the attempt, not only the state', () => {
    const at = (s: number) => new Date(NOW.getTime() + s * 1000);
    const deploying = (livenessAt: Date, startedAt: Date): Snapshot => ({
      deployment: { name: 'web', state: 'deploying', version: 3, currentAttemptId: A },
      attempt: { id: A, status: 'running', livenessAt, startedAt },
      currentAttempt: { id: A, status: 'running' },
    });
    const orphan = (deadBefore: Date): MachineEvent => ({ type: 'attempt.orphaned', attemptId: A, deadBefore });
    expect(summarize(decide(deploying(at(-100), at(-200)), orphan(at(-90)), NOW))).to.equal('applied:unknown:orphaned');
    expect(summarize(decide(deploying(at(-90), at(-200)), orphan(at(-90)), NOW))).to.equal('noop:alive'); // the edge: alive
    expect(summarize(decide(deploying(at(-10), at(-200)), orphan(at(-90)), NOW))).to.equal('noop:alive');
    const expiry = (startedBefore: Date): MachineEvent => ({ type: 'attempt.expired', attemptId: A, startedBefore });
    expect(summarize(decide(deploying(at(-1), at(-1801)), expiry(at(-1800)), NOW))).to.equal('applied:failed:progress_deadline_exceeded');
    expect(summarize(decide(deploying(at(-1), at(-1000)), expiry(at(-1800)), NOW))).to.equal('noop:not_due');
    // without a cutoff (an old producer's event, a replay), as before
    expect(summarize(decide(deploying(at(-1), at(-1)), { type: 'attempt.orphaned', attemptId: A }, NOW))).to.equal('applied:unknown:orphaned');
  });
});
