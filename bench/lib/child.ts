/**
 * A measured process: the real `fleet worker`, or a bench fixture. Its output goes to a log file under the bench
 * services directory; fixtures also talk to the bench over stdout, one JSON object a line.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { log, now, peakRssMb, repoRoot, sleep } from './common';

export interface ChildOptions {
  /** names the log file */
  readonly label: string;
  /** script and arguments, relative to the repo root (e.g. `bin/fleet.js worker`) */
  readonly args: readonly string[];
  /** the checkout `args` are relative to, and the process's working directory (default: this repo) */
  readonly root?: string;
  readonly env: Readonly<Record<string, string>>;
  /**
   * `log`: ready when the log file matches `readyPattern` (the fleet CLI's pino log).
   * `json`: ready on a `{"ready": true}` line on stdout (fixtures); other lines go to `onMessage`.
   * `poll`: ready when `check()` resolves true (e.g. a `fleet worker` logging at warn, whose start line is info:
   *   its BullMQ workers are seen on Redis).
   */
  readonly ready:
    | { readonly kind: 'log'; readonly pattern: RegExp }
    | { readonly kind: 'json' }
    | { readonly kind: 'poll'; readonly check: () => Promise<boolean> };
  /** write a V8 CPU profile here when the process exits (`node --cpu-prof`) */
  readonly cpuProfDir?: string;
  readonly timeoutMs?: number;
  /**
   * how to start the process (default: `child_process.spawn`); e.g. `NetnsLab.spawn` bound to a lab host, which
   * runs it inside the host's network namespace. The child's pid must be the measured process's own.
   */
  readonly spawn?: (command: string, args: readonly string[], options: SpawnOptions) => ChildProcess;
}

export function logDir(): string {
  const dir = path.join(repoRoot(), '.fleet', 'bench', 'logs');
  fs.mkdirSync(dir, { recursive: true });
  return dir;
}

export class MeasuredProcess {
  private readonly listeners: Array<(message: Record<string, unknown>, at: number) => void> = [];
  private readonly exited: Promise<void>;
  private lastPeakMb: number | null = null;
  /** the `{"ready": true, ...}` line of a fixture */
  readyMessage: Record<string, unknown> = {};

  private constructor(
    readonly child: ChildProcess,
    readonly logFile: string,
  ) {
    this.exited = new Promise((resolve) => child.once('exit', () => resolve()));
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  static async start(options: ChildOptions): Promise<MeasuredProcess> {
    const root = options.root ?? repoRoot();
    const logFile = path.join(logDir(), `${options.label}.log`);
    const fd = fs.openSync(logFile, 'w');
    const nodeArgs = options.cpuProfDir !== undefined ? ['--cpu-prof', `--cpu-prof-dir=${options.cpuProfDir}`] : [];
    const json = options.ready.kind === 'json';
    const child = (options.spawn ?? spawn)(process.execPath, [...nodeArgs, ...options.args], {
      cwd: root,
      env: { ...process.env, ...options.env },
      stdio: ['ignore', json ? 'pipe' : fd, fd],
    });
    fs.closeSync(fd);
    const proc = new MeasuredProcess(child, logFile);
    let ready = false;
    let readyResolve: () => void = () => undefined;
    const readyPromise = new Promise<void>((resolve) => (readyResolve = resolve));
    if (json && child.stdout !== null) {
      let buffered = '';
      child.stdout.setEncoding('utf8');
      child.stdout.on('data', (chunk: string) => {
        const at = now();
        buffered += chunk;
        let nl: number;
        while ((nl = buffered.indexOf('\n')) >= 0) {
          const line = buffered.slice(0, nl);
          buffered = buffered.slice(nl + 1);
          if (line.trim() === '') continue;
          let message: Record<string, unknown>;
          try {
            message = JSON.parse(line) as Record<string, unknown>;
          } catch {
            continue;
          }
          if (message['ready'] === true) {
            proc.readyMessage = message;
            ready = true;
            readyResolve();
          } else {
            for (const l of proc.listeners) l(message, at);
          }
        }
      });
    }

    const deadline = Date.now() + (options.timeoutMs ?? 30_000);
    const pattern = options.ready.kind === 'log' ? options.ready.pattern : null;
    while (!ready) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`${options.label} exited before it was ready; see ${logFile}:\n${tail(logFile)}`);
      }
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`${options.label} was not ready within ${options.timeoutMs ?? 30_000} ms; see ${logFile}`);
      }
      if (pattern !== null && pattern.test(fs.readFileSync(logFile, 'utf8'))) break;
      if (options.ready.kind === 'poll' && (await options.ready.check().catch(() => false))) break;
      await Promise.race([readyPromise, sleep(options.ready.kind === 'poll' ? 100 : 25)]);
    }
    return proc;
  }

  onMessage(listener: (message: Record<string, unknown>, at: number) => void): void {
    this.listeners.push(listener);
  }

  /** VmHWM so far (MiB). */
  peakRssMb(): number | null {
    const value = peakRssMb(this.pid);
    if (value !== null) this.lastPeakMb = value;
    return this.lastPeakMb;
  }

  /** SIGKILL (a crash: nothing closes, nothing is given up), and wait for the exit. */
  async kill(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
    await this.exited;
  }

  /** SIGTERM, wait for a graceful exit (SIGKILL after `graceMs`); returns the peak RSS read just before. */
  async stop(graceMs = 30_000): Promise<number | null> {
    const peak = this.peakRssMb();
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill('SIGTERM');
      const timer = setTimeout(() => {
        log(`${this.logFile}: no exit ${graceMs} ms after SIGTERM; killing`);
        this.child.kill('SIGKILL');
      }, graceMs);
      await this.exited;
      clearTimeout(timer);
    }
    return peak;
  }
}

function tail(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8').slice(-2000);
  } catch {
    return '';
  }
}
