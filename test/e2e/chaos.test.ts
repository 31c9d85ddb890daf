import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import type { ChaosReport } from '../../chaos/run';
import { openTestDatabase } from '../helpers/db';
import { OwnRedis } from '../helpers/redis-server';
import { uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';
import { repoRoot } from '../../src/util';
import { netnsUnavailable } from '../../dev/netns';
import { pgFailoverUnavailable } from '../../dev/pg-failover';

const ROOT = repoRoot();

/** Runs `npm run chaos` (the built runner) with `args`; its report, its stdout (the report as text) and exit code. */
async function runChaos(args: readonly string[]): Promise<{ report: ChaosReport; out: string; code: number | null }> {
  const jsonFile = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-chaos-')), 'report.json');
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env.REDIS_URL;
  delete env.DATABASE_URL;
  const child = spawn(process.execPath, [path.join(ROOT, 'dist', 'chaos', 'run.js'), ...args, '--json', jsonFile], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (err += chunk.toString()));
  const code = await new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
  expect(fs.existsSync(jsonFile), `no report; stderr:\n${err}`).to.equal(true);
  const report = JSON.parse(fs.readFileSync(jsonFile, 'utf8')) as ChaosReport;
  fs.rmSync(path.dirname(jsonFile), { recursive: true, force: true });
  process.stdout.write(out.replace(/^/gm, '      '));
  return { report, out, code };
}

/** What every chaos run must show: nothing lost, nothing twice, no gap, the checker clean, each sweep tick once. */
function expectClean(report: ChaosReport, out: string): void {
  expect(report.events.lost, out).to.equal(0);
  expect(report.appliedTwice, out).to.equal(0);
  expect(report.streamGaps, out).to.equal(0);
  expect(report.events.wrongOutcome, out).to.equal(0);
  expect(report.deployments.wrongFinalState, out).to.equal(0);
  expect(report.checker.violations, out).to.deep.equal([]);
  expect(report.sweeps.startedTwice, out).to.equal(0);
  // the audit consumer stops only to resync (its position lost with a wipe, a trim or a failover), never on an outage
  expect(report.consumers.auditStops.other, out).to.equal(0);
  // the consumer group: every version handled, per deployment in order, one owner per partition at a time; its members
  // stopped only to resync; it read the stream to its end; and its faults happened
  const group = report.group;
  expect(group.check.violations, out).to.deep.equal([]);
  expect(group.members.exits.other, out).to.equal(0);
  expect(group.drained, out).to.equal(true);
  expect(group.check.calls, out).to.be.above(1000);
  expect(group.faults.joins, out).to.be.at.least(1);
  expect(group.faults.kills, out).to.be.at.least(1);
  expect(group.faults.pauses, out).to.be.at.least(1);
}

/**
 * The CI variant of `npm run chaos`: its own Redis and PostgreSQL (under .fleet/chaos-test, so it can kill and
 * restart them without touching the suite's), three worker processes, a stream of 4 partitions read by a consumer
 * group of 2-3 processes, about 75 s of faults, then the accounting.
 */
describe('chaos (CI variant)', function () {
  this.timeout(200_000);

  it('loses nothing, applies nothing twice and leaves no stream gap under crashes, restarts and duplicates', async () => {
    const { report, out, code } = await runChaos(['--ci', '--dir', path.join(ROOT, '.fleet', 'chaos-test')]);
    expectClean(report, out);
    // a consumer held behind the trim point reports resync, never skips
    expect(report.consumers.skipped, out).to.equal(0);
    expect(report.consumers.resyncs, out).to.be.at.least(1);
    expect(report.timings.drainAfterLastFaultS, out).to.be.a('number');
    // it was a real run: thousands of events, every kind of fault, the relay leader killed
    expect(report.events.sent).to.be.above(2000);
    expect(report.events.applied).to.be.above(1000);
    expect(report.events.rejected).to.be.above(0);
    expect(Object.keys(report.faults.byKind)).to.have.members([
      'kill-worker',
      'kill-relay-leader',
      'redis-restart',
      'postgres-restart',
      'terminate-backends',
      'redis-client-kill',
      'redelivery-burst',
      'replay-burst',
      'redis-wipe',
      'consumer-held',
      'consumer-join',
      'consumer-kill',
      'consumer-pause',
    ]);
    expect(report.faults.leaderKills).to.be.at.least(1);
    expect(report.options.streamPartitions, 'the stream is partitioned').to.equal(4);
    expect(report.sweeps.ticks, out).to.be.above(5);
    expect(report.ok).to.equal(true);
    expect(code).to.equal(0);
  });

  it('on 3 hosts with a Redis Cluster and PostgreSQL failing over: partitions and failovers lose nothing, and work moves on in time', async function () {
    const why = netnsUnavailable();
    if (why !== null) {
      process.stdout.write(`      SKIPPED: chaos on several hosts cannot run here: ${why}\n`);
      this.skip();
    }
    this.timeout(540_000);
    const noPgFailover = pgFailoverUnavailable();
    if (noPgFailover !== null) process.stdout.write(`      SKIPPED (its PostgreSQL failovers only): ${noPgFailover}\n`);
    const { report, out, code } = await runChaos([
      ...['--ci', '--hosts', '3', '--redis-cluster', '--dir', path.join(ROOT, '.fleet', 'chaos-hosts-test')],
      ...(noPgFailover === null ? ['--pg-failover'] : []),
    ]);
    expect(report.options.durable, 'durable enqueue is on with a cluster').to.equal(true);
    expectClean(report, out);
    const hosts = report.hosts;
    if (hosts === null) throw new Error('no hosts section in the report');
    // the faults happened: worker hosts and the relay leader's host cut off, the fleet's master failed over
    expect(hosts.partitions.length, out).to.be.at.least(2);
    expect(hosts.partitions.filter((p) => p.ledRelay).length, out).to.be.at.least(1);
    expect(hosts.failovers.length, out).to.be.at.least(2);
    // a member of the consumer group runs on every worker host: each cut cut one off
    expect(hosts.partitions.filter((p) => p.consumers.length > 0).length, out).to.be.at.least(2);
    for (const p of hosts.partitions) {
      expect(p.notRerun, out).to.equal(0);
      if (p.rerunMaxMs !== null) expect(p.rerunMaxMs, out).to.be.at.most(15_000);
      if (p.ledRelay) {
        expect(p.takeoverMs, out).to.be.a('number').and.at.most(30_000);
        expect(p.firstPublishMs, out).to.be.a('number').and.at.most(30_000);
      }
    }
    for (const f of hosts.failovers) {
      expect(f.ackedLost, out).to.equal(0);
      expect(f.rejoinedAfterMs, out).to.be.a('number');
    }
    if (noPgFailover === null) {
      // PostgreSQL failed over (synchronous replication): the promoted standby has every event the primary had
      // decided, the fleet applied events on it, and the old primary came back as a standby, never beside it
      expect(report.options.pgSync, out).to.equal(true);
      expect(report.faults.byKind['postgres-failover'], out).to.be.at.least(1);
      expect(hosts.pgFailovers.length, out).to.equal(report.faults.byKind['postgres-failover']);
      for (const f of hosts.pgFailovers) {
        expect(f.decidedBefore, out).to.be.above(0);
        expect(f.ackedLost, out).to.equal(0);
        expect(f.twoPrimaries, out).to.equal(0);
        expect(f.fleetAppliedMs, out).to.be.a('number');
        expect(f.rejoinedAfterMs, out).to.be.a('number');
      }
    }
    expect(report.ok).to.equal(true);
    expect(code).to.equal(0);
  });

  it('a worker stopped while Redis is down says so once and exits without waiting out its grace period', async () => {
    const redis = await OwnRedis.start();
    const db = await openTestDatabase(2);
    try {
      const child = spawn(process.execPath, [path.join(ROOT, 'bin', 'fleet.js'), 'worker'], {
        env: { ...process.env, REDIS_URL: redis.url, DATABASE_URL: db.url, FLEET_PREFIX: uniquePrefix(), LOG_LEVEL: 'info' },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let out = '';
      child.stdout.on('data', (c: Buffer) => (out += c.toString()));
      child.stderr.on('data', (c: Buffer) => (out += c.toString()));
      const exited = new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
      await waitFor('the worker to start', () => (out.includes('worker started') ? true : undefined));
      await redis.kill('SIGKILL');
      // stop it once it has seen Redis go (its reconnect attempts fail and are logged), not after a guessed pause
      await waitFor('the worker to see Redis gone', () => (out.includes('lost Redis at') ? true : undefined));
      const stoppedAt = Date.now();
      child.kill('SIGTERM');
      // nothing in flight can be acknowledged without Redis: the worker stops at once instead of waiting its 30 s
      const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
      const code = await exited;
      clearTimeout(timer);
      // exit code 0: it ended by itself (the safety SIGKILL above would leave no code); how long it took is printed,
      // not asserted (the machine's load is not the test's to control)
      const tookMs = Date.now() - stoppedAt;
      expect(code, out.slice(-2000)).to.equal(0);
      process.stdout.write(`      (exited ${tookMs} ms after SIGTERM)\n`);
      // well inside the 30 s grace it would otherwise wait (a bound this loose holds on any machine)
      expect(tookMs, out.slice(-2000)).to.be.below(15_000);
      // one line for the outage, whichever components saw it; no stack traces, no unhandled error events
      expect(out.split('lost Redis at 127.0.0.1:').length - 1, out.slice(-3000)).to.equal(1);
      expect(out).to.not.include('Unhandled error event');
      expect(out).to.include('is away: stopping without waiting for in-flight jobs');
    } finally {
      await redis.stop();
      await db.close();
    }
  });
});
