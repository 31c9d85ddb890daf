/**
 * The event catalog (src/events/catalog.ts, issue 30): what is derived from its entries is what the contract says
 * (docs/contract.md, "Queues and jobs" and "HTTP"): the stamps, the events with derived ids, the intake's scopes, the
 * producer SDK's methods, and the machine's view of each event.
 */
import { expect } from 'chai';
import {
  EVENT_CATALOG,
  EVENT_NAMES,
  eventScope,
  ONCE_PER_SUBJECT,
  parsePayload,
  PRODUCER_METHODS,
  STAMP_EVENTS,
  toMachineEvent,
  type EventName,
  type StateEvent,
} from '../../src/events/schemas';
import { LifecycleProducer } from '../../src/queues/producer';

const deploymentId = '6d1f0c3e-8a44-4f7b-9a53-0f3b1c2d4e5f';
const attemptId = '0b7c9e21-5d3a-4c8f-8e1b-7a6f5d4c3b2a';
const endpoint = { url: 'http://10.0.0.1:30000/', kind: 'node_port' };

/** A valid payload of each event, with what the machine should see of it (null: a stamp). */
const SAMPLES: Record<EventName, { data: Record<string, unknown>; machine: Record<string, unknown> | null }> = {
  'deployment.create': { data: { deploymentId, name: 'web', endpoint }, machine: { name: 'web', endpoint } },
  'attempt.create': { data: { deploymentId, attemptId }, machine: { attemptId } },
  'attempt.start': { data: { deploymentId, attemptId }, machine: { attemptId } },
  'attempt.heartbeat': { data: { deploymentId, attemptId }, machine: null },
  'attempt.end': {
    data: { deploymentId, attemptId, outcome: 'failed', reason: 'oom' },
    machine: { attemptId, outcome: 'failed', reason: 'oom', endpoint: undefined },
  },
  'attempt.cancel': { data: { deploymentId, attemptId, reason: 'user' }, machine: { attemptId, reason: 'user' } },
  'attempt.orphaned': { data: { deploymentId, attemptId }, machine: { attemptId, deadBefore: new Date(1000) } },
  'attempt.expired': { data: { deploymentId, attemptId }, machine: { attemptId, startedBefore: new Date(2000) } },
  'deployment.teardown': { data: { deploymentId, force: true }, machine: { force: true } },
  'deployment.resolve': { data: { deploymentId, outcome: 'ready' }, machine: { outcome: 'ready', reason: undefined } },
  'deployment.readiness': { data: { deploymentId }, machine: null },
};

describe('event catalog', () => {
  it("has the contract's events, in its order", () => {
    expect(EVENT_NAMES).to.deep.equal(Object.keys(SAMPLES));
  });

  it('derives the stamps and the events that happen once per subject', () => {
    expect([...STAMP_EVENTS]).to.deep.equal(['attempt.heartbeat', 'deployment.readiness']);
    expect([...ONCE_PER_SUBJECT]).to.deep.equal([
      'deployment.create',
      'attempt.create',
      'attempt.start',
      'attempt.end',
      'attempt.cancel',
      'attempt.orphaned',
      'attempt.expired',
    ]);
  });

  it("maps every event the machine decides on to the machine's event of its name, with the payload's fields", () => {
    const cutoffs = { deadBefore: new Date(1000), startedBefore: new Date(2000) };
    for (const name of EVENT_NAMES) {
      const { data, machine } = SAMPLES[name];
      expect(EVENT_CATALOG[name].kind, name).to.equal(machine === null ? 'stamp' : 'transition');
      if (machine === null) continue;
      const event = { name, eventId: 'e', data: parsePayload(name, data) } as StateEvent;
      expect(toMachineEvent(event, cutoffs), name).to.deep.equal({ type: name, ...machine });
    }
  });

  it("asks events:admin of the sweep's events, resolve and a forced teardown only", () => {
    const admin = EVENT_NAMES.filter((name) => eventScope(name, SAMPLES[name].data) === 'events:admin');
    expect(admin).to.deep.equal(['attempt.orphaned', 'attempt.expired', 'deployment.teardown', 'deployment.resolve']);
    expect(eventScope('deployment.teardown', { deploymentId, force: false })).to.equal('events:write');
    expect(eventScope('deployment.teardown', { deploymentId, force: 'true' })).to.equal('events:write');
    expect(eventScope('deployment.teardown', 'not an object')).to.equal('events:write');
  });

  it('gives the producer one method per event that has one, each enqueueing its own event', async () => {
    expect(PRODUCER_METHODS).to.deep.equal({
      createDeployment: 'deployment.create',
      createAttempt: 'attempt.create',
      startAttempt: 'attempt.start',
      heartbeat: 'attempt.heartbeat',
      endAttempt: 'attempt.end',
      cancelAttempt: 'attempt.cancel',
      teardown: 'deployment.teardown',
      resolve: 'deployment.resolve',
      readiness: 'deployment.readiness',
    });
    for (const [method, name] of Object.entries(PRODUCER_METHODS)) {
      const calls: unknown[][] = [];
      // the method as the class has it, on a stand-in that records what it enqueues (no Redis needed)
      const standIn = { enqueue: async (...args: unknown[]) => calls.push(args) };
      const fn = (LifecycleProducer.prototype as unknown as Record<string, (input: unknown) => Promise<unknown>>)[method];
      expect(fn, method).to.be.a('function');
      await fn?.call(standIn, SAMPLES[name].data);
      expect(calls, method).to.deep.equal([[name, SAMPLES[name].data]]);
    }
  });
});
