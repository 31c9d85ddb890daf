/**
 * The chaos consumer group's check (chaos/group-check.ts): complete, per deployment never a lower version after a
 * higher one, never two holdings of one partition handling at once; and the members' record files it reads.
 */
import { expect } from 'chai';
import { checkGroup, FROM_HISTORY, parseMemberRecord, type GroupCall } from '../../chaos/group-check';

const D = '11111111-1111-4111-8111-111111111111';
const E = '22222222-2222-4222-8222-222222222222';

/** A call at `at` seconds by `consumer`'s holding `holding` of partition `partition`. */
function call(at: number, consumer: string, holding: number, deploymentId: string, version: number, partition = 0): GroupCall {
  return { at: BigInt(at * 1e9), consumer, partition, holding, deploymentId, version, streamId: `${at}-0` };
}

describe('chaos consumer group check', () => {
  it('passes a handover with a redelivery, and counts versions read from history apart', () => {
    const calls = [
      call(1, 'c0-1', 1, D, 1),
      call(2, 'c0-1', 1, D, 2),
      // c0-1 was killed in the handler of v2: the next owner handles it again
      call(7, 'c1-2', 1, D, 2),
      call(8, 'c1-2', 1, D, 3),
      call(9, 'c1-2', 1, E, 1, 1),
      // a resync: what the group had not handled, from history
      { ...call(10, FROM_HISTORY, -1, E, 2, -1), streamId: '' },
      call(11, 'c2-3', 1, E, 3, 1),
    ];
    const check = checkGroup(
      calls,
      new Map([
        [D, 3],
        [E, 3],
      ]),
    );
    expect(check.violations).to.deep.equal([]);
    expect(check).to.deep.include({ calls: 6, redelivered: 1, fromHistory: 1 });
  });

  it('finds a lower version after a higher one, across members', () => {
    const check = checkGroup([call(1, 'c0-1', 1, D, 1), call(2, 'c0-1', 1, D, 3), call(3, 'c1-2', 1, D, 2, 1)], new Map([[D, 3]]));
    expect(check.violationCounts).to.deep.equal({ group_out_of_order: 1 });
    expect(check.violations[0]).to.include({ deploymentId: D, version: 2 });
    expect(check.violations[0]?.detail).to.equal('v2 by c1-2 at 2.000 s after v3 by c0-1 at 1.000 s');
  });

  it('finds two holdings of one partition handling at once, but not one after the other', () => {
    // c0-1 goes on handling partition 0 after c1-2 took it over (it was not fenced)
    const twice = checkGroup(
      [call(1, 'c0-1', 1, D, 1), call(3, 'c1-2', 1, E, 1), call(5, 'c0-1', 1, D, 2)],
      new Map([
        [D, 2],
        [E, 1],
      ]),
    );
    expect(twice.violationCounts).to.deep.equal({ group_two_owners: 1 });
    expect(twice.violations[0]?.detail).to.equal('partition 0: c1-2 (holding 1) handled from 2.000 s while c0-1 (holding 1) handled until 4.000 s');
    // the same member owning the partition again later (a new holding) is no overlap
    const again = checkGroup(
      [call(1, 'c0-1', 1, D, 1), call(3, 'c1-2', 1, E, 1), call(5, 'c0-1', 2, D, 2)],
      new Map([
        [D, 2],
        [E, 1],
      ]),
    );
    expect(again.violations).to.deep.equal([]);
  });

  it('finds versions that never reached the handler, and a deployment never handled at all', () => {
    const check = checkGroup(
      [call(1, 'c0-1', 1, D, 1), call(2, 'c0-1', 1, D, 2), call(3, 'c0-1', 1, D, 4)],
      new Map([
        [D, 4],
        [E, 2],
      ]),
    );
    expect(check.violationCounts).to.deep.equal({ group_missing_version: 2 });
    expect(check.violations.map((v) => v.detail)).to.deep.equal([
      'versions 3 of 4 never reached the handler',
      'versions 1, 2 of 2 never reached the handler',
    ]);
  });

  it('reads a record file: calls with their holding, partition changes, a call that never returned, how the run ended', () => {
    const text = [
      'A 1000 2',
      `S 2000 2 1 ${D} 1 5-0`,
      'E 3000',
      'L 3500 2',
      'A 4000 2',
      'R 4100 3',
      'not a record line',
      `S 5000 2 2 ${D} 2 6-0`,
      'X 6000 resync the position was trimmed',
      `S 7000 2 2 ${D} 3`, // cut short by a SIGKILL: skipped
    ].join('\n');
    const record = parseMemberRecord('c0-1', text);
    expect(record).to.deep.include({ acquired: 2, released: 1, lost: 1, ended: 'resync' });
    expect(record.calls.map((c) => [c.at, c.partition, c.holding, c.version, c.streamId])).to.deep.equal([
      [2000n, 2, 1, 1, '5-0'],
      [5000n, 2, 2, 2, '6-0'],
    ]);
    expect(record.inHandlerAtEnd?.version).to.equal(2);
    expect(parseMemberRecord('c0-1', `S 1 0 1 ${D} 1 1-0\nE 2\n`).inHandlerAtEnd).to.equal(null);
  });
});
