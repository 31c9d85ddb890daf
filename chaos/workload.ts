/**
 * The chaos workload: per deployment, a scripted lifecycle whose end state is known whatever order its events are
 * delivered in, so that every event the generator intends can be accounted for after the run.
 *
 * A script is a list of steps. A step's events are sent shuffled, some late, some twice; the next step starts only
 * once the step's barrier holds (the deployment reached the state the step converges to, or an event expected to
 * be rejected failed with its code). Within a step only events that converge are mixed (docs/architecture.md: for one attempt,
 * any order of its start/end/duplicates ends in the same state); events whose effect depends on order (orphaned,
 * teardown of an unknown deployment, resolve) get steps of their own.
 *
 * Pure: plans from a seeded random source; sending and waiting are the runner's.
 */
import type { DeploymentState } from '../src/machine';

/** A deterministic random source (mulberry32). */
export class Random {
  private state: number;
  constructor(seed: number) {
    this.state = seed >>> 0;
  }
  /** [0, 1) */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(min: number, max: number): number {
    return min + Math.floor(this.next() * (max - min + 1));
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(items: readonly T[]): T {
    const item = items[Math.floor(this.next() * items.length)];
    if (item === undefined) throw new Error('pick from an empty list');
    return item;
  }
  shuffle<T>(items: readonly T[]): T[] {
    const out = [...items];
    for (let i = out.length - 1; i > 0; i--) {
      const j = Math.floor(this.next() * (i + 1));
      const a = out[i] as T;
      out[i] = out[j] as T;
      out[j] = a;
    }
    return out;
  }
  /** a UUID v4 from this source (reproducible runs) */
  uuid(): string {
    const hex = Array.from({ length: 32 }, () => Math.floor(this.next() * 16).toString(16));
    hex[12] = '4';
    hex[16] = (Math.floor(this.next() * 4) + 8).toString(16);
    const s = hex.join('');
    return `${s.slice(0, 8)}-${s.slice(8, 12)}-${s.slice(12, 16)}-${s.slice(16, 20)}-${s.slice(20)}`;
  }
}

/** What the generator expects of an event: decided by the machine (applied or noop), or rejected with a code. */
export type Expectation = { readonly kind: 'decided' } | { readonly kind: 'rejected'; readonly code: string };

export interface PlannedEvent {
  readonly name: string;
  /** the payload, with its eventId */
  readonly data: Readonly<Record<string, unknown>> & { readonly eventId: string; readonly deploymentId: string };
  readonly expect: Expectation;
  /** may be replayed later under a new eventId (an out-of-order copy must converge to a noop or the same state) */
  readonly replayable: boolean;
}

/**
 * When a step is over: the deployment is in `state` with `currentAttemptId` (when given), and every event of the
 * step that is expected to be rejected has failed. Waiting for the rejections matters: a rejection is not recorded
 * (a later delivery of the same eventId is decided afresh), so a rejected event must be final before the deployment
 * moves on to a state in which it would apply.
 */
export interface Barrier {
  readonly state: { readonly state: DeploymentState; readonly currentAttemptId: string | null } | null;
  readonly rejected: ReadonlyArray<{ readonly eventId: string; readonly code: string }>;
  /**
   * the step's events a decision is expected for: each must be decided (a `processed_events` row) before the next
   * step, as a pipeline waits for its own event's answer. The state alone can match before a slow event of the step
   * ran (a teardown of a deployment that is already `pending`, its job waiting out a retry), and that event would
   * then meet the next step's state.
   */
  readonly decided: readonly string[];
}

function barrierOf(state: Barrier['state'], events: readonly PlannedEvent[]): Barrier {
  return {
    state,
    rejected: events.flatMap((e) => (e.expect.kind === 'rejected' ? [{ eventId: e.data.eventId, code: e.expect.code }] : [])),
    decided: events.flatMap((e) => (e.expect.kind === 'decided' ? [e.data.eventId] : [])),
  };
}

export interface Step {
  readonly label: string;
  readonly events: readonly PlannedEvent[];
  readonly barrier: Barrier;
}

export interface Script {
  readonly deploymentId: string;
  readonly name: string;
  readonly steps: readonly Step[];
  /** where the deployment ends */
  readonly final: { readonly state: DeploymentState; readonly currentAttemptId: string | null };
}

export type PhaseKind = 'succeed' | 'fail' | 'cancel' | 'orphan' | 'teardown';

export interface WorkloadOptions {
  readonly deployments: number;
  /** phases after the first attempt, per deployment: [min, max] */
  readonly phases: readonly [number, number];
  readonly random: Random;
  /** a run id, part of every eventId */
  readonly runId: string;
}

const decided: Expectation = { kind: 'decided' };

export function planWorkload(options: WorkloadOptions): Script[] {
  const { random } = options;
  return Array.from({ length: options.deployments }, (_, index) => planScript(index, options, random));
}

/** Makes the script's next event: its eventId numbers the events of the script in the order they are made. */
type EventMaker = (eventName: string, rest: Record<string, unknown>, expect?: Expectation, replayable?: boolean) => PlannedEvent;

/** Where a script has brought its deployment: the current attempt, the state, and the attempt's reported outcome. */
interface Position {
  readonly attemptId: string | null;
  readonly state: DeploymentState;
  readonly lastOutcome: 'succeeded' | 'failed' | null;
}

interface Phase {
  readonly steps: readonly Step[];
  readonly next: Position;
}

function planScript(index: number, options: WorkloadOptions, random: Random): Script {
  const deploymentId = random.uuid();
  const name = `chaos-${index}`;
  let seq = 0;
  const event: EventMaker = (eventName, rest, expect = decided, replayable = true) => ({
    name: eventName,
    data: { eventId: `${options.runId}.${index}.${seq++}`, deploymentId, ...rest },
    expect,
    replayable,
  });
  const created = planCreate(event, name, random);
  const steps: Step[] = [...created.steps];
  let current = created.next;
  const phases = random.int(options.phases[0], options.phases[1]);
  for (let p = 0; p < phases; p++) {
    const kind: PhaseKind = random.pick<PhaseKind>(['succeed', 'succeed', 'fail', 'cancel', 'orphan', 'teardown']);
    // the previous attempt reports the other outcome, late: a noop whenever it lands (first outcome wins, or stale)
    const late =
      current.attemptId !== null && current.lastOutcome !== null
        ? [event('attempt.end', { attemptId: current.attemptId, outcome: current.lastOutcome === 'succeeded' ? 'failed' : 'succeeded' })]
        : [];
    const phase = kind === 'teardown' ? planTeardown(event, late) : planAttemptPhase(kind, event, late, random);
    steps.push(...phase.steps);
    current = phase.next;
  }
  return { deploymentId, name, steps, final: { state: current.state, currentAttemptId: current.attemptId } };
}

/**
 * The first step: the deployment and its first attempt, all at once and shuffled (events that arrive before what
 * they name are retried by the worker until it exists).
 */
function planCreate(event: EventMaker, name: string, random: Random): Phase {
  const first = random.uuid();
  const firstOutcome = random.chance(0.75) ? 'succeeded' : 'failed';
  const createEvents = [
    event('deployment.create', { name }),
    event('deployment.create', { name }), // the same deployment again, under another eventId: noop duplicate
    event('attempt.create', { attemptId: first }),
    event('attempt.start', { attemptId: first }),
    event('attempt.end', { attemptId: first, outcome: firstOutcome }),
    event('attempt.start', { attemptId: first }), // a second start: noop (duplicate or already ended)
    // resolving a deployment that never becomes unknown here: always rejected
    event('deployment.resolve', { outcome: 'ready' }, { kind: 'rejected', code: 'not_unknown' }, false),
  ];
  const state = firstOutcome === 'succeeded' ? 'ready' : 'failed';
  return {
    steps: [{ label: 'create', events: createEvents, barrier: barrierOf({ state, currentAttemptId: first }, createEvents) }],
    next: { attemptId: first, state, lastOutcome: firstOutcome },
  };
}

function planTeardown(event: EventMaker, late: readonly PlannedEvent[]): Phase {
  const events = [
    ...late,
    event('deployment.teardown', {}, decided, false),
    event('deployment.resolve', { outcome: 'failed' }, { kind: 'rejected', code: 'not_unknown' }, false),
  ];
  return {
    steps: [{ label: 'teardown', events, barrier: barrierOf({ state: 'pending', currentAttemptId: null }, events) }],
    next: { attemptId: null, state: 'pending', lastOutcome: null },
  };
}

/** A phase with a new attempt: it succeeds, fails, is cancelled, or is orphaned and then resolved. */
function planAttemptPhase(kind: Exclude<PhaseKind, 'teardown'>, event: EventMaker, late: readonly PlannedEvent[], random: Random): Phase {
  const attemptId = random.uuid();
  if (kind === 'orphan') return planOrphan(event, late, attemptId, random);
  if (kind === 'cancel') {
    return {
      steps: [
        {
          label: 'cancel',
          events: [
            ...late,
            event('attempt.create', { attemptId }),
            event('attempt.start', { attemptId }),
            event('attempt.cancel', { attemptId, reason: 'chaos' }),
          ],
          barrier: barrierOf({ state: 'failed', currentAttemptId: attemptId }, []),
        },
      ],
      next: { attemptId, state: 'failed', lastOutcome: null },
    };
  }
  const outcome = kind === 'succeed' ? 'succeeded' : 'failed';
  const events = [
    ...late,
    event('attempt.create', { attemptId }),
    event('attempt.start', { attemptId }),
    event('attempt.end', { attemptId, outcome }),
    event('attempt.end', { attemptId, outcome }), // the runner reports twice: noop
  ];
  const state = outcome === 'succeeded' ? 'ready' : 'failed';
  return {
    steps: [{ label: kind, events, barrier: barrierOf({ state, currentAttemptId: attemptId }, []) }],
    next: { attemptId, state, lastOutcome: outcome },
  };
}

/** The attempt starts, is declared orphaned (twice), a teardown is refused in `unknown`, then it is resolved. */
function planOrphan(event: EventMaker, late: readonly PlannedEvent[], attemptId: string, random: Random): Phase {
  const outcome = random.chance(0.5) ? 'ready' : 'failed';
  const teardown = event('deployment.teardown', {}, { kind: 'rejected', code: 'unknown_state' }, false);
  return {
    steps: [
      {
        label: 'orphan:start',
        events: [...late, event('attempt.create', { attemptId }), event('attempt.start', { attemptId })],
        barrier: barrierOf({ state: 'deploying', currentAttemptId: attemptId }, []),
      },
      {
        label: 'orphan:orphaned',
        events: [event('attempt.orphaned', { attemptId }), event('attempt.orphaned', { attemptId })],
        barrier: barrierOf({ state: 'unknown', currentAttemptId: attemptId }, []),
      },
      {
        label: 'orphan:teardown-refused',
        events: [teardown],
        barrier: barrierOf(null, [teardown]),
      },
      {
        label: 'orphan:resolve',
        events: [event('deployment.resolve', { outcome }, decided, false)],
        barrier: barrierOf({ state: outcome, currentAttemptId: attemptId }, []),
      },
    ],
    next: { attemptId, state: outcome, lastOutcome: null },
  };
}
