/**
 * A Redis Cluster of a test's own: 3 masters with a replica each, `redis-server --cluster-enabled yes` on free
 * loopback ports in a temporary directory, password-protected, created with `redis-cli --cluster create`. Its URL is
 * the fleet's cluster form (`redis+cluster://:password@127.0.0.1:P1,.../`). `stop()` kills every node it started and
 * removes the directory.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { waitFor } from './wait';

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
async function clusterPorts(count: number): Promise<number[]> {
  const ports: number[] = [];
  for (let tries = 0; ports.length < count && tries < 1000; tries++) {
    const port = 20_000 + Math.floor(Math.random() * 20_000);
    if (ports.some((p) => Math.abs(p - port) < 1 || p + 10_000 === port || port + 10_000 === p)) continue;
    if ((await portFree(port)) && (await portFree(port + 10_000))) ports.push(port);
  }
  if (ports.length < count) throw new Error('no free loopback ports for a Redis Cluster');
  return ports;
}

export class OwnRedisCluster {
  private constructor(
    readonly ports: readonly number[],
    readonly password: string,
    readonly dir: string,
    private readonly children: ChildProcess[],
  ) {}

  /** The fleet's REDIS_URL for this cluster (all nodes as seeds). */
  get url(): string {
    return `redis+cluster://:${this.password}@${this.ports.map((p) => `127.0.0.1:${p}`).join(',')}/`;
  }

  static async start(masters = 3, replicasEach = 1): Promise<OwnRedisCluster> {
    const ports = await clusterPorts(masters * (1 + replicasEach));
    const password = randomBytes(12).toString('hex');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-test-cluster-'));
    const children = ports.map((port) => {
      const nodeDir = path.join(dir, String(port));
      fs.mkdirSync(nodeDir);
      const child = spawn(
        'redis-server',
        [
          '--port', String(port),
          '--bind', '127.0.0.1',
          '--dir', nodeDir,
          '--cluster-enabled', 'yes',
          '--cluster-config-file', `nodes-${port}.conf`,
          '--cluster-node-timeout', '5000',
          '--requirepass', password,
          '--masterauth', password,
          '--appendonly', 'no',
          '--save', '',
          '--maxmemory-policy', 'noeviction',
        ],
        { stdio: 'ignore' },
      );
      child.on('error', () => undefined); // a missing redis-server shows as the wait below failing
      return child;
    });
    const cluster = new OwnRedisCluster(ports, password, dir, children);
    try {
      for (const port of ports) await waitFor(`redis-server on ${port}`, async () => ((await cluster.cli(port, 'PING')) === 'PONG' ? true : undefined), 10_000);
      await run(
        'redis-cli',
        ['-a', password, '--no-auth-warning', '--cluster', 'create', ...ports.map((p) => `127.0.0.1:${p}`), '--cluster-replicas', String(replicasEach), '--cluster-yes'],
        { timeout: 60_000 },
      );
      await waitFor(
        'cluster_state:ok on every node',
        async () => {
          for (const port of ports) {
            const info = await cluster.cli(port, 'CLUSTER', 'INFO');
            if (!/^cluster_state:ok\r?$/m.test(info) || !/^cluster_slots_assigned:16384\r?$/m.test(info)) return undefined;
          }
          return true;
        },
        30_000,
      );
      // replicas sync after the cluster forms: until each master has its replicas online, a WAIT there counts none
      await waitFor(
        `every master to have ${replicasEach} replica(s) online`,
        async () => {
          for (const port of ports) {
            const info = await cluster.cli(port, 'INFO', 'replication');
            if (!/^role:master\r?$/m.test(info)) continue;
            if ((info.match(/^slave\d+:.*state=online/gm) ?? []).length < replicasEach) return undefined;
          }
          return true;
        },
        30_000,
      );
    } catch (err) {
      await cluster.stop();
      throw err;
    }
    return cluster;
  }

  /** Runs one command on one node through redis-cli; its reply as text. */
  async cli(port: number, ...args: string[]): Promise<string> {
    const { stdout } = await run('redis-cli', ['-h', '127.0.0.1', '-p', String(port), '-a', this.password, '--no-auth-warning', ...args], { timeout: 10_000 });
    return stdout.trim();
  }

  /** Kills every node this cluster started and removes its directory. */
  async stop(): Promise<void> {
    await Promise.all(
      this.children.map(async (child) => {
        if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
        const exited = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGKILL');
        await exited;
      }),
    );
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
