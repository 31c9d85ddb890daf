/**
 * Fault injection for the chaos runner: worker processes it can SIGKILL and restart, the outbox relay leader
 * found through PostgreSQL, Redis and PostgreSQL connections cut from the server side.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import type { RedisConnection } from '../src/redis/connection';
import type { Pool } from 'pg';
import { settleWithin } from '../src/util';

export interface WorkerSpec {
  readonly command: string;
  readonly args: readonly string[];
  readonly env: NodeJS.ProcessEnv;
  /** stdout and stderr of every worker go here (appended) */
  readonly logFile: string;
  /** an argv prefix per slot that runs the worker elsewhere (a lab host: `ip netns exec <ns>`, which execs) */
  readonly wrap?: (slot: number) => readonly string[];
  /** the arguments of a slot's process in place of `args` (a mixed-version run: the release of the slot) */
  readonly argsFor?: (slot: number) => readonly string[];
  /** arguments appended per process: its slot and its start number (1, 2, ... over the pool's life) */
  readonly argsOf?: (slot: number, start: number) => readonly string[];
  /** told of every exit: `expected` when `kill`, `retire` or `stop` asked for it */
  readonly onExit?: (exit: {
    readonly slot: number;
    readonly pid: number;
    readonly code: number | null;
    readonly signal: string | null;
    readonly expected: boolean;
  }) => void;
  /** what a process is called in log lines (default `worker`) */
  readonly what?: string;
}

/**
 * `count` worker processes kept running: one that dies (killed by a fault, or exiting because a service was down
 * when it started) is started again after `restartDelayMs`, as a process supervisor would. Slots can be added
 * (`grow`) and retired (`retire`), and restarts held back for a while (`suspend`, `resume`).
 */
export class WorkerPool {
  private readonly slots: Array<ChildProcess | null>;
  private stopped = false;
  /** restarts wait for `resume` */
  private suspended = false;
  /** slots whose process is not started again */
  private readonly retired = new Set<number>();
  private readonly timers = new Set<NodeJS.Timeout>();
  /** processes started, restarts included */
  started = 0;
  /** exits not asked for by `kill` or `stop` (e.g. a worker that could not start while a service was down) */
  unexpectedExits = 0;
  /** those exits by exit code or signal (`code 4`: a service unreachable at start; `code 5`: its fetch watchdog) */
  readonly exitsBy: Record<string, number> = {};
  private readonly expected = new Set<number>();
  private readonly slotOfPid = new Map<number, number>();

  constructor(
    private readonly spec: WorkerSpec,
    count: number,
    private readonly restartDelayMs = 1000,
    private readonly log: (line: string) => void = () => undefined,
  ) {
    this.slots = Array.from({ length: count }, () => null);
  }

  start(): void {
    for (let i = 0; i < this.slots.length; i++) this.spawn(i);
  }

  /** pids of the live workers, by slot */
  pids(): number[] {
    return this.slots.map((c) => c?.pid ?? -1).filter((p) => p > 0);
  }

  /** the pid of the worker running in `slot`, or null */
  pidOf(slot: number): number | null {
    return this.slots[slot]?.pid ?? null;
  }

  /** the slot of the worker with this pid, live or not (each pid started in one slot), or -1 */
  slotOf(pid: number): number {
    return this.slotOfPid.get(pid) ?? -1;
  }

  private spawn(slot: number): void {
    // a restart timer that fires after `resume` filled the slot again must not start a second process there
    if (this.stopped || this.suspended || this.retired.has(slot) || (this.slots[slot] ?? null) !== null) return;
    const fd = fs.openSync(this.spec.logFile, 'a');
    let child: ChildProcess;
    try {
      const [command = this.spec.command, ...prefix] = [...(this.spec.wrap?.(slot) ?? []), this.spec.command];
      const args = [...prefix, ...(this.spec.argsFor?.(slot) ?? this.spec.args), ...(this.spec.argsOf?.(slot, this.started + 1) ?? [])];
      child = spawn(command, args, { env: this.spec.env, stdio: ['ignore', fd, fd] });
    } finally {
      fs.closeSync(fd);
    }
    this.started++;
    this.slots[slot] = child;
    if (child.pid !== undefined) this.slotOfPid.set(child.pid, slot);
    child.once('exit', (code, signal) => {
      const pid = child.pid ?? -1;
      const expected = this.expected.delete(pid) || this.stopped;
      if (!expected) {
        this.unexpectedExits++;
        const how = signal ?? `code ${String(code)}`;
        this.exitsBy[how] = (this.exitsBy[how] ?? 0) + 1;
        this.log(`${this.spec.what ?? 'worker'} pid ${pid} exited by itself (${signal ?? `code ${String(code)}`}); see ${this.spec.logFile}`);
      }
      if (this.slots[slot] === child) this.slots[slot] = null;
      this.spec.onExit?.({ slot, pid, code, signal, expected });
      if (this.stopped || this.retired.has(slot)) return;
      const timer = setTimeout(() => {
        this.timers.delete(timer);
        this.spawn(slot);
      }, this.restartDelayMs);
      this.timers.add(timer);
    });
  }

  /** Adds a slot and starts its process (unless suspended: then on `resume`); returns the slot. */
  grow(): number {
    this.slots.push(null);
    const slot = this.slots.length - 1;
    this.spawn(slot);
    return slot;
  }

  /** The slots that are not retired. */
  activeSlots(): number[] {
    return this.slots.map((_, slot) => slot).filter((slot) => !this.retired.has(slot));
  }

  /** The process of a slot, while it runs. */
  processOf(slot: number): ChildProcess | null {
    return this.slots[slot] ?? null;
  }

  /** Stops the slot's process for good: SIGTERM (graceful), SIGKILL after `graceMs`; resolves once it exited. */
  async retire(slot: number, graceMs = 15_000): Promise<void> {
    this.retired.add(slot);
    const child = this.slots[slot];
    if (child === null || child === undefined || child.exitCode !== null || child.signalCode !== null) return;
    await this.terminate(child, graceMs);
  }

  /** Holds restarts back until `resume` (a process that exits meanwhile is started again then). */
  suspend(): void {
    this.suspended = true;
  }

  /** Starts every active slot that has no process, and lets restarts happen again. */
  resume(): void {
    this.suspended = false;
    for (const slot of this.activeSlots()) if (this.slots[slot] === null) this.spawn(slot);
  }

  /** SIGKILLs every live process (each counted as asked for) and waits for their exits; the slots stay. */
  async killEvery(): Promise<void> {
    const live = this.slots.filter((c): c is ChildProcess => c !== null && c.exitCode === null && c.signalCode === null);
    await Promise.all(
      live.map(async (child) => {
        const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
        if (child.pid !== undefined) this.expected.add(child.pid);
        child.kill('SIGKILL');
        await exited;
      }),
    );
  }

  /** SIGKILLs the worker with this pid (it is restarted); false when it is not one of ours. */
  kill(pid: number): boolean {
    const child = this.slots.find((c) => c?.pid === pid);
    if (child === undefined || child === null) return false;
    this.expected.add(pid);
    child.kill('SIGKILL');
    return true;
  }

  /** Stops every worker: SIGTERM (graceful), SIGKILL after `graceMs`. */
  async stop(graceMs = 20_000): Promise<void> {
    this.stopped = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    const live = this.slots.filter((c): c is ChildProcess => c !== null && c.exitCode === null && c.signalCode === null);
    await Promise.all(live.map((child) => this.terminate(child, graceMs)));
  }

  /** SIGTERM, SIGKILL after `graceMs`; resolves once the process exited. */
  private async terminate(child: ChildProcess, graceMs: number): Promise<void> {
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    if (child.pid !== undefined) this.expected.add(child.pid);
    child.kill('SIGTERM');
    if ((await settleWithin(exited, graceMs)) === 'timeout') {
      child.kill('SIGKILL');
      await exited;
    }
  }

  /** Synchronous last resort on process exit. */
  killAll(): void {
    this.stopped = true;
    for (const c of this.slots) if (c !== null && c.exitCode === null) c.kill('SIGKILL');
  }
}

/**
 * The OS pid of the process whose relay holds the outbox advisory lock: PostgreSQL names the session's client port;
 * /proc/net/tcp maps the port to a socket inode, and /proc/<pid>/fd to the process holding it (Linux).
 */
export async function findRelayLeader(pool: Pool, candidates: readonly number[]): Promise<number | null> {
  const { rows } = await pool.query<{ client_port: number | null }>(
    `SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
      WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'lifecycle-fleet-relay'`,
  );
  const port = rows[0]?.client_port;
  if (port === undefined || port === null || port <= 0) return null;
  const inodes = socketInodesForLocalPort(port);
  if (inodes.size === 0) return null;
  for (const pid of candidates) {
    let fds: string[];
    try {
      fds = fs.readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
        if (m?.[1] !== undefined && inodes.has(m[1])) return pid;
      } catch {
        // fd closed meanwhile
      }
    }
  }
  return null;
}

function socketInodesForLocalPort(port: number): Set<string> {
  const found = new Set<string>();
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text: string;
    try {
      text = fs.readFileSync(table, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      const local = cols[1];
      const inode = cols[9];
      if (local !== undefined && inode !== undefined && local.endsWith(`:${hexPort}`) && inode !== '0') found.add(inode);
    }
  }
  return found;
}

/** Terminates every client backend of the database but the caller's; returns how many. */
export async function terminateBackends(pool: Pool): Promise<number> {
  const { rows } = await pool.query<{ n: string }>(
    `SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity
      WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'`,
  );
  return Number(rows[0]?.n ?? 0);
}

/** Kills every normal Redis client connection but the caller's (`CLIENT KILL TYPE normal`); returns how many. */
export async function killRedisClients(redis: RedisConnection): Promise<number> {
  return Number(await redis.call('CLIENT', 'KILL', 'TYPE', 'normal', 'SKIPME', 'yes'));
}
