import { expect } from 'chai';
import { describeServer } from '../../src/redis/connection';
import { isClusterUrl, parseClusterUrl, prefixHashTag } from '../../src/util/redis-url';

describe('Redis Cluster URLs and hash tags', () => {
  it('parses seed nodes, credentials (percent-decoded) and TLS', () => {
    expect(parseClusterUrl('redis+cluster://fleet:p%40ss@10.0.0.1:7000,redis-b.internal:7001,[::1]:7002/')).to.deep.equal({
      nodes: [
        { host: '10.0.0.1', port: 7000 },
        { host: 'redis-b.internal', port: 7001 },
        { host: '::1', port: 7002 },
      ],
      username: 'fleet',
      password: 'p@ss',
      tls: false,
    });
    expect(parseClusterUrl('rediss+cluster://:pw@h:7000')).to.deep.include({ username: undefined, password: 'pw', tls: true });
    expect(isClusterUrl('REDIS+CLUSTER://h:1')).to.equal(true);
    expect(isClusterUrl('redis://h:6379')).to.equal(false);
  });

  it('refuses a node without a port, a path or query, another scheme', () => {
    expect(() => parseClusterUrl('redis+cluster://h1:7000,h2')).to.throw(/seed node 2 must be host:port/);
    expect(() => parseClusterUrl('redis+cluster://h1:7000/0')).to.throw(/no path/);
    expect(() => parseClusterUrl('redis+cluster://h1:7000?x=1')).to.throw(/no path/);
    expect(() => parseClusterUrl('redis://h1:7000')).to.throw(/scheme/);
  });

  it('finds the hash tag Redis would hash every key under the prefix by', () => {
    expect(prefixHashTag('{fleet}')).to.equal('fleet');
    expect(prefixHashTag('acme-{builds}-x')).to.equal('builds');
    for (const none of ['fleet', '{}fleet', 'fleet{', 'a}b{', '{}{x}']) expect(prefixHashTag(none), none).to.equal(null);
  });

  it('describes a cluster by its seed nodes, never its password', () => {
    expect(describeServer('Redis', 'redis+cluster://u:hunter2@h1:7000,[::1]:7001/')).to.equal('Redis Cluster at h1:7000,[::1]:7001');
  });
});
