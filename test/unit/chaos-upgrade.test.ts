/**
 * The mixed-version chaos run's inputs and judgement: `--previous` parsed and refused where it cannot run, a ref
 * that names no commit refused before anything starts, and an upgrade report that did not show both releases working
 * side by side failing the run.
 */
import { expect } from 'chai';
import { parseChaosArgs } from '../../chaos/options';
import { preparePrevious } from '../../chaos/releases';
import { upgradeShown, type UpgradeReport } from '../../chaos/upgrade';

describe('chaos: a mixed-version run (--previous)', () => {
  it('takes a ref, and refuses a missing one and a run on several hosts', () => {
    expect(parseChaosArgs(['--previous', 'v0.1.0']).previous).to.equal('v0.1.0');
    expect(parseChaosArgs([]).previous).to.equal(null);
    expect(() => parseChaosArgs(['--previous'])).to.throw('--previous: expected a git ref');
    expect(() => parseChaosArgs(['--previous', '--ci'])).to.throw('--previous: expected a git ref');
    expect(() => parseChaosArgs(['--previous', 'v0.1.0', '--hosts', '3'])).to.throw('on loopback');
  });

  it('refuses a ref that names no commit, naming it', () => {
    expect(() => preparePrevious('no-such-ref-9f8e7d', () => undefined)).to.throw('no-such-ref-9f8e7d names no commit');
  });

  it('fails an upgrade unless the migration ran and both releases worked side by side', () => {
    const shown: UpgradeReport = {
      previous: { ref: 'v0.1.0', commit: 'a'.repeat(40), version: '0.1.0' },
      current: { commit: 'b'.repeat(40), version: '0.2.0' },
      migration: { atS: 20, tookS: 2, output: 'applied: X', tries: 1, ok: true },
      currentWorkersAtS: 25,
      previousRetiredAtS: 60,
      samples: { total: 80, activePrevious: 30, activeCurrent: 40, activeBoth: 5, relayPrevious: 30, relayCurrent: 40, relayMoves: 1 },
      eventsByProducer: { previous: 100, current: 100 },
      membersStarted: { previous: 2, current: 3 },
    };
    expect(upgradeShown(shown)).to.equal(true);
    expect(upgradeShown({ ...shown, migration: { ...shown.migration, ok: false } })).to.equal(false);
    expect(upgradeShown({ ...shown, samples: { ...shown.samples, activeBoth: 0 } })).to.equal(false);
    expect(upgradeShown({ ...shown, samples: { ...shown.samples, relayCurrent: 0 } })).to.equal(false);
    expect(upgradeShown({ ...shown, samples: { ...shown.samples, relayPrevious: 0 } })).to.equal(false);
    expect(upgradeShown({ ...shown, membersStarted: { previous: 0, current: 3 } })).to.equal(false);
    expect(upgradeShown({ ...shown, eventsByProducer: { previous: 0, current: 200 } })).to.equal(false);
  });
});
