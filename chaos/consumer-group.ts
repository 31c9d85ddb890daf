/**
 * The chaos run's consumer group: a few `TransitionConsumer` processes of one group (chaos/consumer-member.ts), kept
 * running like the workers (a killed one is started again, under a new name), on the worker hosts with `--hosts`, so
 * that cutting a host off cuts its member off too. Its faults:
 * - `consumer-join`: one more member joins (at the bound, the oldest leaves first: SIGTERM, it closes and leaves);
 * - `consumer-kill`: a member SIGKILLed in the middle of a handler call (waited for, up to 10 s);
 * - `consumer-pause`: a member SIGSTOPped in a handler call for its lease and 3 s more, then SIGCONTed: another takes
 *   its partitions over meanwhile, and it must not handle anything more of them.
 * The members share their memory of versions handled (a table in PostgreSQL: chaos/consumer-member.ts).
 * When a member stops with ResyncRequiredError (its position trimmed away, or Redis lost the group) the group resyncs
 * as the contract says a consumer must: every member stopped, a new group at `$`, then every version the group had
 * not handled read from history (PostgreSQL), counted as such and remembered as handled, then the members started
 * again. At the end the members' records are checked (chaos/group-check.ts).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { compareIds, pairs } from '../src/streams/consumer';
import { readPartitions } from '../src/streams/partitions';
import { repoRoot, sleep } from '../src/util';
import { RESYNC_EXIT, VERSIONS_TABLE, type MemberConfig } from './consumer-member';
import { WorkerPool } from './faults';
import type { Fleet } from './fleet';
import type { Release } from './releases';
import { checkGroup, FROM_HISTORY, parseMemberRecord, type GroupCall, type GroupCheck, type MemberRecord } from './group-check';

/** A member's lease (renewed every second; it stops handling 1.25 s before it could expire). */
export const MEMBER_LEASE_MS = 5000;
/** How long a member's handler call takes. */
export const HANDLER_MS = 15;
/** How much longer than its lease a paused member stays stopped. */
const PAUSE_PAST_LEASE_MS = 3000;
/** How long a kill or a pause waits for a member to be in a handler call. */
const IN_HANDLER_WITHIN_MS = 10_000;

/** A running member. */
interface Member {
  readonly slot: number;
  readonly pid: number;
  readonly name: string;
}

export interface ConsumerGroupReport {
  /** members at the start and at most; processes started (restarts included); exits by themselves */
  readonly members: {
    readonly initial: number;
    readonly max: number;
    readonly started: number;
    readonly exits: { readonly resync: number; readonly other: number };
  };
  readonly faults: {
    readonly joins: number;
    readonly leaves: number;
    readonly kills: number;
    readonly killsMidHandler: number;
    readonly pauses: number;
  };
  /** partitions taken over (each start included), and leases lost (a member fenced off) */
  readonly acquisitions: number;
  readonly leasesLost: number;
  /** times the group had to resync (a member's ResyncRequiredError, or the group missing), and why */
  readonly resyncs: readonly string[];
  /** the group had read and acknowledged every partition to its end before it was stopped */
  readonly drained: boolean;
  readonly check: GroupCheck;
}

/** The group is clean: no violation, no member that stopped on an error other than a resync, drained. */
export function groupClean(g: ConsumerGroupReport): boolean {
  return g.check.violations.length === 0 && Object.keys(g.check.violationCounts).length === 0 && g.members.exits.other === 0 && g.drained;
}

export class ConsumerGroup {
  private readonly dir: string;
  private readonly pool: WorkerPool;
  private generation = 0;
  /** the consumer name each slot's process runs under */
  private readonly names = new Map<number, string>();
  /** members SIGSTOPped now, by pid: the timer that lets them go on */
  private readonly paused = new Map<number, NodeJS.Timeout>();
  private resyncing: Promise<void> | null = null;
  private readonly exits = { resync: 0, other: 0 };
  private readonly faults = { joins: 0, leaves: 0, kills: 0, killsMidHandler: 0, pauses: 0 };
  private readonly resyncs: string[] = [];
  readonly initial: number;
  readonly max: number;
  private stopped = false;

  constructor(
    private readonly fleet: Fleet,
    private readonly log: (line: string) => void,
  ) {
    const { options, lab } = fleet;
    this.dir = path.join(options.dir, 'consumers');
    fs.rmSync(this.dir, { recursive: true, force: true });
    fs.mkdirSync(this.dir, { recursive: true });
    // one member per worker host, so that cutting a host off always cuts a member off; on loopback two
    this.initial = options.hosts > 0 ? options.hosts : 2;
    this.max = this.initial + 1;
    this.pool = new WorkerPool(
      {
        command: process.execPath,
        args: [path.join(repoRoot(), 'dist', 'chaos', 'consumer-member.js')],
        // a mixed-version run: the odd slots run the previous release's member, so one group has both
        argsFor: (slot) => [path.join(this.releaseOfSlot(slot).dir, 'dist', 'chaos', 'consumer-member.js')],
        env: { ...process.env },
        logFile: path.join(options.dir, 'consumers.log'),
        ...(lab === null ? {} : { wrap: (slot: number) => lab.wrap(slot) }),
        argsOf: (slot, start) => [JSON.stringify(this.memberConfig(slot, start))],
        onExit: (exit) => this.exited(exit.code, exit.expected),
        what: 'consumer',
      },
      this.initial,
      1000,
      log,
    );
  }

  /** The release a member slot runs. */
  private releaseOfSlot(slot: number): Release {
    return this.fleet.previous !== null && slot % 2 === 1 ? this.fleet.previous : this.fleet.current;
  }

  /** member processes started of each release (a mixed-version run has previous ones; counted by release, not by version string) */
  readonly startedBy = { previous: 0, current: 0 };

  private get group(): string {
    return `chaos-consumers-${this.generation}`;
  }

  private memberConfig(slot: number, start: number): MemberConfig {
    const consumer = `c${slot}-${start}`;
    this.startedBy[this.releaseOfSlot(slot) === this.fleet.previous ? 'previous' : 'current']++;
    this.names.set(slot, consumer);
    const { fleet } = this;
    return {
      redisUrl: fleet.redisUrl,
      streamKey: fleet.streamKey,
      partitions: fleet.options.streamPartitions,
      group: this.group,
      consumer,
      leaseMs: MEMBER_LEASE_MS,
      handlerMs: HANDLER_MS,
      recordFile: path.join(this.dir, `${consumer}.rec`),
      databaseUrl: fleet.databaseUrl,
    };
  }

  /** Makes the group on every partition (at their end: the stream is new), its version table, and starts the members. */
  async start(): Promise<void> {
    await this.fleet.pool.query(`CREATE TABLE IF NOT EXISTS ${VERSIONS_TABLE} (deployment_id uuid PRIMARY KEY, version integer NOT NULL)`);
    await this.fleet.pool.query(`TRUNCATE ${VERSIONS_TABLE}`);
    await this.makeGroups();
    this.pool.start();
    this.log(
      `consumer group: ${this.initial} members (at most ${this.max}), lease ${MEMBER_LEASE_MS} ms, handler ${HANDLER_MS} ms, ${this.fleet.options.streamPartitions} partition(s)`,
    );
  }

  /** The group at `$` on every partition; Redis away or loading is waited out. */
  private async makeGroups(): Promise<void> {
    for (const key of this.fleet.partitionKeys) {
      for (;;) {
        try {
          await this.fleet.admin.xgroup('CREATE', key, this.group, '$', 'MKSTREAM');
          break;
        } catch (err) {
          if (err instanceof Error && err.message.includes('BUSYGROUP')) break;
          await sleep(500);
        }
      }
    }
  }

  private exited(code: number | null, expected: boolean): void {
    if (expected || this.stopped) return;
    if (code === RESYNC_EXIT) {
      this.exits.resync++;
      this.resync();
    } else {
      this.exits.other++;
    }
  }

  /** Starts the group's resync, unless one is under way. */
  private resync(): void {
    this.resyncing ??= this.resyncNow()
      .catch((err: unknown) => this.log(`consumer group: resync failed: ${err instanceof Error ? err.message : String(err)}`))
      .finally(() => {
        this.resyncing = null;
      });
  }

  /**
   * Every member stopped; a new group at `$` on every partition; then what the group had not handled, read from
   * history: every version above the highest it handled, per deployment (a version committed before the read is in
   * it; one committed after is published after the new group was made, so the group gets it), remembered as handled
   * so that the members drop what the new group delivers of it; then the members start again.
   */
  private async resyncNow(): Promise<void> {
    this.pool.suspend();
    this.continueAll();
    await this.pool.killEvery();
    if (this.stopped) return;
    const { fleet } = this;
    // a wiped Redis lost the record of the partitions until the relay writes it again
    for (let waited = 0; waited < 60_000; waited += 250) {
      if ((await readPartitions(fleet.admin, fleet.streamKey).catch(() => 0)) === fleet.options.streamPartitions) break;
      await sleep(250);
    }
    const old = this.group;
    this.generation++;
    await this.makeGroups();
    for (const key of fleet.partitionKeys) await fleet.admin.xgroup('DESTROY', key, old).catch(() => undefined);
    const handled = new Map<string, number>();
    for (const call of this.records().flatMap((r) => r.calls))
      handled.set(call.deploymentId, Math.max(handled.get(call.deploymentId) ?? 0, call.version));
    const rows = await this.historyRows();
    const lines: string[] = [];
    const recovered = new Map<string, number>();
    for (const { deployment_id: id, version } of rows) {
      if (version <= (handled.get(id) ?? 0)) continue;
      lines.push(`S ${process.hrtime.bigint()} -1 -1 ${id} ${version} -`);
      handled.set(id, version);
      recovered.set(id, version);
    }
    const read = lines.length;
    fs.appendFileSync(path.join(this.dir, `${FROM_HISTORY}.rec`), lines.map((l) => `${l}\n`).join(''));
    await this.withPostgres(() =>
      fleet.pool.query(
        `INSERT INTO ${VERSIONS_TABLE} (deployment_id, version) SELECT * FROM unnest($1::uuid[], $2::int[])
         ON CONFLICT (deployment_id) DO UPDATE SET version = GREATEST(${VERSIONS_TABLE}.version, EXCLUDED.version)`,
        [[...recovered.keys()], [...recovered.values()]],
      ),
    );
    const why = `${this.group}: ${read} versions read from history`;
    this.resyncs.push(why);
    this.log(`consumer group resynced: ${why}`);
    this.pool.resume();
  }

  /** Every transition in history, per deployment in version order. */
  private async historyRows(): Promise<Array<{ deployment_id: string; version: number }>> {
    const { rows } = await this.withPostgres(() =>
      this.fleet.pool.query<{ deployment_id: string; version: number }>(
        `SELECT deployment_id, version FROM state_transitions ORDER BY deployment_id, version`,
      ),
    );
    return rows;
  }

  /** Runs `query`, waiting out PostgreSQL restarting (up to 2 min). */
  private async withPostgres<T>(query: () => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await query();
      } catch (err) {
        if (attempt >= 120) throw err;
        await sleep(1000);
      }
    }
  }

  /** Every member's record, and history's. */
  private records(): MemberRecord[] {
    return fs
      .readdirSync(this.dir)
      .filter((f) => f.endsWith('.rec'))
      .map((f) => parseMemberRecord(f.slice(0, -'.rec'.length), fs.readFileSync(path.join(this.dir, f), 'utf8')));
  }

  /** Running members: slot, pid, name. */
  private running(): Member[] {
    const out: Member[] = [];
    for (const slot of this.pool.activeSlots()) {
      const child = this.pool.processOf(slot);
      const name = this.names.get(slot);
      if (child?.pid !== undefined && child.exitCode === null && child.signalCode === null && name !== undefined)
        out.push({ slot, pid: child.pid, name });
    }
    return out;
  }

  /** The names of the members running on a lab host. */
  membersOn(host: string): string[] {
    const lab = this.fleet.lab;
    return lab === null
      ? []
      : this.running()
          .filter((m) => lab.hostOfSlot(m.slot) === host)
          .map((m) => m.name);
  }

  /** `consumer-join`: one more member; at the bound, the oldest leaves first. */
  async join(): Promise<string> {
    const waited = await this.afterResync();
    let left = '';
    const slots = this.pool.activeSlots();
    if (slots.length >= this.max) {
      const oldest = slots[0] ?? 0;
      const name = this.names.get(oldest) ?? `slot ${oldest}`;
      this.continueOne(this.pool.processOf(oldest)?.pid);
      await this.pool.retire(oldest);
      this.faults.leaves++;
      left = `${name} left (SIGTERM: it closed and left the group), then `;
    }
    const slot = this.pool.grow();
    this.faults.joins++;
    const where = this.fleet.lab === null ? '' : ` on ${this.fleet.lab.hostOfSlot(slot)}`;
    return `${waited}${left}${this.names.get(slot) ?? `slot ${slot}`} joined${where} (${this.pool.activeSlots().length} members)`;
  }

  /** `consumer-kill`: SIGKILL a member in the middle of a handler call (it is started again, under a new name). */
  async kill(pick: <T>(items: readonly T[]) => T): Promise<string> {
    const found = await this.memberInHandler(pick);
    if (typeof found === 'string') return found;
    const { member, call } = found;
    const child = this.pool.processOf(member.slot);
    if (child === null || child.pid !== member.pid || child.exitCode !== null || child.signalCode !== null)
      return `${member.name} exited meanwhile: nobody killed`;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    this.pool.kill(member.pid);
    this.faults.kills++;
    await exited;
    // the record says whether it died in the handler: a call that started and never returned
    const mid = parseMemberRecord(member.name, this.recordOf(member.name)).inHandlerAtEnd;
    if (mid !== null) this.faults.killsMidHandler++;
    const what =
      mid === null
        ? `between handler calls${call === null ? ` (none in a handler within ${IN_HANDLER_WITHIN_MS / 1000} s)` : ''}`
        : `in its handler (${mid.deploymentId} v${mid.version}, partition ${mid.partition})`;
    return `SIGKILL ${member.name} pid ${member.pid} ${what}`;
  }

  /** `consumer-pause`: SIGSTOP a member in a handler call for its lease and 3 s more, then SIGCONT it. */
  async pause(pick: <T>(items: readonly T[]) => T): Promise<string> {
    const found = await this.memberInHandler(pick);
    if (typeof found === 'string') return found;
    const { member, call } = found;
    process.kill(member.pid, 'SIGSTOP');
    const forMs = MEMBER_LEASE_MS + PAUSE_PAST_LEASE_MS;
    this.paused.set(
      member.pid,
      setTimeout(() => this.continueOne(member.pid), forMs),
    );
    this.faults.pauses++;
    const what =
      call === null
        ? `between handler calls (none in a handler within ${IN_HANDLER_WITHIN_MS / 1000} s)`
        : `in its handler (${call.deploymentId} v${call.version}, partition ${call.partition})`;
    return `SIGSTOP ${member.name} pid ${member.pid} ${what} for ${forMs / 1000} s (its lease is ${MEMBER_LEASE_MS / 1000} s), then SIGCONT`;
  }

  /**
   * The first running member (not paused) seen in a handler call, polling their records' ends for up to
   * IN_HANDLER_WITHIN_MS; after that one picked at random, with no call. A string when there is none to pick.
   */
  private async memberInHandler(pick: <T>(items: readonly T[]) => T): Promise<{ member: Member; call: GroupCall | null } | string> {
    let deadline = Date.now() + IN_HANDLER_WITHIN_MS;
    for (;;) {
      if (this.resyncing !== null) {
        await this.afterResync();
        deadline = Date.now() + IN_HANDLER_WITHIN_MS;
      }
      const members = this.running().filter((m) => !this.paused.has(m.pid));
      if (members.length === 0) return 'no member running';
      for (const member of members) {
        const call = lastOpenCall(member.name, path.join(this.dir, `${member.name}.rec`));
        if (call !== null) return { member, call };
      }
      if (Date.now() > deadline) return { member: pick(members), call: null };
      await sleep(2);
    }
  }

  /** Waits for a resync under way (its members are stopped meanwhile): a fault meets the group running. */
  private async afterResync(): Promise<string> {
    if (this.resyncing === null) return '';
    const from = Date.now();
    await this.resyncing;
    return `after the group's resync (${((Date.now() - from) / 1000).toFixed(1)} s): `;
  }

  /** Lets a paused member go on. */
  private continueOne(pid: number | undefined): void {
    if (pid === undefined) return;
    const timer = this.paused.get(pid);
    if (timer === undefined) return;
    clearTimeout(timer);
    this.paused.delete(pid);
    try {
      process.kill(pid, 'SIGCONT');
    } catch {
      // it died meanwhile
    }
  }

  private continueAll(): void {
    for (const pid of [...this.paused.keys()]) this.continueOne(pid);
  }

  private recordOf(name: string): string {
    try {
      return fs.readFileSync(path.join(this.dir, `${name}.rec`), 'utf8');
    } catch {
      return '';
    }
  }

  /**
   * Whether the group has read partition key `key` up to `id` and has nothing pending at or before it (so trimming
   * there takes nothing from it).
   */
  async readUpTo(key: string, id: string): Promise<boolean> {
    if (this.resyncing !== null) return false;
    const { admin } = this.fleet;
    const groups = ((await admin.xinfo('GROUPS', key)) as unknown[][]).map(pairs);
    const mine = groups.find((g) => g.name === this.group);
    if (typeof mine?.['last-delivered-id'] !== 'string' || compareIds(mine['last-delivered-id'], id) < 0) return false;
    const [count, lowest] = (await admin.xpending(key, this.group)) as [number, string | null, ...unknown[]];
    return Number(count) === 0 || lowest === null || compareIds(lowest, id) > 0;
  }

  /** Waits until the group has read and acknowledged every partition to its end (true), or `withinMs` passed. */
  async drain(withinMs: number): Promise<boolean> {
    const deadline = Date.now() + withinMs;
    while (Date.now() < deadline) {
      await this.resyncing;
      const done = await Promise.all(this.fleet.partitionKeys.map((key) => this.atEnd(key))).catch(() => [false]);
      if (done.every(Boolean)) return true;
      await sleep(250);
    }
    return false;
  }

  private async atEnd(key: string): Promise<boolean> {
    const { admin } = this.fleet;
    const stream = pairs((await admin.xinfo('STREAM', key)) as unknown[]);
    const mine = ((await admin.xinfo('GROUPS', key)) as unknown[][]).map(pairs).find((g) => g.name === this.group);
    const last = typeof stream['last-generated-id'] === 'string' ? stream['last-generated-id'] : '0-0';
    const delivered = mine?.['last-delivered-id'];
    return typeof delivered === 'string' && compareIds(delivered, last) >= 0 && Number(mine?.pending ?? 1) === 0;
  }

  /** Stops every member gracefully (a paused one is let go first). Safe to call twice. */
  async stop(): Promise<void> {
    await this.resyncing;
    this.stopped = true;
    this.continueAll();
    await this.pool.stop(15_000);
  }

  /** Synchronous last resort on process exit. */
  killAll(): void {
    this.continueAll();
    this.pool.killAll();
  }

  /** The group's report: its records checked against the deployments' final versions. */
  report(finalVersions: ReadonlyMap<string, number>, drained: boolean): ConsumerGroupReport {
    const records = this.records();
    return {
      members: { initial: this.initial, max: this.max, started: this.pool.started, exits: { ...this.exits } },
      faults: { ...this.faults },
      acquisitions: records.reduce((n, r) => n + r.acquired, 0),
      leasesLost: records.reduce((n, r) => n + r.lost, 0),
      resyncs: [...this.resyncs],
      drained,
      check: checkGroup(
        records.flatMap((r) => r.calls),
        finalVersions,
      ),
    };
  }
}

/** The call a member's record ends in, if it never returned (the member is in its handler), else null. */
function lastOpenCall(name: string, file: string): GroupCall | null {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return null;
  }
  try {
    const size = fs.fstatSync(fd).size;
    const length = Math.min(size, 512);
    const buffer = Buffer.alloc(length);
    fs.readSync(fd, buffer, 0, length, size - length);
    const lines = buffer
      .toString('utf8')
      .split('\n')
      .filter((l) => l !== '');
    const last = lines[lines.length - 1] ?? '';
    return last.startsWith('S ') ? parseMemberRecord(name, last).inHandlerAtEnd : null;
  } finally {
    fs.closeSync(fd);
  }
}
