import { expect } from 'chai';
import { transitionEntryFields } from '../../src/entities/model/outbox-entry';
import { STREAM_ENTRY_SCHEMA } from '../../src/streams/stream-entry';

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

  it('is what the published contract schema describes, field for field, traced and untraced (with the transitionId the write adds)', () => {
    const traceparent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
    const untraced = { deploymentId: D, attemptId: A1, from: 'deploying' as const, to: 'ready' as const, version: 4, reason: 'attempt_succeeded' };
    const sources = {
      untraced: { ...untraced, eventId: 'e-4', at: NOW, actor: 'runner-7', traceparent: null },
      traced: { ...untraced, eventId: 'e-4', at: NOW, actor: 'runner-7', traceparent },
      creation: {
        ...untraced,
        attemptId: null,
        from: null,
        to: 'pending' as const,
        version: 1,
        eventId: 'c1',
        at: NOW,
        actor: 'producer',
        traceparent: null,
      },
    };
    const named = Object.keys(STREAM_ENTRY_SCHEMA.shape).sort();
    for (const [label, source] of Object.entries(sources)) {
      const entry = { ...transitionEntryFields(source), transitionId: '1' };
      expect(STREAM_ENTRY_SCHEMA.safeParse(entry).error?.issues, label).to.equal(undefined);
      // the schema lets unknown fields through (the contract may gain some): a renamed optional field would pass it
      const expected = source.traceparent === null ? named.filter((k) => k !== 'traceparent') : named;
      expect(Object.keys(entry).sort(), `${label}: the entry's fields are the schema's`).to.deep.equal(expected);
    }
  });
});
