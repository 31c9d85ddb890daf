import { expect } from 'chai';
import { DEFAULTS } from '../../src/config';
import { cutoffsAt, livenessOf } from '../../src/machine';

describe('liveness (the pure rule)', () => {
  const t = (s: number) => new Date(Date.UTC(2026, 2, 1, 10, 0, s));

  it('is the last heartbeat, else the start, else none', () => {
    expect(livenessOf({ lastHeartbeatAt: t(5), startedAt: t(0) })).to.deep.equal(t(5));
    expect(livenessOf({ lastHeartbeatAt: null, startedAt: t(0) })).to.deep.equal(t(0));
    expect(livenessOf({ lastHeartbeatAt: null, startedAt: null })).to.equal(null);
  });

  it('judges a declaration by its own time minus each threshold', () => {
    const at = t(0);
    expect(cutoffsAt(at, { orphanAfterS: 90, progressDeadlineS: 1800 })).to.deep.equal({
      deadBefore: new Date(at.getTime() - 90_000),
      startedBefore: new Date(at.getTime() - 1_800_000),
    });
  });

  it('has its defaults in the configuration: 90 s and 1800 s', () => {
    expect(DEFAULTS).to.deep.equal({ orphanAfterS: 90, progressDeadlineS: 1800 });
    expect(Object.isFrozen(DEFAULTS)).to.equal(true);
  });
});
