import { expect } from 'chai';
import { fateOf, heartbeatMember, parseHeartbeatMember, stampKeys } from '../../src/services/stamps';

describe('stamp buffer rules (pure)', () => {
  const a = '0b6a3a1e-8a4e-4c1a-9f43-1c2d3e4f5a6b';
  const d = '9f1c2b3a-4d5e-4f60-8a7b-6c5d4e3f2a1b';

  it('a heartbeat member carries the attempt and its deployment, and reads back only as two UUIDs', () => {
    expect(parseHeartbeatMember(heartbeatMember(a, d))).to.deep.equal({ attemptId: a, deploymentId: d });
    expect(parseHeartbeatMember(a)).to.equal(null);
    expect(parseHeartbeatMember(`${a}:${d}:x`)).to.equal(null);
    expect(parseHeartbeatMember(`${a}:not-a-uuid`)).to.equal(null);
  });

  it('keys live under the prefix (a Redis user confined to `<prefix>:*` reaches them) in one hash tag', () => {
    for (const prefix of ['fleet', '{fleet}']) {
      const keys = Object.values(stampKeys(prefix));
      for (const key of keys) expect(key.startsWith(`${prefix}:`)).to.equal(true);
      // Redis Cluster hashes the first {...}: one slot for all three
      const tags = new Set(keys.map((k) => /\{([^}]+)\}/.exec(k)?.[1]));
      expect(tags.size).to.equal(1);
    }
  });

  it('decides each buffered stamp: written, dropped as not stampable, kept while it may be created, then dropped', () => {
    const horizon = Date.parse('2026-11-23T12:00:00Z');
    const fresh = new Date(horizon);
    const old = new Date(horizon - 1);
    expect(fateOf({ stamped: true, found: true }, old, horizon)).to.equal('stamped');
    expect(fateOf({ stamped: false, found: true }, fresh, horizon)).to.equal('not_stampable');
    expect(fateOf({ stamped: false, found: false }, fresh, horizon), 'at the horizon: kept').to.equal('keep');
    expect(fateOf({ stamped: false, found: false }, old, horizon)).to.equal('not_found');
    expect(fateOf(undefined, fresh, horizon), 'a member the statement could not take').to.equal('not_found');
  });
});
