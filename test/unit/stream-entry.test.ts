import { expect } from 'chai';
import { transitionEntryFields } from '../../src/entities/model/outbox-entry';

const NOW = new Date('2026-12-02T12:00:00.000Z');
const D = '00000000-0000-4000-8000-00000000000d';
const A1 = '00000000-0000-4000-8000-0000000000a1';

describe('the stream entry (transitionEntryFields)', () => {
  it('is all strings, empty for no attempt and no previous state, with a traceparent only when traced', () => {
    const source = {
      deploymentId: D,
      attemptId: null,
      from: null,
      to: 'pending' as const,
      version: 1,
      reason: 'created',
      eventId: 'c1',
      at: NOW,
      actor: 'ci',
      traceparent: null,
    };
    expect(transitionEntryFields(source)).to.deep.equal({
      type: 'state_transition',
      deploymentId: D,
      attemptId: '',
      from: '',
      to: 'pending',
      version: '1',
      reason: 'created',
      eventId: 'c1',
      at: '2026-12-02T12:00:00.000Z',
      actor: 'ci',
    });
    const traceparent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
    expect(transitionEntryFields({ ...source, attemptId: A1, from: 'ready', traceparent })).to.deep.include({
      attemptId: A1,
      from: 'ready',
      traceparent,
    });
  });
});
