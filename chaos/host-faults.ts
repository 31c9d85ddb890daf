/**
 * The faults of a run on several hosts (`--hosts`, `--redis-cluster`), and what they measure:
 * - `partition-worker`: a worker host's link goes down for `partitionS` (the host lives on, its sockets open), then
 *   comes back. Measured: the jobs it held when cut off, and how long until each ran again elsewhere (re-taken by
 *   another worker, or finished); the promise is 15 s.
 * - `partition-relay-leader`: the same, for the host whose relay holds the outbox lock. Measured too: how long until
 *   another host's relay holds the lock, and until the stream moves again (another relay published); the promise
 *   is 30 s.
 * - `redis-failover`: the master serving the fleet's slot is SIGKILLed; its replica takes over after the cluster's
 *   node timeout; the old master comes back `restartAfterS` later and rejoins as a replica.
 * - `postgres-failover` (--pg-failover): the PostgreSQL primary's link to its standby is cut for 1.5 s (the standby
 *   lacks what the primary does meanwhile: with synchronous replication those commits wait, without it they are
 *   acknowledged), its host SIGKILLed, the standby promoted by pg_auto_failover's monitor, the database's address
 *   moved (dev/pg-failover.ts); the old primary comes back as a standby `restartAfterS` later. Measured: the decided
 *   events of the primary's last view the promoted standby lacks (0 with sync), the recovery times, two primaries.
 * Each runs in the background (the schedule goes on injecting other faults meanwhile); one of each kind at a time (the
 * next waits for the last to heal).
 */
import * as os from 'node:os';
import type { Job } from 'bullmq';
import { sleep } from '../src/util';
import type { Fleet } from './fleet';
import type { ChaosLab } from './lab';
import { TAKEOVER_WITHIN_MS } from './report';

export interface PartitionRecord {
  readonly host: string;
  /** seconds into the run when the link went down */
  readonly atS: number;
  /** did this host's relay hold the outbox lock when it was cut off? */
  readonly ledRelay: boolean;
  /** lifecycle jobs the host's worker held when cut off */
  readonly inFlight: number;
  /** the longest time until one of them ran again elsewhere, ms (null: none in flight, or not within the partition) */
  readonly rerunMaxMs: number | null;
  /** of the in-flight jobs, how many had not run again elsewhere when the host came back */
  readonly notRerun: number;
  /** the leader's host cut off: until another host's relay held the lock (null: not the leader, or not within the partition) */
  readonly takeoverMs: number | null;
  /** the leader's host cut off: until the stream's last entry changed after the takeover (the new leader published) */
  readonly firstPublishMs: number | null;
  readonly durationMs: number;
  /** the consumer group's members that ran on the host when it was cut off */
  readonly consumers: readonly string[];
}

export interface FailoverEvent {
  readonly atS: number;
  readonly killed: number;
  readonly promoted: number;
  /** from the kill until the replica served the slot and the cluster was ok */
  readonly tookMs: number;
  /** the old master back as a replica after (null: still down / failed) */
  readonly rejoinedAfterMs: number | null;
  /**
   * events acknowledged to the producer before the kill whose job the promoted replica does not have and that
   * were never decided: lost by the failover (0 with durable enqueue)
   */
  readonly ackedLost: number;
}

/** A PostgreSQL failover (--pg-failover): the primary's host killed, the standby promoted, the address moved. */
export interface PgFailoverEvent {
  readonly atS: number;
  readonly killed: string;
  readonly promoted: string;
  /** synchronous replication on */
  readonly sync: boolean;
  /** the nodes' link was cut this long before the kill (the standby lacks what the primary did meanwhile) */
  readonly cutReplicationMs: number;
  /** lifecycle jobs the workers held when the link was cut (the cut waits up to 5 s for some) */
  readonly activeAtCut: number;
  /** from the kill until the monitor had promoted the standby */
  readonly promotedMs: number;
  /** from the kill until the database's address was on the new primary */
  readonly addressMovedMs: number;
  /** from the kill until a write through the address succeeded */
  readonly writableMs: number;
  /**
   * from the kill until a worker completed an event sent once the new primary took writes (null: not within 60 s):
   * the fleet at work on it again
   */
  readonly fleetAppliedMs: number | null;
  /** the old primary back as a standby of the new one after (null: it did not come back) */
  readonly rejoinedAfterMs: number | null;
  /** samples (every 200 ms, from the cut to the rejoin) in which both nodes took writes: must be 0 */
  readonly twoPrimaries: number;
  /** events decided in the primary's last view before the kill (read after the cut) */
  readonly decidedBefore: number;
  /** of those, decided no more on the promoted standby: acknowledged and lost (0 with synchronous replication) */
  readonly ackedLost: number;
  /**
   * decided on the promoted standby though not in that view: commits in flight at the kill that had reached the
   * standby (their acknowledgement may have been lost; a retry finds them decided)
   */
  readonly inFlightKept: number;
}

/** Counts events acknowledged before `before` (ms) that are gone: neither decided nor queued any more. */
export type AckedLostCheck = (before: number) => Promise<number>;

/** `fn`, tried again every 500 ms while it fails, up to `tries` times. */
async function retried<T>(fn: () => Promise<T>, tries = 20): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (err) {
      if (attempt >= tries) throw err;
      await sleep(500);
    }
  }
}

/** The relay that holds the outbox lock: its client address (the host), or null. */
async function relayLeaderAddress(fleet: Fleet): Promise<string | null> {
  const { rows } = await fleet.pool.query<{ addr: string | null }>(
    `SELECT host(a.client_addr) AS addr FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
      WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'lifecycle-fleet-relay'`,
  );
  return rows[0]?.addr ?? null;
}

/** The worker host whose relay leads, or null. */
export async function relayLeaderHost(fleet: Fleet, lab: ChaosLab): Promise<string | null> {
  const addr = await relayLeaderAddress(fleet).catch(() => null);
  return addr === null ? null : lab.hostOfAddress(addr);
}

/** The last entry id of every partition of the stream, joined ('' when all are empty or unreadable). */
async function streamTail(fleet: Fleet): Promise<string> {
  try {
    const tails = await Promise.all(
      fleet.partitionKeys.map(async (key) => ((await fleet.admin.xrevrange(key, '+', '-', 'COUNT', 1)) as Array<[string, string[]]>)[0]?.[0] ?? ''),
    );
    return tails.some((t) => t !== '') ? tails.join(',') : '';
  } catch {
    return '';
  }
}

/** The jobs each worker host finished, and when it last did. */
export interface HostActivity {
  readonly host: string;
  /** lifecycle jobs it finished (of the queue's last 10,000 kept) */
  readonly finished: number;
  /** the last time it finished one, seconds into the run (null: never) */
  readonly lastS: number | null;
  /** of the liveness probe's jobs after the faults (sent one at a time, each to an idle fleet), how many it took */
  readonly probed: number;
}

export class HostFaults {
  readonly partitions: PartitionRecord[] = [];
  readonly failovers: FailoverEvent[] = [];
  readonly pgFailovers: PgFailoverEvent[] = [];
  private partitioning: Promise<void> | null = null;
  private failingOver: Promise<void> | null = null;
  private pgFailingOver: Promise<void> | null = null;

  constructor(
    private readonly fleet: Fleet,
    private readonly lab: ChaosLab,
    private readonly partitionS: number,
    private readonly elapsedS: () => number,
    private readonly say: (line: string) => void,
    private readonly ackedLost: AckedLostCheck,
    /** the consumer group's members running on a host */
    private readonly consumersOn: (host: string) => readonly string[] = () => [],
    private readonly restartAfterS = 5,
    /** the replica is stopped this long before its master is killed: it lacks the master's last writes */
    private readonly replicaLagMs = 1500,
  ) {}

  /**
   * Cuts a worker host off (the relay leader's host when `leader`) for `partitionS`, in the background. `busy` is
   * called first (a burst of work), and the cut waits up to 3 s for the host's worker to hold jobs, so that there
   * are jobs in flight to watch run again elsewhere.
   */
  async partition(leader: boolean, pick: (hosts: string[]) => string, busy: () => void): Promise<string> {
    await this.partitioning; // one partition at a time
    await this.pgFailingOver; // and not while PostgreSQL fails over (below)
    const workers = this.fleet.workers;
    const hosts = [...this.lab.workerHosts];
    let host: string | null = null;
    if (leader) {
      for (let i = 0; i < 10 && host === null; i++) {
        if (i > 0) await sleep(500);
        host = await relayLeaderHost(this.fleet, this.lab);
      }
      if (host === null) return 'relay leader not found; nothing cut off';
    } else {
      host = pick(hosts);
    }
    const slot = hosts.indexOf(host);
    const pid = workers.pidOf(slot);
    const name = pid === null ? null : `${os.hostname()}:${pid}`;
    const heldBy = async (): Promise<string[]> =>
      name === null ? [] : (await this.fleet.queue.getActive().catch(() => [])).filter((j) => j.processedBy === name).map((j) => j.id ?? '');
    busy();
    const busyWorkers = new Set<string>();
    for (let waited = 0; waited < 3000; waited += 50) {
      const active = await this.fleet.queue.getActive().catch(() => []);
      for (const j of active) if (j.processedBy !== undefined) busyWorkers.add(this.hostOfWorker(j.processedBy));
      if (active.some((j) => j.processedBy === name)) break;
      await sleep(50);
    }
    const tail = await streamTail(this.fleet);
    const consumers = this.consumersOn(host);
    const cutAt = Date.now();
    const atS = Number(this.elapsedS().toFixed(1));
    this.lab.partition(host);
    // the leader's host stays cut off until the takeover's deadline, so the watch can see it (another fault, such as a
    // PostgreSQL crash, may delay it within that)
    const forS = leader ? Math.max(this.partitionS, TAKEOVER_WITHIN_MS / 1000 + 2) : this.partitionS;
    // what Redis sees it hold once it is cut off: these can only finish by running again elsewhere
    const held = await heldBy();
    const target = host;
    this.partitioning = this.watch({ host: target, name, held, tail, cutAt, atS, ledRelay: leader, forS, consumers }).finally(() => {
      this.partitioning = null;
    });
    const others = held.length === 0 ? ` (workers seen holding jobs just before: ${[...busyWorkers].join(', ') || 'none'})` : '';
    const members = consumers.length === 0 ? '' : `; consumers ${consumers.join(', ')} cut off with it`;
    return `${target} cut off for ${forS} s${leader ? ' (its relay led)' : ''}; its worker held ${held.length} jobs${others}${members}`;
  }

  private async watch(p: {
    host: string;
    name: string | null;
    held: string[];
    tail: string;
    cutAt: number;
    atS: number;
    ledRelay: boolean;
    forS: number;
    consumers: readonly string[];
  }): Promise<void> {
    const until = p.cutAt + p.forS * 1000;
    const rerunAt = new Map<string, number>();
    const finishedBeforeCut = new Set<string>();
    let takeoverAt: number | null = null;
    let publishedAt: number | null = null;
    let tailAtTakeover = p.tail;
    while (Date.now() < until) {
      for (const id of p.held) {
        if (rerunAt.has(id) || finishedBeforeCut.has(id)) continue;
        const job: Job | undefined = await this.fleet.queue.getJob(id).catch(() => undefined);
        if (job !== undefined && job.processedBy === p.name && job.finishedOn !== undefined && job.finishedOn <= p.cutAt + 50) {
          finishedBeforeCut.add(id); // its worker finished it as the link went down: it was not in flight
          continue;
        }
        // gone (removed on completion), finished, or taken by another worker: it ran again elsewhere
        if (job === undefined || job.finishedOn !== undefined || (job.processedBy !== undefined && job.processedBy !== p.name))
          rerunAt.set(id, Date.now());
      }
      if (p.ledRelay) {
        if (takeoverAt === null) {
          const addr = await relayLeaderAddress(this.fleet).catch(() => null);
          if (addr !== null && this.lab.hostOfAddress(addr) !== p.host) {
            takeoverAt = Date.now();
            tailAtTakeover = await streamTail(this.fleet);
          }
        } else if (publishedAt === null) {
          // a new last entry on a partition after the takeover: the new leader appended (a wipe or failover empties it: not that)
          const tail = await streamTail(this.fleet);
          if (tail !== '' && tail !== tailAtTakeover) publishedAt = Date.now();
        }
      }
      await sleep(200);
    }
    this.lab.heal(p.host);
    const times = [...rerunAt.values()].map((t) => t - p.cutAt);
    const record: PartitionRecord = {
      host: p.host,
      atS: p.atS,
      ledRelay: p.ledRelay,
      inFlight: p.held.length - finishedBeforeCut.size,
      rerunMaxMs: times.length === 0 ? null : Math.max(...times),
      notRerun: p.held.length - finishedBeforeCut.size - rerunAt.size,
      takeoverMs: takeoverAt === null ? null : takeoverAt - p.cutAt,
      firstPublishMs: publishedAt === null ? null : publishedAt - p.cutAt,
      durationMs: Date.now() - p.cutAt,
      consumers: p.consumers,
    };
    this.partitions.push(record);
    const relay = p.ledRelay
      ? `; relay taken over after ${String(record.takeoverMs)} ms, stream moved after ${String(record.firstPublishMs)} ms`
      : '';
    this.say(`healed ${p.host}: ${record.inFlight} held jobs, ${rerunAt.size} ran again elsewhere (longest ${String(record.rerunMaxMs)} ms)${relay}`);
  }

  /**
   * Fails over the master of the fleet's slot, in the background: the kill now, then its replica's takeover, then
   * the old master back as a replica `restartAfterS` later. None while the last one is still healing.
   */
  async failover(): Promise<string> {
    const cluster = this.fleet.cluster;
    if (cluster === null) return 'no Redis Cluster';
    // one at a time: on a busy machine a failover and its old master's rejoin can outlast the next one's turn
    const waitedFrom = Date.now();
    await this.failingOver;
    const waited = Date.now() - waitedFrom > 100 ? ` (after the last one healed, ${((Date.now() - waitedFrom) / 1000).toFixed(1)} s)` : '';
    const port = await cluster.masterFor(this.fleet.streamKey);
    const atS = Number(this.elapsedS().toFixed(1));
    const killedAt = Date.now();
    const run = async (): Promise<void> => {
      const done = await cluster.failover(port, { replicaLagMs: this.replicaLagMs });
      // (PostgreSQL, which it reads, may be failing over itself: up to 30 s of tries)
      const ackedLost = await retried(() => this.ackedLost(killedAt), 60).catch((err: unknown) => {
        this.say(`could not count what the failover lost: ${err instanceof Error ? err.message : String(err)}`);
        return -1;
      });
      this.say(`failover: replica ${done.promoted} took over from ${done.killed} after ${done.tookMs} ms; ${ackedLost} acknowledged events lost`);
      await sleep(this.restartAfterS * 1000);
      const started = Date.now();
      let rejoinedAfterMs: number | null = null;
      try {
        await cluster.restart(done.killed);
        rejoinedAfterMs = this.restartAfterS * 1000 + Date.now() - started;
      } catch (err) {
        this.say(`old master ${done.killed} did not rejoin: ${err instanceof Error ? err.message : String(err)}`);
      }
      this.failovers.push({ atS, ...done, rejoinedAfterMs, ackedLost });
    };
    this.failingOver = run()
      .catch((err: unknown) => this.say(`failover of ${port} failed: ${err instanceof Error ? err.message : String(err)}`))
      .finally(() => {
        this.failingOver = null;
      });
    return `master ${port} (the fleet's slot) SIGKILLed${waited}; its replica takes over after the node timeout, the old master comes back ${this.restartAfterS} s later`;
  }

  /**
   * Fails PostgreSQL over, in the background: the nodes' link cut for `cutReplicationMs`, the primary's host
   * SIGKILLed, the standby promoted by the monitor, the address moved; then what the promoted standby lacks of the
   * primary's last view, how long until the fleet applied an event again, and the old primary back as a standby
   * `restartAfterS` later. None while the last one is still healing.
   */
  async pgFailover(probe: () => Promise<string>, cutReplicationMs = 1500): Promise<string> {
    const pg = this.lab.pg;
    if (pg === null) return 'PostgreSQL does not fail over in this run (no --pg-failover)';
    const waitedFrom = Date.now();
    await this.pgFailingOver;
    // every worker host connected when the primary dies: one host fault at a time (a host cut off meanwhile keeps
    // statements it sent into the cut waiting on TCP's retransmissions until the pool's deadline, 35 s:
    // docs/postgres-failover.md, "Known limits")
    await this.partitioning;
    const waited = Date.now() - waitedFrom > 100 ? ` (after the last one healed, ${((Date.now() - waitedFrom) / 1000).toFixed(1)} s)` : '';
    const atS = Number(this.elapsedS().toFixed(1));
    const from = pg.primaryName;
    let before: Set<string> | null = null;
    let activeAtCut = 0;
    const run = async (): Promise<void> => {
      const done = await pg.failover({
        cutReplicationMs,
        // the cut meets the fleet at work (up to 5 s for a worker to hold jobs): with sync their commits wait, without
        // it they are acknowledged and the standby lacks them
        beforeCut: async () => {
          for (let waited = 0; waited < 5000; waited += 100) {
            activeAtCut = await this.fleet.queue.getActiveCount().catch(() => 0);
            if (activeAtCut > 0) return;
            await sleep(100);
          }
        },
        // the primary's last view, read after the cut (with sync, what commits meanwhile waits and is not in it)
        beforeKill: async () => {
          const { rows } = await this.fleet.pool.query<{ event_id: string }>('SELECT event_id FROM processed_events');
          before = new Set(rows.map((r) => r.event_id));
        },
      });
      const seen: Set<string> = before ?? new Set<string>();
      // the runner's pool may still hold a connection to the dead primary: its first query can fail
      const { rows } = await retried(() =>
        this.fleet.pool.query<{ event_id: string; early: boolean }>(
          `SELECT event_id, processed_at <= to_timestamp($1::double precision / 1000) AS early FROM processed_events`,
          [done.killedAt],
        ),
      );
      const after = new Set(rows.map((r) => r.event_id));
      const ackedLost = [...seen].filter((id) => !after.has(id)).length;
      const inFlightKept = rows.filter((r) => r.early && !seen.has(r.event_id)).length;
      // the fleet at work on the new primary: an event sent once it takes writes (a decided one again, under a new
      // job id: a read of its claim on the new primary) and completed by a worker
      let fleetAppliedMs: number | null = null;
      const probeJob = await probe().catch(() => null);
      for (const until = Date.now() + 60_000; probeJob !== null && fleetAppliedMs === null && Date.now() < until;) {
        const job = await this.fleet.queue.getJob(probeJob).catch(() => undefined);
        if (job?.finishedOn !== undefined && job.failedReason === undefined) fleetAppliedMs = job.finishedOn - done.killedAt;
        else await sleep(100);
      }
      this.say(
        `postgres failover: ${done.promoted} promoted ${done.promotedMs} ms after ${done.killed} was killed, writable through the address after ` +
          `${done.writableMs} ms, the fleet applying again after ${fleetAppliedMs ?? '-'} ms; ${ackedLost} of ${seen.size} decided events lost, ${inFlightKept} in-flight commits kept`,
      );
      await sleep(this.restartAfterS * 1000);
      let rejoinedAfterMs: number | null = null;
      let twoPrimaries = done.twoPrimaries;
      try {
        const back = await pg.rejoin();
        rejoinedAfterMs = Date.now() - done.killedAt;
        twoPrimaries += back.twoPrimaries;
      } catch (err) {
        this.say(`old primary ${done.killed} did not come back as a standby: ${err instanceof Error ? err.message : String(err)}`);
      }
      const { killedAt: _killedAt, ...record } = done;
      this.pgFailovers.push({
        atS,
        ...record,
        sync: pg.sync,
        activeAtCut,
        fleetAppliedMs,
        rejoinedAfterMs,
        twoPrimaries,
        decidedBefore: seen.size,
        ackedLost,
        inFlightKept,
      });
    };
    this.pgFailingOver = run()
      .catch((err: unknown) => this.say(`postgres failover failed: ${err instanceof Error ? err.message : String(err)}`))
      .finally(() => {
        this.pgFailingOver = null;
      });
    return `PostgreSQL primary ${from}: its link to the standby cut for ${cutReplicationMs} ms, then its host SIGKILLed${waited}; the monitor promotes the standby, the address moves, the old primary comes back as a standby ${this.restartAfterS} s later`;
  }

  /** Waits for a PostgreSQL failover under way to end (its old primary back as a standby). */
  async pgFailoverHealed(): Promise<void> {
    await this.pgFailingOver;
  }

  /**
   * Which worker host finished how many lifecycle jobs, and when last (from the jobs the queue keeps, by their
   * `processedBy`): a worker that stopped taking jobs after a fault shows as a host whose last job is long before
   * the end. `t0` is the run's start (ms).
   */
  async activity(t0: number, probed: ReadonlyMap<string, number> = new Map()): Promise<HostActivity[]> {
    const finished = await this.fleet.queue.getJobs(['completed', 'failed'], 0, 9999).catch(() => []);
    const byHost = new Map<string, { finished: number; last: number }>();
    for (const job of finished) {
      if (job.processedBy === undefined || job.finishedOn === undefined) continue;
      const host = this.hostOfWorker(job.processedBy);
      const seen = byHost.get(host) ?? { finished: 0, last: 0 };
      byHost.set(host, { finished: seen.finished + 1, last: Math.max(seen.last, job.finishedOn) });
    }
    return [...this.lab.workerHosts].map((host) => {
      const seen = byHost.get(host);
      const lastS = seen === undefined ? null : Number(((seen.last - t0) / 1000).toFixed(1));
      return { host, finished: seen?.finished ?? 0, lastS, probed: probed.get(host) ?? 0 };
    });
  }

  /**
   * After the faults, with every host connected: jobs sent one at a time, each once the last was finished, so each
   * meets an idle fleet and goes to the worker that has waited longest (Redis serves blocked clients first come,
   * first served). Every live worker takes its turn; one that stopped taking jobs takes none. It sends at least
   * `count` and goes on until every host took one, for up to `withinMs`: a host healed moments ago may still be in
   * TCP's retransmission backoff, and a worker whose fetch loop is stuck is found by its watchdog (30 s of others'
   * work) and restarted by its supervisor. `send(n)` enqueues the n-th and returns its job id.
   */
  async probeLiveness(send: (n: number) => Promise<string>, count = 30, withinMs = 60_000): Promise<Map<string, number>> {
    const took = new Map<string, number>();
    const hosts = this.lab.workerHosts.length;
    const deadline = Date.now() + withinMs;
    for (let n = 0; n < count || (took.size < hosts && Date.now() < deadline); n++) {
      const id = await send(n);
      for (let waited = 0; waited < 10_000; waited += 20) {
        const job = await this.fleet.queue.getJob(id).catch(() => undefined);
        if (job?.finishedOn !== undefined && job.processedBy !== undefined) {
          const host = this.hostOfWorker(job.processedBy);
          took.set(host, (took.get(host) ?? 0) + 1);
          break;
        }
        await sleep(20);
      }
      if (took.size < hosts) await sleep(100); // spread over time, so that a host coming back gets its chance
    }
    return took;
  }

  /** The host of a worker named `<hostname>:<pid>` (live or not), or the name. */
  private hostOfWorker(name: string): string {
    const pid = Number(name.slice(name.lastIndexOf(':') + 1));
    const slot = this.fleet.workers.slotOf(pid);
    return slot < 0 ? name : this.lab.hostOfSlot(slot);
  }

  /** Waits for a failover under way to end (its losses counted, its old master back). */
  async failoverHealed(): Promise<void> {
    await this.failingOver;
  }

  /** Waits for every partition to heal and every failed-over master to rejoin. */
  async settle(): Promise<void> {
    await this.partitioning;
    await this.failingOver;
    await this.pgFailingOver;
  }

  /** Heals whatever is still cut off (an aborted run). */
  abort(): void {
    for (const host of this.lab.workerHosts) if (this.lab.isCut(host)) this.lab.heal(host);
  }
}
