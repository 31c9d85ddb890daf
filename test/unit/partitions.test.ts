import { expect } from 'chai';
import { loadConfig } from '../../src/config';
import { ConfigError } from '../../src/errors';
import { compareIds, fnv1a32, idBefore, partitionKey, partitionKeys, partitionOf, partitionsRecordKey } from '../../src/streams/partitions';

const bytes = (s: string) => new TextEncoder().encode(s);

describe('stream partitions', () => {
  it('hashes with FNV-1a 32-bit (the published test vectors)', () => {
    expect(fnv1a32(bytes(''))).to.equal(0x811c9dc5);
    expect(fnv1a32(bytes('a'))).to.equal(0xe40c292c);
    expect(fnv1a32(bytes('foobar'))).to.equal(0xbf9cf968);
    // more than one byte per character: the UTF-8 bytes are hashed, not the UTF-16 code units
    expect(fnv1a32(bytes('é'))).to.equal(fnv1a32(Uint8Array.from([0xc3, 0xa9])));
  });

  it('puts a deployment in the partition FNV-1a of its lower-case id names, modulo P', () => {
    const id = '3F2504E0-4F89-41D3-9A0C-0305E82C3301';
    expect(partitionOf(id, 16)).to.equal(fnv1a32(bytes(id.toLowerCase())) % 16);
    expect(partitionOf(id, 16)).to.equal(partitionOf(id.toLowerCase(), 16));
    expect(partitionOf('foobar', 1024)).to.equal(0xbf9cf968 % 1024);
    expect(partitionOf(id, 1)).to.equal(0);
    expect(() => partitionOf(id, 0)).to.throw(RangeError, 'partitions: must be a whole number of at least 1, got 0');
  });

  it('names the stream id just before another: nothing lies between the two', () => {
    expect(idBefore('1763900000000-5')).to.equal('1763900000000-4');
    expect(idBefore('1763900000000-0')).to.equal('1763899999999-18446744073709551615');
    expect(idBefore('1763900000000')).to.equal('1763899999999-18446744073709551615');
    expect(idBefore('0-1')).to.equal('0-0');
    expect(idBefore('0-0')).to.equal('0-0');
    for (const id of ['1763900000000-5', '1763900000000-0', '0-1']) expect(compareIds(idBefore(id), id), id).to.equal(-1);
  });

  it('spreads deployments over the partitions', () => {
    const counts = new Array<number>(16).fill(0);
    for (let i = 0; i < 1600; i++) counts[partitionOf(`00000000-0000-4000-8000-${String(i).padStart(12, '0')}`, 16)]! += 1;
    expect(Math.min(...counts)).to.be.above(50);
  });

  it('names partition keys: the base key with one partition, a suffix without a hash tag, an own tag with one', () => {
    expect(partitionKey('fleet:transitions', 0, 1)).to.equal('fleet:transitions');
    expect(partitionKeys('fleet:transitions', 3)).to.deep.equal(['fleet:transitions:0', 'fleet:transitions:1', 'fleet:transitions:2']);
    expect(partitionKey('{fleet}:transitions', 0, 1)).to.equal('{fleet}:transitions');
    expect(partitionKey('{fleet}:transitions', 7, 16)).to.equal('{fleet:p7}:transitions:7');
    expect(partitionsRecordKey('{fleet}:transitions')).to.equal('{fleet}:transitions:partitions');
  });

  it('reads FLEET_STREAM_PARTITIONS (1-1024, default 1) and names the variable and the rule when out of range', () => {
    expect(loadConfig({}, false).streamPartitions).to.equal(1);
    expect(loadConfig({ FLEET_STREAM_PARTITIONS: '1024' }, false).streamPartitions).to.equal(1024);
    for (const [raw, message] of [
      ['0', 'FLEET_STREAM_PARTITIONS: must be between 1 and 1024, got 0'],
      ['1025', 'FLEET_STREAM_PARTITIONS: must be between 1 and 1024, got 1025'],
      ['sixteen', 'FLEET_STREAM_PARTITIONS: must be a whole number, got "sixteen"'],
    ] as const) {
      const err = (() => {
        try {
          loadConfig({ FLEET_STREAM_PARTITIONS: raw }, false);
        } catch (e) {
          return e;
        }
        return null;
      })();
      expect(err).to.be.instanceOf(ConfigError);
      expect((err as ConfigError).problems).to.deep.equal([message]);
    }
  });
});
