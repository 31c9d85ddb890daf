import type {
  AttemptSnapshot,
  Decision,
  DeploymentSnapshot,
  DeploymentState,
  Effects,
  MachineEvent,
  NoopReason,
  RejectionCode,
  Snapshot,
  TransitionReason,
} from './types';

/**
 * The deployment state machine (docs/state-machine.md): a pure function from a snapshot, an event and
 * the time to a decision. It performs no I/O and reads no clock; `now` only stamps the effects it returns.
 */
export function decide(snapshot: Snapshot, event: MachineEvent, now: Date): Decision {
  const { deployment } = snapshot;

  if (event.type === 'deployment.create') {
    if (deployment === null) {
      return applied(null, 'pending', 'created', { attempts: [], endpoint: event.endpoint ?? null });
    }
    return deployment.name === event.name
      ? noop('duplicate')
      : rejected('id_conflict', `deployment exists with name "${deployment.name}", not "${event.name}"`);
  }

  if (deployment === null) return { kind: 'deferred', why: 'deployment_not_found' };

  switch (event.type) {
    case 'deployment.teardown':
      return teardown(deployment, snapshot.currentAttempt, event.force === true, now);
    case 'deployment.resolve':
      if (deployment.state !== 'unknown') {
        return rejected('not_unknown', `only an unknown deployment can be resolved; it is ${deployment.state}`);
      }
      // No readiness stamp: nobody has just seen the endpoint answer; the sweep stamps it if it does.
      return applied(deployment.state, event.outcome, 'resolved', { attempts: [] });
    case 'attempt.create':
      return createAttempt(snapshot, deployment, event.attemptId, now);
    default:
      return decideAttemptEvent(snapshot, deployment, event, now);
  }
}

type AttemptEvent = Extract<MachineEvent, { type: 'attempt.start' | 'attempt.end' | 'attempt.cancel' | 'attempt.orphaned' | 'attempt.expired' }>;

function decideAttemptEvent(snapshot: Snapshot, deployment: DeploymentSnapshot, event: AttemptEvent, now: Date): Decision {
  const { attempt } = snapshot;
  if (attempt === null || attempt.id !== event.attemptId) return { kind: 'deferred', why: 'attempt_not_found' };
  if (deployment.currentAttemptId !== attempt.id) return noop('stale_attempt');

  const state = deployment.state;
  const id = attempt.id;
  switch (event.type) {
    case 'attempt.start':
      if (state === 'pending') {
        return applied(state, 'deploying', 'attempt_started', {
          attempts: [{ attemptId: id, status: 'running', startedAt: now }],
        });
      }
      return noop(state === 'deploying' ? 'duplicate' : 'already_ended');

    case 'attempt.end': {
      const succeeded = event.outcome === 'succeeded';
      if (state === 'pending' || state === 'deploying' || state === 'unknown') {
        const effects: Effects = {
          attempts: [{ attemptId: id, status: event.outcome, reason: event.reason, endedAt: now }],
          ...(event.endpoint === undefined ? {} : { endpoint: event.endpoint }),
          // The runner has just seen the endpoint answer: serve it at once (docs/architecture.md, "Heartbeats, orphans, deadlines, dispatch").
          ...(succeeded ? { lastReadyAt: now } : {}),
        };
        return applied(state, succeeded ? 'ready' : 'failed', succeeded ? 'attempt_succeeded' : 'attempt_failed', effects);
      }
      // ready or failed: the first outcome stands.
      const sameOutcome = (state === 'ready') === succeeded;
      return noop(sameOutcome ? 'already_ended' : 'first_outcome_wins');
    }

    case 'attempt.cancel':
      if (state === 'pending' || state === 'deploying' || state === 'unknown') {
        return applied(state, 'failed', 'cancelled', {
          attempts: [{ attemptId: id, status: 'cancelled', reason: event.reason, endedAt: now }],
        });
      }
      return noop('already_ended');

    case 'attempt.orphaned':
      if (state === 'deploying') {
        // re-checked when applied, not only when declared: a heartbeat since proves the runner alive
        if (isAtOrAfter(attempt.livenessAt, event.deadBefore)) return noop('alive');
        return applied(state, 'unknown', 'orphaned', {
          attempts: [{ attemptId: id, status: 'abandoned', reason: 'orphaned', endedAt: now }],
        });
      }
      return noop(state === 'pending' ? 'not_running' : 'already_ended');

    case 'attempt.expired':
      if (state === 'deploying') {
        if (isAtOrAfter(attempt.startedAt, event.startedBefore)) return noop('not_due');
        return applied(state, 'failed', 'progress_deadline_exceeded', {
          attempts: [{ attemptId: id, status: 'failed', reason: 'progress_deadline_exceeded', endedAt: now }],
        });
      }
      return noop(state === 'pending' ? 'not_running' : 'already_ended');

    default:
      return assertNever(event);
  }
}

function createAttempt(snapshot: Snapshot, deployment: DeploymentSnapshot, attemptId: string, now: Date): Decision {
  if (snapshot.attempt !== null && snapshot.attempt.id === attemptId) {
    return noop(deployment.currentAttemptId === attemptId ? 'duplicate' : 'stale_attempt');
  }
  if (deployment.state === 'deploying') {
    return rejected('attempt_in_progress', 'the current attempt is running; cancel it or wait for its end');
  }
  const current = snapshot.currentAttempt;
  return applied(deployment.state, 'pending', 'attempt_created', {
    createAttempt: { attemptId },
    attempts: current !== null && current.status === 'pending' ? [supersede(current, now)] : [],
    currentAttemptId: attemptId,
  });
}

function teardown(deployment: DeploymentSnapshot, current: AttemptSnapshot | null, force: boolean, now: Date): Decision {
  const state = deployment.state;
  if (state === 'deploying') {
    return rejected('attempt_in_progress', 'the current attempt is running; cancel it before teardown');
  }
  if (state === 'unknown' && !force) {
    return rejected('unknown_state', 'the deployment is unknown: resolve it, or tear down with force');
  }
  return applied(state, 'pending', 'torn_down', {
    // An attempt that never started will not start now.
    attempts: current !== null && current.status === 'pending' ? [{ ...supersede(current, now), status: 'cancelled', reason: 'torn_down' }] : [],
    currentAttemptId: null,
    endpoint: null,
    lastReadyAt: null,
  });
}

/** True when both are known and `time` is not before `cutoff`. */
function isAtOrAfter(time: Date | null | undefined, cutoff: Date | undefined): boolean {
  return time != null && cutoff !== undefined && time.getTime() >= cutoff.getTime();
}

function supersede(attempt: AttemptSnapshot, now: Date) {
  return { attemptId: attempt.id, status: 'superseded', reason: 'superseded', endedAt: now } as const;
}

function applied(from: DeploymentState | null, to: DeploymentState, reason: TransitionReason, effects: Effects): Decision {
  return { kind: 'applied', from, to, reason, effects };
}

function noop(why: NoopReason): Decision {
  return { kind: 'noop', why };
}

function rejected(code: RejectionCode, message: string): Decision {
  return { kind: 'rejected', code, message };
}

export function assertNever(value: never): never {
  throw new Error(`unexpected value: ${JSON.stringify(value)}`);
}
