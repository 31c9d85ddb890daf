/**
 * The watch's ring of recent entries (src/streams/watch-ring.ts): where a reader behind the live feed can go on from
 * the ring without a gap, as entries are evicted and layouts change.
 */
import { expect } from 'chai';
import type { StreamLayout } from '../../src/streams/stream-follower';
import { WatchRing, type RingItem } from '../../src/streams/watch-ring';

const TWO: StreamLayout = { partitions: 2, repartitions: 0, keys: ['s:0', 's:1'] };
const FOUR: StreamLayout = { partitions: 4, repartitions: 1, keys: ['s:0', 's:1', 's:2', 's:3'] };

const entry = (partition: number, id: string): RingItem => ({
  kind: 'entry',
  partition,
  id,
  entry: { partitionKey: `s:${partition}`, streamId: id, deploymentId: 'd', to: 'pending', data: '{}' },
});

describe('watch ring', () => {
  it('holds every entry after its base: a reader at or past the base goes on from the first item', () => {
    const ring = new WatchRing(4, { layout: TWO, positions: ['5-0', '7-0'] });
    ring.push(entry(0, '10-0'));
    ring.push(entry(1, '11-0'));
    expect(ring.entryPoint({ layout: TWO, positions: ['5-0', '7-0'] })).to.deep.equal({ seq: 0, positions: ['5-0', '7-0'] });
    expect(ring.entryPoint({ layout: TWO, positions: ['10-0', '9-0'] })).to.deep.equal({ seq: 0, positions: ['10-0', '9-0'] });
    // behind the base on one partition: what lies between is not in the ring
    expect(ring.entryPoint({ layout: TWO, positions: ['4-0', '7-0'] })).to.equal(null);
    expect(ring.entryPoint({ layout: TWO, positions: ['5-0', '6-9'] })).to.equal(null);
  });

  it('moves its base past what it evicts', () => {
    const ring = new WatchRing(2, { layout: TWO, positions: ['5-0', '7-0'] });
    ring.push(entry(0, '10-0'));
    ring.push(entry(1, '11-0'));
    ring.push(entry(0, '12-0')); // evicts 10-0 of partition 0
    expect([ring.first, ring.next, ring.length]).to.deep.equal([1, 3, 2]);
    expect(() => ring.at(0)).to.throw(RangeError);
    expect(ring.entryPoint({ layout: TWO, positions: ['5-0', '7-0'] })).to.equal(null);
    expect(ring.entryPoint({ layout: TWO, positions: ['10-0', '7-0'] })).to.deep.equal({ seq: 1, positions: ['10-0', '7-0'] });
  });

  it('leaves out the partitions a reader does not read, moving them up to the ring', () => {
    const ring = new WatchRing(4, { layout: TWO, positions: ['5-0', '7-0'] });
    ring.push(entry(1, '11-0'));
    expect(ring.entryPoint({ layout: TWO, positions: ['1-0', '7-0'] }, new Set([1]))).to.deep.equal({ seq: 0, positions: ['5-0', '7-0'] });
    expect(ring.entryPoint({ layout: TWO, positions: ['1-0', '7-0'] }, new Set([0]))).to.equal(null);
  });

  it("finds a reader's layout after a repartition in the ring, and goes on after the move", () => {
    const ring = new WatchRing(8, { layout: TWO, positions: ['5-0', '7-0'] });
    ring.push(entry(0, '10-0'));
    ring.push({ kind: 'layout', layout: FOUR, positions: ['10-0', '7-0', '0', '0'] });
    ring.push(entry(2, '20-0'));
    // still in the old layout, at or past the base: from the start (the move comes on the way)
    expect(ring.entryPoint({ layout: TWO, positions: ['5-0', '7-0'] })?.seq).to.equal(0);
    // already in the new layout (it read the old one to its end from Redis): after the move
    expect(ring.entryPoint({ layout: FOUR, positions: ['10-0', '7-0', '0', '0'] })?.seq).to.equal(2);
    // a layout the ring does not have
    expect(ring.entryPoint({ layout: { ...FOUR, repartitions: 2 }, positions: ['10-0', '7-0', '0', '0'] })).to.equal(null);
    // once the move is evicted, the base is the new layout's
    const small = new WatchRing(1, { layout: TWO, positions: ['5-0', '7-0'] });
    small.push({ kind: 'layout', layout: FOUR, positions: ['10-0', '7-0', '0', '0'] });
    small.push(entry(2, '20-0'));
    expect(small.entryPoint({ layout: TWO, positions: ['5-0', '7-0'] })).to.equal(null);
    expect(small.entryPoint({ layout: FOUR, positions: ['10-0', '7-0', '0', '0'] })).to.deep.equal({
      seq: 1,
      positions: ['10-0', '7-0', '0', '0'],
    });
  });
});
