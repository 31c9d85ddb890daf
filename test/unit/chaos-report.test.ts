/**
 * The chaos report's judgements on several hosts: sweep ticks counted from the workers' JSON logs (a tick started
 * twice fails the run), and the partition and failover promises (held jobs again within 15 s, a cut-off leader
 * replaced and publishing within 30 s, failed-over masters back).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import type { FailoverEvent, PartitionRecord, PgFailoverEvent } from '../../chaos/host-faults';
import { failoverLosses, hostsHeld, pgFailoverLosses, type HostsReport } from '../../chaos/report';
import { countSweeps } from '../../chaos/sweeps';

function logFile(lines: readonly string[]): string {
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-sweeps-')), 'workers.log');
  fs.writeFileSync(file, `${lines.join('\n')}\n`);
  return file;
}

const started = (tick: number) => JSON.stringify({ level: 30, msg: 'sweep tick started', tick: String(tick), jobId: `repeat:sweep:${tick}` });
const refused = (tick: number) =>
  JSON.stringify({ level: 40, msg: 'sweep tick delivered again after it started: not run twice', tick: String(tick) });

describe('chaos report: sweep ticks from the workers logs', () => {
  it('counts each tick once, a refused redelivery apart, and the ticks between that never started', () => {
    const file = logFile([started(10_000), 'not json', started(15_000), refused(15_000), started(25_000), '{"msg":"sweep","tick":"25000"}']);
    expect(countSweeps(file, 5)).to.deep.equal({ ticks: 3, startedTwice: 0, refused: 1, missing: 1 });
  });

  it('reports a tick that started twice', () => {
    const file = logFile([started(10_000), started(15_000), started(15_000)]);
    expect(countSweeps(file, 5).startedTwice).to.equal(1);
  });

  it('reads a missing log as no ticks', () => {
    expect(countSweeps(path.join(os.tmpdir(), 'no-such-dir-fleet', 'workers.log'), 5)).to.deep.equal({
      ticks: 0,
      startedTwice: 0,
      refused: 0,
      missing: 0,
    });
  });
});

describe('chaos report: partitions and failovers', () => {
  const partition = (p: Partial<PartitionRecord>): PartitionRecord => ({
    host: 'w1',
    atS: 10,
    ledRelay: false,
    inFlight: 3,
    rerunMaxMs: 9000,
    notRerun: 0,
    takeoverMs: null,
    firstPublishMs: null,
    durationMs: 20_000,
    consumers: [],
    ...p,
  });
  const failover = (f: Partial<FailoverEvent>): FailoverEvent => ({
    atS: 30,
    killed: 7001,
    promoted: 7004,
    tookMs: 8000,
    rejoinedAfterMs: 11_000,
    ackedLost: 0,
    ...f,
  });
  const pgFailover = (f: Partial<PgFailoverEvent>): PgFailoverEvent => ({
    atS: 40,
    killed: 'node1',
    promoted: 'node2',
    sync: true,
    cutReplicationMs: 1500,
    activeAtCut: 8,
    promotedMs: 9000,
    addressMovedMs: 9100,
    writableMs: 9200,
    fleetAppliedMs: 9800,
    rejoinedAfterMs: 20_000,
    twoPrimaries: 0,
    decidedBefore: 1000,
    ackedLost: 0,
    inFlightKept: 2,
    ...f,
  });
  const report = (partitions: PartitionRecord[], failovers: FailoverEvent[] = [], pgFailovers: PgFailoverEvent[] = []): HostsReport => ({
    partitions,
    failovers,
    pgFailovers,
    activity: [{ host: 'w1', finished: 1, lastS: 1, probed: 1 }],
  });

  it('holds when held jobs ran again within 15 s and a cut-off leader was replaced and published within 30 s', () => {
    expect(hostsHeld(null)).to.equal(true);
    expect(
      hostsHeld(
        report([partition({}), partition({ ledRelay: true, inFlight: 0, rerunMaxMs: null, takeoverMs: 9000, firstPublishMs: 9500 })], [failover({})]),
      ),
    ).to.equal(true);
  });

  it('fails on a held job later than 15 s, one that never ran again, a leader not replaced in time, a master that never came back, a host that stopped taking jobs', () => {
    expect(hostsHeld(report([partition({ rerunMaxMs: 15_001 })]))).to.equal(false);
    expect(hostsHeld(report([partition({ notRerun: 1 })]))).to.equal(false);
    expect(hostsHeld(report([partition({ ledRelay: true, firstPublishMs: null })]))).to.equal(false);
    expect(hostsHeld(report([partition({ ledRelay: true, takeoverMs: 31_000, firstPublishMs: 31_000 })]))).to.equal(false);
    expect(hostsHeld(report([], [failover({ rejoinedAfterMs: null })]))).to.equal(false);
    expect(
      hostsHeld({ ...report([]), activity: [{ host: 'w1', finished: 10, lastS: 5, probed: 0 }] }),
      'a host that took no job after the faults',
    ).to.equal(false);
  });

  it('holds across a PostgreSQL failover only with the old primary back as a standby, never two primaries, and the fleet applying again', () => {
    expect(hostsHeld(report([], [], [pgFailover({})]))).to.equal(true);
    expect(hostsHeld(report([], [], [pgFailover({ rejoinedAfterMs: null })])), 'old primary not back').to.equal(false);
    expect(hostsHeld(report([], [], [pgFailover({ twoPrimaries: 1 })])), 'two primaries at once').to.equal(false);
    expect(hostsHeld(report([], [], [pgFailover({ fleetAppliedMs: null })])), 'the fleet never applied again').to.equal(false);
    expect(pgFailoverLosses(report([], [], [pgFailover({ ackedLost: 4 }), pgFailover({ ackedLost: 3 })]))).to.equal(7);
  });

  it('adds up what the failovers lost, ignoring a count that could not be made', () => {
    expect(failoverLosses(report([], [failover({ ackedLost: 2 }), failover({ ackedLost: -1 }), failover({ ackedLost: 3 })]))).to.equal(5);
  });
});
