/**
 * The hosts harness (dev/netns.ts): Redis on one "host", a client on another, each in a network namespace of its
 * own on one bridge. Partitioning the client's host cuts it off from Redis while everything else still reaches it;
 * healing brings it back. Skipped, saying why, where namespaces cannot be made (not root, no iproute2).
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import IORedis from 'ioredis';
import { NetnsLab, netnsUnavailable } from '../../dev/netns';
import { repoRoot } from '../../src/util';
import { waitFor } from '../helpers/wait';

describe('hosts as network namespaces: partition and heal', function () {
  this.timeout(30_000);
  let lab: NetnsLab | null = null;

  before(function () {
    const why = netnsUnavailable();
    if (why !== null) {
      process.stdout.write(`      SKIPPED: the hosts harness cannot run here: ${why}\n`);
      this.skip();
    }
  });
  after(async () => {
    await lab?.destroy();
  });

  it('cuts a partitioned host off from Redis on another host, leaves the rest connected, and heals it', async () => {
    lab = NetnsLab.create(`t${process.pid % 10_000}`, ['redis', 'w1'], 20 + (process.pid % 200));
    const redisHost = lab.host('redis');
    lab.spawn(
      'redis',
      'redis-server',
      ['--port', '6399', '--bind', redisHost.address, '--protected-mode', 'no', '--save', '', '--appendonly', 'no'],
      { stdio: 'ignore' },
    );
    const fromRoot = new IORedis({ host: redisHost.address, port: 6399, maxRetriesPerRequest: 1, commandTimeout: 1000, lazyConnect: true });
    fromRoot.on('error', () => undefined);
    try {
      await waitFor('Redis on its host to answer', async () => ((await fromRoot.ping().catch(() => null)) === 'PONG' ? true : undefined));

      // a client on host w1 that pings every 100 ms and says how each went
      const script = `
        const IORedis = require('ioredis');
        const r = new IORedis({ host: ${JSON.stringify(redisHost.address)}, port: 6399, maxRetriesPerRequest: 0, commandTimeout: 300, enableOfflineQueue: false });
        r.on('error', () => undefined);
        setInterval(() => r.ping().then(() => console.log('ok'), () => console.log('err')), 100);`;
      const client = lab.spawn('w1', process.execPath, ['-e', script], { cwd: repoRoot(), stdio: ['ignore', 'pipe', 'inherit'] });
      let lines: string[] = [];
      client.stdout?.on('data', (chunk: Buffer) =>
        lines.push(
          ...chunk
            .toString()
            .split('\n')
            .filter((l) => l !== ''),
        ),
      );
      const sawAfterReset = (what: string, n: number) =>
        waitFor(`${n} "${what}" from w1`, () => (lines.filter((l) => l === what).length >= n ? true : undefined));

      await sawAfterReset('ok', 3);
      lab.partition('w1');
      lines = [];
      await sawAfterReset('err', 3);
      expect(await fromRoot.ping(), 'the rest still reach Redis').to.equal('PONG');
      lab.heal('w1');
      lines = [];
      await sawAfterReset('ok', 3);
    } finally {
      fromRoot.disconnect();
    }
  });

  it("refuses a lab name a live run holds (rather than tear that run's lab down), and takes over a killed run's", async () => {
    const name = `u${process.pid % 10_000}`;
    const subnet = 21 + (process.pid % 200); // never the other test's
    const claim = path.join(os.tmpdir(), `lifecycle-fleet-netns-${name}.pid`);
    const holder = spawn('sleep', ['60'], { stdio: 'ignore' });
    try {
      fs.writeFileSync(claim, String(holder.pid));
      expect(() => NetnsLab.create(name, ['a'], subnet)).to.throw(`netns lab ${name} is in use by process ${holder.pid}`);
      expect(fs.readFileSync(claim, 'utf8')).to.equal(String(holder.pid));
    } finally {
      holder.kill('SIGKILL');
      await once(holder, 'exit');
    }
    // the holder is gone, as a SIGKILLed run is: its claim is taken over
    const taken = NetnsLab.create(name, ['a'], subnet);
    expect(fs.readFileSync(claim, 'utf8')).to.equal(String(process.pid));
    await taken.destroy();
    expect(fs.existsSync(claim)).to.equal(false);
  });
});
