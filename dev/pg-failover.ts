/**
 * A PostgreSQL that fails over (issue 34), for the hosts lab (dev/netns.ts): a pg_auto_failover formation (Debian's
 * postgresql-15-auto-failover) of a monitor on one lab host and two nodes, a primary and a streaming standby, on two
 * others; the fleet reaches "the database" by one address (`address`) that the lab moves to the new primary, as a
 * managed service moves its writer endpoint (node-postgres takes one host per connection string, so the formation's
 * multi-host URI with `target_session_attrs=read-write` is not an option).
 *
 * - Synchronous replication is pg_auto_failover's default (`synchronous_standby_names = 'ANY 1 (...)'`,
 *   `synchronous_commit = on`); `sync: false` makes both nodes leave the quorum (`replication-quorum false`), so the
 *   primary acknowledges commits the standby may not have.
 * - `failover()`: optionally cuts the link between the two nodes first (the standby then lacks the primary's last
 *   commits: with sync they wait, without it they are acknowledged), SIGKILLs every process of the primary's host
 *   (its keeper too: a lost host, not a restart), waits until the monitor has promoted the standby, moves the
 *   address, and measures when the database takes writes again through it. `rejoin()` starts the old primary's
 *   keeper again: it rewinds (pg_rewind, or a base backup if that fails) and follows the new primary; it never comes
 *   back as a second primary (the monitor has demoted it), which `failover()` and `rejoin()` check by sampling both
 *   nodes.
 * - The monitor's health checks and the keepers' timeouts are shortened (a failover in ~10 s, not pg_auto_failover's
 *   default ~50 s).
 *
 * pg_autoctl refuses to run as root: every process runs as the `fleetpg` system user (dev/servers/os-user.ts), in a
 * private directory under the temp dir, with its Unix-domain sockets there too. Needs root (the lab) and pg_autoctl.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client } from 'pg';
import { isProcessAlive, sleep } from '../src/util';
import type { NetnsLab } from './netns';
import { ensureOsUser, type RunAs } from './servers/os-user';
import { waitFor } from './wait';

const MONITOR_PORT = 5431;
const NODE_PORT = 5432;
export const FORMATION_DATABASE = 'fleet';
export const FORMATION_USER = 'fleet';

/** The monitor's health checks and the keepers' timeouts, shortened for the lab. */
const MONITOR_SETTINGS = [
  'shared_buffers = 32MB',
  'pgautofailover.health_check_period = 1000',
  'pgautofailover.health_check_timeout = 1000',
  'pgautofailover.health_check_max_retries = 1',
  'pgautofailover.health_check_retry_delay = 500',
  'pgautofailover.node_considered_unhealthy_timeout = 3000',
  'pgautofailover.primary_demote_timeout = 5000',
  'pgautofailover.startup_grace_period = 2000',
];
const NODE_SETTINGS = [
  'shared_buffers = 128MB',
  'work_mem = 4MB',
  'maintenance_work_mem = 64MB',
  'effective_cache_size = 512MB',
  'max_connections = 200',
];
const KEEPER_TIMEOUTS: ReadonlyArray<readonly [string, string]> = [
  ['timeout.network_partition_timeout', '3'],
  ['timeout.prepare_promotion_catchup', '10'],
  ['timeout.prepare_promotion_walreceiver', '2'],
];

const BASE_PREFIX = 'lifecycle-fleet-pgha-';
/** in a formation's directory: the pid of the process that made it */
const OWNER_FILE = 'owner.pid';

/**
 * The formations of killed runs: their keepers and PostgreSQL live on in namespaces the next lab removed. Each
 * formation directory whose owner is gone: every process whose command line names it is SIGKILLed, then the
 * directory is removed.
 */
function removeLeftovers(log: (line: string) => void): void {
  let entries: string[];
  try {
    entries = fs.readdirSync(os.tmpdir()).filter((e) => e.startsWith(BASE_PREFIX));
  } catch {
    return;
  }
  for (const entry of entries) {
    const dir = path.join(os.tmpdir(), entry);
    let owner = NaN;
    try {
      owner = Number(fs.readFileSync(path.join(dir, OWNER_FILE), 'utf8').trim());
    } catch {
      // no owner file: made by a run killed at its start
    }
    if (Number.isInteger(owner) && owner > 0 && isProcessAlive(owner)) continue;
    const pids = fs
      .readdirSync('/proc')
      .filter((p) => /^\d+$/.test(p))
      .map(Number);
    let killed = 0;
    for (const pid of pids) {
      try {
        // pg_autoctl's children retitle themselves; each keeps the environment naming the directory (HOME)
        if (fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(dir) || fs.readFileSync(`/proc/${pid}/environ`, 'utf8').includes(dir)) {
          process.kill(pid, 'SIGKILL');
          killed++;
        }
      } catch {
        // gone, or not ours to read
      }
    }
    fs.rmSync(dir, { recursive: true, force: true });
    log(`removed the PostgreSQL formation of an earlier run at ${dir} (${killed} processes killed)`);
  }
}

/** pg_autoctl's PostgreSQL: the version whose lib directory has the pgautofailover extension. */
export function pgAutoctlBinDir(): string | null {
  try {
    for (const v of fs.readdirSync('/usr/lib/postgresql').sort((a, b) => Number(b) - Number(a))) {
      if (fs.existsSync(`/usr/lib/postgresql/${v}/lib/pgautofailover.so`)) return `/usr/lib/postgresql/${v}/bin`;
    }
  } catch {
    // not a Debian-style install
  }
  return null;
}

/** Why the formation cannot run here, or null. */
export function pgFailoverUnavailable(): string | null {
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return 'the PostgreSQL failover lab needs root';
  try {
    execFileSync('pg_autoctl', ['--version'], { stdio: 'ignore' });
  } catch {
    return 'pg_autoctl is not installed (apt-get install postgresql-15-auto-failover)';
  }
  return pgAutoctlBinDir() === null ? 'no PostgreSQL with the pgautofailover extension under /usr/lib/postgresql' : null;
}

export interface PgFormationOptions {
  readonly lab: NetnsLab;
  /** the lab hosts of the monitor and of the two nodes (the first starts as the primary) */
  readonly monitorHost: string;
  readonly nodeHosts: readonly [string, string];
  /** synchronous replication (default true) */
  readonly sync?: boolean;
  /** the moving address: an unused address of the lab's subnet */
  readonly address: string;
  /** where the formation's logs are copied when it stops */
  readonly logDir: string;
  readonly log: (line: string) => void;
}

interface NodeInfo {
  readonly name: string;
  readonly host: string;
  readonly address: string;
  /** its Unix-domain socket directory (trust for local connections) */
  readonly sock: string;
  readonly data: string;
  keeper: ChildProcess | null;
}

export interface PgFailoverRecord {
  /** the node that was the primary (killed) and the one promoted */
  readonly killed: string;
  readonly promoted: string;
  /** the link between the nodes was cut this long before the kill (0: not cut) */
  readonly cutReplicationMs: number;
  /** from the kill until the monitor reported the standby promoted (wait_primary or primary) */
  readonly promotedMs: number;
  /** from the kill until the address was on the new primary */
  readonly addressMovedMs: number;
  /** from the kill until a write through the address succeeded */
  readonly writableMs: number;
  /** samples (every 200 ms) in which both nodes took writes: must be 0 */
  readonly twoPrimaries: number;
}

export class PgFormation {
  private readonly nodes: NodeInfo[];
  private readonly monitor: NodeInfo;
  /** the node that has the address */
  private addressOn: NodeInfo;
  private stopped = false;

  private constructor(
    private readonly options: PgFormationOptions,
    private readonly base: string,
    private readonly user: RunAs,
    private readonly binDir: string,
    readonly password: string,
  ) {
    const info = (name: string, host: string): NodeInfo => ({
      name,
      host,
      address: options.lab.host(host).address,
      sock: path.join(base, name, 'sock'),
      data: path.join(base, name, 'data'),
      keeper: null,
    });
    this.monitor = info('monitor', options.monitorHost);
    this.nodes = options.nodeHosts.map((h, i) => info(`node${i + 1}`, h));
    this.addressOn = this.nodes[0] as NodeInfo;
  }

  /** The fleet's connection string: the `fleet` role, through the moving address. */
  get databaseUrl(): string {
    return `postgres://${FORMATION_USER}:${this.password}@${this.options.address}:${NODE_PORT}/${FORMATION_DATABASE}`;
  }

  get sync(): boolean {
    return this.options.sync ?? true;
  }

  /** Creates the monitor, the primary (with the fleet's role and database), then the standby; puts the address on the primary. */
  static async start(options: PgFormationOptions): Promise<PgFormation> {
    const why = pgFailoverUnavailable();
    if (why !== null) throw new Error(why);
    const user = ensureOsUser(options.log);
    removeLeftovers(options.log);
    const base = fs.mkdtempSync(path.join(os.tmpdir(), BASE_PREFIX));
    fs.writeFileSync(path.join(base, OWNER_FILE), String(process.pid));
    fs.chownSync(base, user.uid, user.gid);
    fs.chmodSync(base, 0o700);
    const formation = new PgFormation(options, base, user, pgAutoctlBinDir() ?? '', randomBytes(18).toString('base64url'));
    try {
      await formation.create();
      return formation;
    } catch (err) {
      await formation.stop();
      throw err;
    }
  }

  private async create(): Promise<void> {
    const { log } = this.options;
    const started = Date.now();
    const m = this.monitor;
    this.prepareDirs(m);
    await this.autoctl(m, [
      'create',
      'monitor',
      '--pgdata',
      m.data,
      '--pgport',
      String(MONITOR_PORT),
      '--hostname',
      m.address,
      '--auth',
      'trust',
      '--no-ssl',
    ]);
    fs.appendFileSync(path.join(m.data, 'postgresql.auto.conf'), `${MONITOR_SETTINGS.join('\n')}\n`);
    this.runKeeper(m);
    await waitFor('the pg_auto_failover monitor', async () => ((await this.states().catch(() => null)) === null ? undefined : true), 60_000);
    const [first, second] = this.nodes as [NodeInfo, NodeInfo];
    await this.createNode(first);
    await waitFor(`${first.name} single`, async () => ((await this.states())[first.name]?.reported === 'single' ? true : undefined), 60_000);
    await waitFor(`${first.name} taking writes`, async () => ((await this.writable(first)) ? true : undefined), 60_000);
    await this.local(first, 'postgres', async (c) => {
      await c.query(`CREATE ROLE ${FORMATION_USER} LOGIN CREATEDB PASSWORD '${this.password}'`);
      await c.query(`CREATE DATABASE ${FORMATION_DATABASE} OWNER ${FORMATION_USER}`);
      // pg_autoctl's base backup asks for a spread checkpoint: with CREATE DATABASE's pages dirty it takes minutes
      await c.query('CHECKPOINT');
    });
    await this.createNode(second);
    await this.waitPair(first, second, 120_000);
    if (!this.sync) {
      for (const n of this.nodes) await this.autoctl(n, ['set', 'node', 'replication-quorum', 'false', '--pgdata', n.data]);
    }
    await waitFor(
      `synchronous_standby_names ${this.sync ? 'set' : 'empty'}`,
      async () => {
        const names = await this.local(
          first,
          'postgres',
          async (c) => (await c.query<{ s: string }>(`SELECT current_setting('synchronous_standby_names') AS s`)).rows[0]?.s ?? '',
        );
        return (names !== '') === this.sync ? names : undefined;
      },
      60_000,
    );
    this.addAddress(first);
    log(
      `pg_auto_failover formation: monitor on ${m.host}, primary ${first.name} on ${first.host}, standby ${second.name} on ${second.host}, ` +
        `${this.sync ? 'synchronous' : 'asynchronous'} replication; the database at ${this.options.address} (${((Date.now() - started) / 1000).toFixed(1)} s)`,
    );
  }

  private prepareDirs(n: NodeInfo): void {
    for (const d of [path.join(this.base, n.name, 'home'), n.sock]) {
      fs.mkdirSync(d, { recursive: true, mode: 0o700 });
    }
    execFileSync('chown', ['-R', `${this.user.uid}:${this.user.gid}`, path.join(this.base, n.name)]);
  }

  private async createNode(n: NodeInfo): Promise<void> {
    this.prepareDirs(n);
    const monitorUri = `postgres://autoctl_node@${this.monitor.address}:${MONITOR_PORT}/pg_auto_failover?sslmode=disable`;
    await this.autoctl(n, [
      ...['create', 'postgres', '--pgdata', n.data, '--pgport', String(NODE_PORT), '--hostname', n.address, '--name', n.name],
      ...['--monitor', monitorUri, '--auth', 'trust', '--no-ssl'],
    ]);
    if (n === this.nodes[0]) {
      // the standby's base backup copies both files
      fs.appendFileSync(path.join(n.data, 'postgresql.auto.conf'), `${NODE_SETTINGS.join('\n')}\n`);
      const subnet = `${n.address.split('.').slice(0, 3).join('.')}.0/24`;
      fs.appendFileSync(path.join(n.data, 'pg_hba.conf'), `host    all    ${FORMATION_USER}    ${subnet}    scram-sha-256\n`);
    }
    for (const [key, value] of KEEPER_TIMEOUTS) await this.autoctl(n, ['config', 'set', '--pgdata', n.data, key, value]);
    this.runKeeper(n);
  }

  /** A pg_autoctl command of node `n` as fleetpg, with its own environment (to run inside the node's host). */
  private argv(n: NodeInfo, args: readonly string[]): string[] {
    const home = path.join(this.base, n.name, 'home');
    const env = {
      PATH: `${this.binDir}:/usr/bin:/bin`,
      HOME: home,
      XDG_CONFIG_HOME: path.join(home, 'config'),
      XDG_DATA_HOME: path.join(home, 'data'),
      XDG_RUNTIME_DIR: path.join(home, 'run'),
      PG_REGRESS_SOCK_DIR: n.sock,
      PGHOST: n.sock,
    };
    const envArgs = Object.entries(env).map(([k, v]) => `${k}=${v}`);
    return ['-u', this.user.name, '--', '/usr/bin/env', '-i', ...envArgs, 'pg_autoctl', ...args];
  }

  /** Runs a pg_autoctl command of node `n` to its end, its output appended to the node's log. */
  private async autoctl(n: NodeInfo, args: readonly string[]): Promise<void> {
    const logFile = path.join(this.base, `${n.name}.log`);
    fs.appendFileSync(logFile, `--- pg_autoctl ${args.join(' ')}\n`);
    const out = fs.openSync(logFile, 'a');
    const child = spawn('ip', ['netns', 'exec', this.options.lab.host(n.host).netns, 'runuser', ...this.argv(n, args)], {
      stdio: ['ignore', out, out],
    });
    fs.closeSync(out);
    const [code] = (await once(child, 'exit')) as [number | null];
    if (code !== 0) {
      const tail = fs.readFileSync(logFile, 'utf8').trim().split('\n').slice(-5).join('\n');
      throw new Error(`pg_autoctl ${args.slice(0, 2).join(' ')} on ${n.name} exited ${String(code)}: ${tail}`);
    }
  }

  /** Starts `pg_autoctl run` of node `n` (its keeper and PostgreSQL), logging to `<base>/<name>.log`. */
  private runKeeper(n: NodeInfo): void {
    const out = fs.openSync(path.join(this.base, `${n.name}.log`), 'a');
    n.keeper = this.options.lab.spawn(n.host, 'runuser', this.argv(n, ['run', '--pgdata', n.data]), { stdio: ['ignore', out, out] });
    fs.closeSync(out);
  }

  /** A query as the superuser over the node's Unix-domain socket. */
  private async local<T>(n: NodeInfo, database: string, fn: (c: Client) => Promise<T>): Promise<T> {
    const port = n === this.monitor ? MONITOR_PORT : NODE_PORT;
    const client = new Client({ host: n.sock, port, user: this.user.name, database, connectionTimeoutMillis: 2000, query_timeout: 5000 });
    client.on('error', () => undefined);
    await client.connect();
    try {
      return await fn(client);
    } finally {
      await client.end().catch(() => undefined);
    }
  }

  /** The monitor's view: each node's reported and assigned state. */
  async states(): Promise<Record<string, { reported: string; goal: string }>> {
    return this.local(this.monitor, 'pg_auto_failover', async (c) => {
      const { rows } = await c.query<{ name: string; reported: string; goal: string }>(
        `SELECT nodename AS name, reportedstate::text AS reported, goalstate::text AS goal FROM pgautofailover.node`,
      );
      return Object.fromEntries(rows.map((r) => [r.name, { reported: r.reported, goal: r.goal }]));
    });
  }

  private async waitPair(primary: NodeInfo, standby: NodeInfo, withinMs: number): Promise<void> {
    await waitFor(
      `${primary.name} primary and ${standby.name} secondary`,
      async () => {
        const s = await this.states().catch(() => null);
        return s?.[primary.name]?.reported === 'primary' && s[standby.name]?.reported === 'secondary' ? true : undefined;
      },
      withinMs,
    );
  }

  /** The node that has the address (the primary, between failovers). */
  get primaryName(): string {
    return this.addressOn.name;
  }

  private addAddress(n: NodeInfo): void {
    execFileSync('ip', ['-n', this.options.lab.host(n.host).netns, 'addr', 'add', `${this.options.address}/32`, 'dev', 'eth0'], { stdio: 'pipe' });
    this.addressOn = n;
    // every host, and the root namespace, forgets the old owner's MAC at once (a gratuitous ARP's job)
    for (const h of this.options.lab.hosts.values()) {
      execFileSync('ip', ['-n', h.netns, 'neigh', 'flush', 'to', this.options.address], { stdio: 'ignore' });
    }
    execFileSync('ip', ['neigh', 'flush', 'to', this.options.address], { stdio: 'ignore' });
  }

  private removeAddress(n: NodeInfo): void {
    try {
      execFileSync('ip', ['-n', this.options.lab.host(n.host).netns, 'addr', 'del', `${this.options.address}/32`, 'dev', 'eth0'], { stdio: 'pipe' });
    } catch {
      // not there
    }
  }

  /** Drops every packet between the two nodes (both directions), nothing else: htb + an empty pfifo + a u32 match. */
  private cutBetweenNodes(): void {
    const [a, b] = this.nodes as [NodeInfo, NodeInfo];
    for (const [from, to] of [
      [a, b],
      [b, a],
    ] as const) {
      const tc = (...args: string[]) =>
        execFileSync('ip', ['netns', 'exec', this.options.lab.host(from.host).netns, 'tc', ...args], { stdio: 'pipe' });
      tc('qdisc', 'add', 'dev', 'eth0', 'root', 'handle', '1:', 'htb', 'default', '20', 'r2q', '1000000');
      tc('class', 'add', 'dev', 'eth0', 'parent', '1:', 'classid', '1:10', 'htb', 'rate', '10gbit');
      tc('class', 'add', 'dev', 'eth0', 'parent', '1:', 'classid', '1:20', 'htb', 'rate', '10gbit');
      tc('qdisc', 'add', 'dev', 'eth0', 'parent', '1:10', 'handle', '10:', 'pfifo', 'limit', '0');
      tc(
        'filter',
        'add',
        'dev',
        'eth0',
        'parent',
        '1:',
        'protocol',
        'ip',
        'prio',
        '1',
        'u32',
        'match',
        'ip',
        'dst',
        `${to.address}/32`,
        'flowid',
        '1:10',
      );
    }
  }

  private healBetweenNodes(): void {
    for (const n of this.nodes) {
      try {
        execFileSync('ip', ['netns', 'exec', this.options.lab.host(n.host).netns, 'tc', 'qdisc', 'del', 'dev', 'eth0', 'root'], { stdio: 'pipe' });
      } catch {
        // not cut
      }
    }
  }

  /** SIGKILLs every process of the node's host (its keeper, PostgreSQL, anything else there). */
  private async killHost(n: NodeInfo): Promise<void> {
    const netns = this.options.lab.host(n.host).netns;
    for (let round = 0; round < 50; round++) {
      const pids = execFileSync('ip', ['netns', 'pids', netns], { encoding: 'utf8' })
        .split('\n')
        .map(Number)
        .filter((p) => p > 0);
      if (pids.length === 0) return;
      for (const pid of pids) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone
        }
      }
      await sleep(50);
    }
  }

  /** Does the node take writes (reachable and not in recovery)? */
  private async writable(n: NodeInfo): Promise<boolean> {
    try {
      return await this.local(n, 'postgres', async (c) => (await c.query<{ r: boolean }>('SELECT pg_is_in_recovery() AS r')).rows[0]?.r === false);
    } catch {
      return false;
    }
  }

  /** Counts samples (every 200 ms, until `stop` resolves) in which both nodes take writes. */
  private watchTwoPrimaries(): { stop: () => Promise<number> } {
    let done = false;
    let both = 0;
    const loop = (async () => {
      while (!done) {
        const rw = await Promise.all(this.nodes.map((n) => this.writable(n)));
        if (rw.every(Boolean)) both++;
        await sleep(200);
      }
    })();
    return {
      stop: async () => {
        done = true;
        await loop;
        return both;
      },
    };
  }

  /** A write through the moving address, as the fleet's role (a fresh connection). */
  private async writeThroughAddress(): Promise<boolean> {
    const client = new Client({ connectionString: this.databaseUrl, connectionTimeoutMillis: 1000, query_timeout: 2000 });
    client.on('error', () => undefined);
    try {
      await client.connect();
      await client.query('SELECT txid_current()');
      return true;
    } catch {
      return false;
    } finally {
      await client.end().catch(() => undefined);
    }
  }

  /**
   * Fails the primary over to the standby: cut (optional), kill, promotion by the monitor, the address moved, writes
   * through it again. `beforeCut` runs first, `beforeKill` right before the SIGKILL (after the cut). The old primary stays down until
   * `rejoin()`.
   */
  async failover(
    options: { readonly cutReplicationMs?: number; readonly beforeCut?: () => Promise<void>; readonly beforeKill?: () => Promise<void> } = {},
  ): Promise<PgFailoverRecord & { killedAt: number }> {
    const old = this.addressOn;
    const next = this.nodes.find((n) => n !== old) as NodeInfo;
    const cutMs = options.cutReplicationMs ?? 0;
    const watch = this.watchTwoPrimaries();
    try {
      await options.beforeCut?.();
      if (cutMs > 0) {
        this.cutBetweenNodes();
        await sleep(cutMs);
      }
      await options.beforeKill?.();
      const killedAt = Date.now();
      await this.killHost(old);
      old.keeper = null;
      // the link stays cut until the promotion: the dead host's kernel may still hold WAL in a closed walsender
      // socket's send buffer, which it would otherwise hand the standby after all
      await waitFor(
        `${next.name} promoted`,
        async () => {
          const s = await this.states().catch(() => null);
          const r = s?.[next.name]?.reported;
          return r === 'wait_primary' || r === 'primary' ? true : undefined;
        },
        120_000,
      );
      const promotedMs = Date.now() - killedAt;
      this.healBetweenNodes();
      this.removeAddress(old);
      this.addAddress(next);
      const addressMovedMs = Date.now() - killedAt;
      await waitFor('a write through the moved address', async () => ((await this.writeThroughAddress()) ? true : undefined), 60_000);
      const writableMs = Date.now() - killedAt;
      return {
        killed: old.name,
        promoted: next.name,
        cutReplicationMs: cutMs,
        promotedMs,
        addressMovedMs,
        writableMs,
        twoPrimaries: await watch.stop(),
        killedAt,
      };
    } finally {
      this.healBetweenNodes();
      await watch.stop();
    }
  }

  /**
   * Starts the old primary's keeper again and waits until it follows the new primary (rewound or rebuilt) and the
   * pair is primary/secondary again (synchronous again, with sync). Returns the samples in which both took writes.
   */
  async rejoin(withinMs = 120_000): Promise<{ tookMs: number; twoPrimaries: number }> {
    const down = this.nodes.find((n) => n.keeper === null);
    if (down === undefined) return { tookMs: 0, twoPrimaries: 0 };
    const started = Date.now();
    const watch = this.watchTwoPrimaries();
    try {
      this.runKeeper(down);
      await this.waitPair(this.addressOn, down, withinMs);
      return { tookMs: Date.now() - started, twoPrimaries: await watch.stop() };
    } finally {
      await watch.stop();
    }
  }

  /** Stops every keeper (SIGTERM, then SIGKILL of what is left in the hosts), copies the logs, removes the directory. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.healBetweenNodes();
    for (const n of [...this.nodes, this.monitor]) n.keeper?.kill('SIGTERM');
    for (
      let waited = 0;
      waited < 10_000 && [...this.nodes, this.monitor].some((n) => n.keeper !== null && n.keeper.exitCode === null && n.keeper.signalCode === null);
      waited += 100
    ) {
      await sleep(100);
    }
    for (const n of [...this.nodes, this.monitor]) await this.killHost(n);
    this.removeAddress(this.addressOn);
    try {
      fs.mkdirSync(this.options.logDir, { recursive: true });
      for (const n of [...this.nodes, this.monitor]) {
        const log = path.join(this.base, `${n.name}.log`);
        if (fs.existsSync(log)) fs.copyFileSync(log, path.join(this.options.logDir, `pg-${n.name}.log`));
      }
    } catch {
      // logs are a courtesy
    }
    fs.rmSync(this.base, { recursive: true, force: true });
  }
}
