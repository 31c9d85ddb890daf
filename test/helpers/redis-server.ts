/**
 * A redis-server of a test's own (AOF on, like production), which the test may kill and restart on the same port
 * and data directory.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import IORedis from 'ioredis';
import { freePort } from './net';
import { waitFor } from './wait';

export class OwnRedis {
  private child: ChildProcess | null = null;
  private constructor(
    readonly port: number,
    readonly dir: string,
    private readonly extraArgs: readonly string[],
    private readonly env: Readonly<Record<string, string>>,
  ) {}

  /**
   * `extraArgs` go to redis-server as they are (e.g. `['--replicaof', '127.0.0.1', '6379']`), `env` into its
   * environment (e.g. an LD_PRELOAD: test/helpers/clock.ts)
   */
  static async start(extraArgs: readonly string[] = [], env: Readonly<Record<string, string>> = {}): Promise<OwnRedis> {
    const redis = new OwnRedis(await freePort(), fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-test-redis-')), extraArgs, env);
    await redis.restart();
    return redis;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  /** (Re)starts the server on the same port and data directory and waits until it answers. */
  async restart(): Promise<void> {
    this.child = spawn(
      'redis-server',
      [
        '--port',
        String(this.port),
        '--bind',
        '127.0.0.1',
        '--dir',
        this.dir,
        '--appendonly',
        'yes',
        '--save',
        '',
        '--maxmemory-policy',
        'noeviction',
        ...this.extraArgs,
      ],
      { stdio: 'ignore', env: { ...process.env, ...this.env } },
    );
    await waitFor('redis-server to answer', async () => {
      const probe = new IORedis(this.url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
      probe.on('error', () => undefined);
      try {
        await probe.connect();
        return (await probe.ping()) === 'PONG' ? true : undefined;
      } catch {
        return undefined;
      } finally {
        probe.disconnect();
      }
    });
  }

  /** Stops the server: SIGTERM (a clean shutdown) or SIGKILL (a crash). */
  async kill(signal: 'SIGTERM' | 'SIGKILL'): Promise<void> {
    const child = this.child;
    if (child === null || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill(signal);
    await exited;
    this.child = null;
  }

  /** Freezes the server (SIGSTOP): connections stay open and nothing answers, as with a hung host. */
  pause(): void {
    this.child?.kill('SIGSTOP');
  }

  /** Thaws a paused server (SIGCONT): it answers what it was sent meanwhile. */
  resume(): void {
    this.child?.kill('SIGCONT');
  }

  /** Deletes the data directory's contents (the server must be stopped): the next start is an empty Redis. */
  wipe(): void {
    if (this.child !== null) throw new Error('wipe() needs a stopped server');
    for (const entry of fs.readdirSync(this.dir)) fs.rmSync(path.join(this.dir, entry), { recursive: true, force: true });
  }

  async stop(): Promise<void> {
    this.resume();
    await this.kill('SIGTERM');
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
