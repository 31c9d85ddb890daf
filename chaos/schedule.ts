/**
 * The fault schedule: one fault every `faultEveryS` seconds of the fault window, in a fixed rotation, the last one
 * always a PostgreSQL crash (so that "drain after the last fault" measures a recovery). Each fault is logged with
 * when it came, what it did and how long it took.
 */
import { jobIdFor } from '../src/queues/producer';
import { sleep } from '../src/util';
import type { AuditConsumer } from './audit';
import type { ConsumerGroup } from './consumer-group';
import { findRelayLeader, killRedisClients, terminateBackends } from './faults';
import type { Fleet } from './fleet';
import { HostFaults, relayLeaderHost } from './host-faults';
import { holdConsumerBehindTrim } from './held-consumer';
import type { ChaosOptions } from './options';
import type { ScriptPlayer } from './scripts';
import type { Sender } from './sender';
import type { Random } from './workload';

export type FaultKind =
  | 'kill-worker'
  | 'kill-relay-leader'
  | 'redis-restart'
  | 'postgres-restart'
  | 'terminate-backends'
  | 'redis-client-kill'
  | 'redelivery-burst'
  | 'replay-burst'
  /** redis-server SIGKILLed and restarted with its data deleted: queues, scheduler and stream gone */
  | 'redis-wipe'
  /** a consumer held on an entry while the stream moves on and is trimmed past it */
  | 'consumer-held'
  /** one more member joins the consumer group (at its bound, the oldest leaves first) */
  | 'consumer-join'
  /** a member of the consumer group SIGKILLed in the middle of a handler call */
  | 'consumer-kill'
  /** a member of the consumer group SIGSTOPped past its lease, then SIGCONTed */
  | 'consumer-pause'
  /** (--hosts) a worker host cut off from everything for --partition seconds, then healed */
  | 'partition-worker'
  /** (--hosts) the host whose relay holds the outbox lock, cut off likewise */
  | 'partition-relay-leader'
  /** (--redis-cluster) the master of the fleet's slot SIGKILLed, its replica promoted, the old one back as a replica */
  | 'redis-failover'
  /**
   * (--pg-failover) the PostgreSQL primary cut off from its standby, its host SIGKILLed, the standby promoted, the
   * database's address moved, the old primary back as a standby; takes the place of `postgres-restart`
   */
  | 'postgres-failover';

export interface FaultRecord {
  readonly atS: number;
  readonly kind: FaultKind;
  readonly detail: string;
  readonly tookMs: number;
}

/**
 * The rotation. A `--ci` run (14 faults, the last a PostgreSQL crash) meets every kind; on several hosts (every third
 * fault a host fault) its first nine, so the consumer group's faults come early, and `consumer-held` before the first
 * failover (while a failover stalls the fleet no entry comes to hold the consumer on).
 */
const ROTATION: readonly FaultKind[] = [
  'kill-worker',
  'redis-client-kill',
  'consumer-held',
  'consumer-kill',
  'kill-relay-leader',
  'redis-wipe',
  'consumer-pause',
  'redelivery-burst',
  'consumer-join',
  'terminate-backends',
  'replay-burst',
  'redis-restart',
  'kill-worker',
  'postgres-restart',
  'kill-relay-leader',
];

export interface FaultTargets {
  readonly fleet: Fleet;
  readonly group: ConsumerGroup;
  readonly sender: Sender;
  readonly scripts: ScriptPlayer;
  readonly audit: AuditConsumer;
  readonly timing: Random;
}

/**
 * On several hosts every third fault is one of these, in turn (Redis failovers only on a Redis Cluster; PostgreSQL
 * failovers with --pg-failover, the fourth: a `--ci` run meets two, one each way, the second its last fault).
 */
function hostRotation(fleet: Fleet): readonly FaultKind[] {
  if (fleet.cluster === null)
    return fleet.options.pgFailover
      ? ['partition-worker', 'postgres-failover', 'partition-relay-leader']
      : ['partition-worker', 'partition-relay-leader'];
  // a PostgreSQL failover not right after a Redis one: the fleet is at work again when its cut comes
  return fleet.options.pgFailover
    ? ['partition-worker', 'redis-failover', 'partition-relay-leader', 'postgres-failover', 'redis-failover']
    : ['partition-worker', 'redis-failover', 'partition-relay-leader', 'redis-failover'];
}

export class FaultSchedule {
  readonly log: FaultRecord[] = [];
  /** the partitions and failovers of a run on several hosts (null on loopback) */
  readonly hosts: HostFaults | null;
  leaderKills = 0;
  /** held consumers that stopped with resync_required, and that went on past the hole */
  readonly consumers = { resyncs: 0, skipped: 0 };
  /** when the last fault ended (ms since the epoch; 0 before any) */
  lastFaultAt = 0;

  constructor(
    private readonly t: FaultTargets,
    options: ChaosOptions,
    elapsed: () => number,
    say: (line: string) => void,
  ) {
    const lab = t.fleet.lab;
    this.hosts =
      lab === null
        ? null
        : new HostFaults(
            t.fleet,
            lab,
            options.partitionS,
            elapsed,
            say,
            (before) => this.ackedButGone(before),
            (host) => t.group.membersOn(host),
          );
  }

  /** The k-th fault of the window: the rotation, with every third a host fault on several hosts. */
  private kindAt(k: number, last: boolean): FaultKind {
    const kind = this.rotationAt(k, last);
    // PostgreSQL that fails over is not restarted in place
    return kind === 'postgres-restart' && this.t.fleet.options.pgFailover ? 'postgres-failover' : kind;
  }

  private rotationAt(k: number, last: boolean): FaultKind {
    if (last) return 'postgres-restart';
    const { fleet } = this.t;
    if (this.hosts !== null && k % 3 === 1) {
      const rotation = hostRotation(fleet);
      return rotation[Math.floor(k / 3) % rotation.length] ?? 'partition-worker';
    }
    const n = this.hosts === null ? k : k - Math.floor((k + 1) / 3);
    const kind = ROTATION[n % ROTATION.length] ?? 'kill-worker';
    // a Redis Cluster is not restarted as a whole (its masters fail over, in the host faults' turn)
    return kind === 'redis-restart' && fleet.cluster !== null ? 'kill-worker' : kind;
  }

  /** Injects the faults of the window that starts now; `elapsed` gives the run's time in seconds. */
  async run(options: ChaosOptions, elapsed: () => number, say: (line: string) => void): Promise<void> {
    const windowStart = Date.now();
    for (let k = 0; ; k++) {
      const at = options.faultEveryS * (k + 1);
      if (at > options.durationS) break;
      await sleep(Math.max(0, at * 1000 - (Date.now() - windowStart)));
      // the last fault is the heaviest, so that "drain after the last fault" measures a recovery
      const last = options.faultEveryS * (k + 2) > options.durationS;
      if (last) await this.settleHosts(say); // the last fault meets every host connected and every master replicated
      const kind = this.kindAt(k, last);
      const started = Date.now();
      let detail: string;
      try {
        detail = await this.inject(kind);
      } catch (err) {
        detail = `failed: ${err instanceof Error ? err.message : String(err)}`;
      }
      const record = { atS: Number(elapsed().toFixed(1)), kind, detail, tookMs: Date.now() - started };
      this.log.push(record);
      this.lastFaultAt = Date.now();
      say(`fault ${kind}: ${detail}${record.tookMs > 100 ? ` (${record.tookMs} ms)` : ''}`);
    }
    await this.settleHosts(say);
  }

  private async settleHosts(say: (line: string) => void): Promise<void> {
    if (this.hosts === null) return;
    const started = Date.now();
    await this.hosts.settle();
    if (Date.now() - started > 100) say(`partitions healed and masters rejoined (${Date.now() - started} ms)`);
    this.lastFaultAt = Math.max(this.lastFaultAt, Date.now());
  }

  private async inject(kind: FaultKind): Promise<string> {
    const { fleet } = this.t;
    switch (kind) {
      case 'kill-worker':
        return this.killWorker('');
      case 'kill-relay-leader':
        return this.killRelayLeader();
      case 'redis-restart':
        await fleet.services.restartRedis({ signal: 'SIGKILL', downMs: 1000 });
        return 'redis-server SIGKILLed, down 1 s, restarted from its AOF';
      case 'redis-failover':
        return this.hosts === null ? 'not on several hosts' : this.hosts.failover();
      case 'postgres-failover':
        return this.hosts === null
          ? 'not on several hosts'
          : this.hosts.pgFailover(() => {
              const { sender, timing } = this.t;
              const decided = [...sender.sent.values()].filter((e) => e.expect.kind === 'decided');
              return sender.redeliver(timing.pick(decided), `-pgf${this.log.length}`);
            });
      case 'partition-worker':
        return this.hosts === null
          ? 'not on several hosts'
          : this.hosts.partition(
              false,
              (hosts) => this.t.timing.pick(hosts),
              () => this.redeliveryBurst(200),
            );
      case 'partition-relay-leader':
        return this.hosts === null
          ? 'not on several hosts'
          : this.hosts.partition(
              true,
              (hosts) => this.t.timing.pick(hosts),
              () => this.redeliveryBurst(200),
            );
      case 'redis-wipe':
        return this.wipeRedis();
      case 'consumer-held':
        return this.holdConsumer();
      case 'consumer-join':
        return this.t.group.join();
      case 'consumer-kill':
        return this.t.group.kill((members) => this.t.timing.pick(members));
      case 'consumer-pause':
        return this.t.group.pause((members) => this.t.timing.pick(members));
      case 'postgres-restart':
        await fleet.services.restartPostgres({ mode: 'immediate', downMs: 1000 });
        return 'PostgreSQL stopped in immediate mode, down 1 s, restarted (crash recovery)';
      case 'terminate-backends':
        return `pg_terminate_backend: ${await terminateBackends(fleet.pool)} backends`;
      case 'redis-client-kill':
        if (fleet.cluster !== null) {
          const killed = await fleet.cluster.onAll('CLIENT', 'KILL', 'TYPE', 'normal', 'SKIPME', 'yes');
          return `CLIENT KILL TYPE normal on every node: ${killed.reduce((n, r) => n + Number(r), 0)} connections`;
        }
        return `CLIENT KILL TYPE normal: ${await killRedisClients(fleet.admin)} connections`;
      case 'redelivery-burst':
        return this.redeliveryBurst();
      case 'replay-burst':
        return this.replayBurst();
    }
  }

  /** SIGKILLs a random worker; `why` prefixes the detail. */
  private killWorker(why: string): string {
    const workers = this.t.fleet.workers;
    const pids = workers.pids();
    if (pids.length === 0) return 'no worker running';
    const pid = this.t.timing.pick(pids);
    workers.kill(pid);
    return `${why}SIGKILL worker pid ${pid}`;
  }

  private async killRelayLeader(): Promise<string> {
    const { fleet } = this.t;
    // right after a restart the relays may still be contending for the lock: give them a few seconds
    let leader: number | null = null;
    for (let i = 0; i < 10 && leader === null; i++) {
      if (i > 0) await sleep(500);
      leader = await this.relayLeaderPid().catch(() => null);
    }
    if (leader === null) return this.killWorker('leader not found; ');
    fleet.workers.kill(leader);
    this.leaderKills++;
    return `SIGKILL relay leader pid ${leader}`;
  }

  /**
   * Events the producer had acknowledged before `before` that a decision was expected for, which were neither
   * decided nor any longer in the queue: what a failover lost. (A redis-wipe later sends every undecided event
   * again, so the run's final `lost` can hide these: they are counted here, at the failover.)
   */
  private async ackedButGone(before: number): Promise<number> {
    const { fleet, sender } = this.t;
    const candidates = [...sender.acked].filter(([id, at]) => at <= before && sender.sent.get(id)?.expect.kind === 'decided').map(([id]) => id);
    const decided = async (ids: string[]): Promise<Set<string>> =>
      new Set(
        (await fleet.pool.query<{ event_id: string }>(`SELECT event_id FROM processed_events WHERE event_id = ANY($1)`, [ids])).rows.map(
          (r) => r.event_id,
        ),
      );
    const done = await decided(candidates);
    const missing: string[] = [];
    for (const id of candidates.filter((c) => !done.has(c))) {
      if ((await fleet.queue.getJob(jobIdFor(id))) === undefined) missing.push(id);
    }
    if (missing.length === 0) return 0;
    const decidedSince = await decided(missing); // decided between the two reads
    return missing.filter((id) => !decidedSince.has(id)).length;
  }

  /** The pid of the worker whose relay leads: on several hosts by its host's address, else by its socket. */
  private async relayLeaderPid(): Promise<number | null> {
    const { fleet } = this.t;
    if (fleet.lab === null) return findRelayLeader(fleet.pool, fleet.workers.pids());
    const host = await relayLeaderHost(fleet, fleet.lab);
    if (host === null) return null;
    for (let slot = 0; slot < fleet.options.workers; slot++) if (fleet.lab.hostOfSlot(slot) === host) return fleet.workers.pidOf(slot);
    return null;
  }

  /**
   * The queue loses its jobs. A producer that keeps its own record of what it sent (as a deploy pipeline does) sends
   * again what was not decided yet: every event it expects decided (any order converges: one that an earlier step no
   * longer waited for, such as a start overtaken by its end, is a noop whenever it comes), and its current step's
   * expected rejections (an earlier step's were seen; sent again later they would meet another state). The stream is
   * rebuilt by the relay from the outbox.
   */
  private async wipeRedis(): Promise<string> {
    const { fleet, sender, scripts } = this.t;
    // not during a failover: what the wipe takes would count as lost by the failover, and a master is down; nor while
    // PostgreSQL fails over (what was decided is read from it)
    await this.hosts?.failoverHealed();
    await this.hosts?.pgFailoverHealed();
    if (fleet.cluster !== null) await fleet.cluster.onMasters('FLUSHALL');
    else await fleet.services.restartRedis({ signal: 'SIGKILL', downMs: 1000, wipe: true });
    const decided = new Set((await fleet.pool.query<{ event_id: string }>(`SELECT event_id FROM processed_events`)).rows.map((r) => r.event_id));
    const currentRejections = [...scripts.stepEvents.values()].flat().filter((e) => e.expect.kind === 'rejected' && sender.sent.has(e.data.eventId));
    const again = [...[...sender.sent.values()].filter((e) => e.expect.kind === 'decided'), ...currentRejections].filter(
      (e) => !decided.has(e.data.eventId),
    );
    for (const event of again) sender.inBackground(() => sender.resend(event, true));
    const what =
      fleet.cluster !== null ? 'every master FLUSHALLed (the replicas follow)' : 'redis-server SIGKILLed, its data deleted, restarted empty';
    return `${what}; ${again.length} undecided events sent again`;
  }

  private async holdConsumer(): Promise<string> {
    const { fleet, audit, group } = this.t;
    const target = {
      redisUrl: fleet.redisUrl,
      admin: fleet.admin,
      streamKey: fleet.streamKey,
      partitions: fleet.options.streamPartitions,
      audit,
      readUpTo: (key: string, id: string) => group.readUpTo(key, id),
    };
    const held = await holdConsumerBehindTrim(target, `held-${this.log.length}`);
    if (held.resync) this.consumers.resyncs++;
    if (held.skipped) this.consumers.skipped++;
    return held.detail;
  }

  private redeliveryBurst(count = 60): string {
    const { sender, timing } = this.t;
    const candidates = [...sender.sent.values()].filter((e) => e.expect.kind === 'decided');
    const picked = Array.from({ length: Math.min(count, candidates.length) }, () => timing.pick(candidates));
    picked.forEach((event, n) => sender.inBackground(async () => void (await sender.redeliver(event, n + 1))));
    return `${picked.length} events redelivered under new job ids`;
  }

  private replayBurst(): string {
    const { sender, timing } = this.t;
    const candidates = [...sender.sent.values()].filter((e) => e.replayable);
    const picked = Array.from({ length: Math.min(60, candidates.length) }, () => timing.pick(candidates));
    picked.forEach((event, n) => sender.inBackground(() => sender.replay(event, `${event.data.eventId}.r${n}x${this.log.length}`)));
    return `${picked.length} earlier events replayed under new eventIds`;
  }
}
