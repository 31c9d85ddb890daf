/**
 * A Redis Cluster of our own for tests, chaos and benches: 3 masters with a replica each, `redis-server
 * --cluster-enabled yes` in a temporary directory, password-protected, created with `redis-cli --cluster create`.
 * On loopback (free ports) by default, or on a lab host (dev/netns.ts): inside its network namespace, listening on
 * its address. Its URL is the fleet's cluster form (`redis+cluster://:password@host:P1,.../`).
 *
 * Faults: `failover()` SIGKILLs a master and waits until the cluster has promoted its replica (the replica takes
 * over after `cluster-node-timeout`, as in production); `restart(port)` brings a killed node back with its
 * nodes.conf, and it rejoins as a replica of whoever serves its slots now. `stop()` kills every node and removes
 * the directory.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { sleep } from '../src/util';
import { waitFor as until } from './wait';

const run = promisify(execFile);

/** Is nothing listening on this loopback port? */
function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/**
 * `count` loopback ports that are free, each with its cluster bus port (port + 10000) free too. Drawn below the
 * ephemeral range, so that port + 10000 stays a valid port.
 */
async function loopbackPorts(count: number): Promise<number[]> {
  const ports: number[] = [];
  for (let tries = 0; ports.length < count && tries < 1000; tries++) {
    const port = 20_000 + Math.floor(Math.random() * 20_000);
    if (ports.some((p) => Math.abs(p - port) < 1 || p + 10_000 === port || port + 10_000 === p)) continue;
    if ((await portFree(port)) && (await portFree(port + 10_000))) ports.push(port);
  }
  if (ports.length < count) throw new Error('no free loopback ports for a Redis Cluster');
  return ports;
}

export interface RedisClusterOptions {
  readonly masters?: number;
  readonly replicasEach?: number;
  /** run on a lab host: inside this network namespace, on this address (every port is free there) */
  readonly host?: { readonly netns: string; readonly address: string };
  /** each node's AOF with `appendfsync everysec` (default off: nothing survives a node's death but its replica) */
  readonly appendonly?: boolean;
  /** cluster-node-timeout: how long a master may be silent before its replica takes over (default 5000 ms) */
  readonly nodeTimeoutMs?: number;
}

export interface FailoverRecord {
  /** the master that was killed */
  readonly killed: number;
  /** its replica, now serving its slots */
  readonly promoted: number;
  /** from the kill until the cluster was whole again (`cluster_state:ok`, the replica a master) */
  readonly tookMs: number;
}

interface NodeLine {
  readonly id: string;
  readonly port: number;
  readonly master: boolean;
  readonly masterId: string;
  readonly failed: boolean;
  /** slot ranges served, e.g. [[0, 5460]] */
  readonly slots: ReadonlyArray<readonly [number, number]>;
}

export class OwnRedisCluster {
  private readonly children = new Map<number, ChildProcess>();

  private constructor(
    readonly ports: readonly number[],
    readonly password: string,
    readonly dir: string,
    /** the address the nodes listen on and announce */
    readonly address: string,
    private readonly options: RedisClusterOptions,
  ) {}

  /** The fleet's REDIS_URL for this cluster (all nodes as seeds). */
  get url(): string {
    return `redis+cluster://:${this.password}@${this.ports.map((p) => `${this.address}:${p}`).join(',')}/`;
  }

  static async start(options: RedisClusterOptions = {}): Promise<OwnRedisCluster> {
    const masters = options.masters ?? 3;
    const replicasEach = options.replicasEach ?? 1;
    const count = masters * (1 + replicasEach);
    const ports = options.host === undefined ? await loopbackPorts(count) : Array.from({ length: count }, (_, i) => 7001 + i);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-cluster-'));
    const cluster = new OwnRedisCluster(ports, randomBytes(12).toString('hex'), dir, options.host?.address ?? '127.0.0.1', options);
    try {
      for (const port of ports) {
        fs.mkdirSync(path.join(dir, String(port)));
        cluster.spawnNode(port);
      }
      for (const port of ports)
        await until(`redis-server on ${port}`, async () => ((await cluster.cli(port, 'PING')) === 'PONG' ? true : undefined), 10_000);
      await run(
        'redis-cli',
        [
          '-a',
          cluster.password,
          '--no-auth-warning',
          '--cluster',
          'create',
          ...ports.map((p) => `${cluster.address}:${p}`),
          '--cluster-replicas',
          String(replicasEach),
          '--cluster-yes',
        ],
        { timeout: 60_000 },
      );
      await cluster.whole(30_000);
    } catch (err) {
      await cluster.stop();
      throw err;
    }
    return cluster;
  }

  private spawnNode(port: number): void {
    const args = [
      '--port',
      String(port),
      '--bind',
      this.address,
      '--dir',
      path.join(this.dir, String(port)),
      '--cluster-enabled',
      'yes',
      '--cluster-config-file',
      `nodes-${port}.conf`,
      '--cluster-node-timeout',
      String(this.options.nodeTimeoutMs ?? 5000),
      '--cluster-announce-ip',
      this.address,
      '--requirepass',
      this.password,
      '--masterauth',
      this.password,
      '--appendonly',
      this.options.appendonly === true ? 'yes' : 'no',
      '--save',
      '',
      '--maxmemory-policy',
      'noeviction',
    ];
    const netns = this.options.host?.netns;
    const child =
      netns === undefined
        ? spawn('redis-server', args, { stdio: 'ignore' })
        : spawn('nsenter', [`--net=/run/netns/${netns}`, '--', 'redis-server', ...args], { stdio: 'ignore' }); // nsenter execs: same pid
    child.on('error', () => undefined); // a missing redis-server shows as the wait for it failing
    this.children.set(port, child);
  }

  /**
   * Waits until every live node says the cluster is ok with all slots assigned, and every master has its replicas
   * online (until then a WAIT there counts none).
   */
  async whole(timeoutMs = 30_000): Promise<void> {
    const live = () => this.ports.filter((p) => this.alive(p));
    await until(
      'cluster_state:ok on every node',
      async () => {
        for (const port of live()) {
          const info = await this.cli(port, 'CLUSTER', 'INFO');
          if (!/^cluster_state:ok\r?$/m.test(info) || !/^cluster_slots_assigned:16384\r?$/m.test(info)) return undefined;
        }
        return true;
      },
      timeoutMs,
    );
    const replicasEach = this.options.replicasEach ?? 1;
    await until(
      `every master to have ${replicasEach} replica(s) online`,
      async () => {
        for (const port of live()) {
          const info = await this.cli(port, 'INFO', 'replication');
          if (!/^role:master\r?$/m.test(info)) continue;
          if (this.ports.length === live().length && (info.match(/^slave\d+:.*state=online/gm) ?? []).length < replicasEach) return undefined;
        }
        return true;
      },
      timeoutMs,
    );
  }

  /** Is the node on `port` running (started by us and not killed)? */
  alive(port: number): boolean {
    const child = this.children.get(port);
    return child !== undefined && child.exitCode === null && child.signalCode === null;
  }

  /** The cluster's nodes as a live node sees them. */
  private async nodes(): Promise<NodeLine[]> {
    const from = this.ports.find((p) => this.alive(p));
    if (from === undefined) throw new Error('no Redis Cluster node is running');
    return (await this.cli(from, 'CLUSTER', 'NODES'))
      .split('\n')
      .filter((l) => l.trim() !== '')
      .map((line) => {
        const [id = '', addr = '', flags = '', masterId = '', , , , , ...ranges] = line.split(' ');
        const port = Number(/:(\d+)@/.exec(addr)?.[1] ?? 0);
        const slots = ranges
          .filter((r) => /^\d+(-\d+)?$/.test(r))
          .map((r): readonly [number, number] => {
            const [from = 0, to = from] = r.split('-').map(Number);
            return [from, to];
          });
        return { id, port, master: flags.split(',').includes('master'), masterId, failed: /fail/.test(flags), slots };
      });
  }

  /** The masters now serving slots (a master with no replica online is skipped when `withReplica`). */
  async masters(): Promise<number[]> {
    const nodes = await this.nodes();
    return nodes.filter((n) => n.master && !n.failed && nodes.some((r) => r.masterId === n.id && !r.failed)).map((n) => n.port);
  }

  /** The port of the master serving `key`'s slot. */
  async masterFor(key: string): Promise<number> {
    const from = this.ports.find((p) => this.alive(p)) ?? 0;
    const slot = Number(await this.cli(from, 'CLUSTER', 'KEYSLOT', key));
    const master = (await this.nodes()).find((n) => n.master && !n.failed && n.slots.some(([a, b]) => slot >= a && slot <= b));
    if (master === undefined) throw new Error(`no master serves slot ${slot} (${key})`);
    return master.port;
  }

  /**
   * Kills a master (SIGKILL; `port`, or the first master that has a live replica) and waits until its replica has
   * taken over and the cluster is ok again. The killed node stays down until `restart(port)`. With `replicaLagMs`,
   * the replica is stopped (SIGSTOP) and its replication link cut that long first (and `duringLag` runs meanwhile),
   * and resumed at the kill: it misses what the master acknowledged meanwhile, as a lagging replica does, and is
   * promoted without it.
   */
  async failover(port?: number, options: { readonly replicaLagMs?: number; readonly duringLag?: () => Promise<void> } = {}): Promise<FailoverRecord> {
    const nodes = await this.nodes();
    const candidates = await this.masters();
    const target = port ?? candidates[0];
    const master = nodes.find((n) => n.port === target && n.master);
    if (target === undefined || master === undefined) throw new Error(`no master with a live replica to fail over (asked for ${String(port)})`);
    const replica = nodes.find((n) => n.masterId === master.id && !n.failed);
    if (replica === undefined) throw new Error(`master ${target} has no live replica`);
    const lagMs = options.replicaLagMs ?? 0;
    const stalled = lagMs > 0 ? this.children.get(replica.port) : undefined;
    if (stalled !== undefined) {
      // the replica falls behind (a network hiccup, a slow disk): the master goes on acknowledging writes it lacks
      stalled.kill('SIGSTOP');
      // and its link drops: what the master writes from now on it never sends (a stopped process would still find
      // it in its socket's buffer on waking)
      await this.cli(target, 'CLIENT', 'KILL', 'TYPE', 'replica');
      const started = Date.now();
      await options.duringLag?.();
      await sleep(Math.max(0, lagMs - (Date.now() - started)));
    }
    const started = Date.now();
    await this.kill(target);
    stalled?.kill('SIGCONT');
    await until(
      `replica ${replica.port} to take over from ${target}`,
      async () => (/^role:master\r?$/m.test(await this.cli(replica.port, 'INFO', 'replication')) ? true : undefined),
      60_000,
    );
    await until(
      'cluster_state:ok after the failover',
      async () => {
        for (const p of this.ports.filter((q) => this.alive(q))) {
          if (!/^cluster_state:ok\r?$/m.test(await this.cli(p, 'CLUSTER', 'INFO'))) return undefined;
        }
        return true;
      },
      60_000,
    );
    return { killed: target, promoted: replica.port, tookMs: Date.now() - started };
  }

  /** SIGKILLs one node and waits for it to be gone. */
  async kill(port: number): Promise<void> {
    const child = this.children.get(port);
    if (child === undefined || !this.alive(port)) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGKILL');
    await exited;
  }

  /** Starts a killed node again (its nodes.conf kept): it rejoins, as a replica if its slots moved meanwhile. */
  async restart(port: number): Promise<void> {
    if (this.alive(port)) return;
    this.spawnNode(port);
    await until(`redis-server on ${port} again`, async () => ((await this.cli(port, 'PING')) === 'PONG' ? true : undefined), 10_000);
    await this.whole(60_000);
  }

  /** Runs one command on one node through redis-cli; its reply as text. */
  async cli(port: number, ...args: string[]): Promise<string> {
    const { stdout } = await run('redis-cli', ['-h', this.address, '-p', String(port), '-a', this.password, '--no-auth-warning', ...args], {
      timeout: 10_000,
    });
    return stdout.trim();
  }

  /** Runs a command on every live master (e.g. FLUSHALL); their replies. */
  async onMasters(...args: string[]): Promise<string[]> {
    const masters = (await this.nodes()).filter((n) => n.master && !n.failed).map((n) => n.port);
    return Promise.all(masters.map((p) => this.cli(p, ...args)));
  }

  /** Runs a command on every live node; their replies. */
  async onAll(...args: string[]): Promise<string[]> {
    return Promise.all(this.ports.filter((p) => this.alive(p)).map((p) => this.cli(p, ...args)));
  }

  /** Kills every node this cluster started and removes its directory. */
  async stop(): Promise<void> {
    await Promise.all(this.ports.map((p) => this.kill(p)));
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
