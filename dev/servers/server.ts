/**
 * One running server process (redis-server or postgres): spawning it in its own session with its output in a log
 * file, waiting until a probe says it is ready, stopping it with escalating signals, and picking free ports.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import type { ChildProcess } from 'node:child_process';
import { settleWithin, sleep } from '../../src/util';
import { fileSize, logTail } from './fs-helpers';
import type { RunAs } from './os-user';
import { serverEnv } from './process';

/** A spawned server process; `done` resolves when it has exited, whyever. */
export class Server {
  exited = false;
  /** why it exited */
  why = '';
  /** set once it answered; exits after that (and not asked for) are reported */
  ready = false;
  private stopRequested = false;
  readonly done: Promise<void>;

  constructor(
    readonly name: string,
    readonly child: ChildProcess,
    readonly logFile: string,
    readonly logFrom: number,
    private readonly onUnexpectedExit: (s: Server, why: string) => void,
  ) {
    this.done = new Promise((resolve) => {
      const finish = (why: string): void => {
        if (this.exited) return;
        this.exited = true;
        this.why = why;
        if (this.ready && !this.stopRequested) this.onUnexpectedExit(this, why);
        resolve();
      };
      child.once('error', (err) => finish(err.message));
      child.once('exit', (code, sig) => finish(sig ? `killed by ${sig}` : `exit code ${String(code)}`));
    });
  }

  get pid(): number | undefined {
    return this.exited ? undefined : this.child.pid;
  }

  /** Signals `sigs` in turn, waiting `ms` after each, until the process is gone. */
  async stop(steps: [NodeJS.Signals, number][]): Promise<void> {
    this.stopRequested = true;
    this.child.ref();
    for (const [sig, ms] of [...steps, ['SIGKILL', 10_000] as [NodeJS.Signals, number]]) {
      if (this.exited) return;
      this.child.kill(sig);
      await settleWithin(this.done, ms);
    }
  }

  failure(what: string): Error {
    return new Error(`${what}; log ${this.logFile}:\n${logTail(this.logFile, this.logFrom)}`);
  }
}

export function spawnServer(
  name: string,
  bin: string,
  args: string[],
  logFile: string,
  cwd: string,
  runAs: RunAs | undefined,
  onUnexpectedExit: (s: Server, why: string) => void,
  netns?: string,
): Server {
  const from = fileSize(logFile);
  const fd = fs.openSync(logFile, 'a');
  let child: ChildProcess;
  // the server's files (Redis's AOF holds job payloads) are private: 0600 files in 0700 folders
  const umask = process.umask(0o077);
  try {
    // in a lab host: nsenter joins the namespace, drops to the server's user and execs the server (same pid)
    const user = runAs ? ['-S', String(runAs.uid), '-G', String(runAs.gid)] : [];
    const [command, argv] = netns === undefined ? [bin, args] : ['nsenter', [`--net=/run/netns/${netns}`, ...user, '--', bin, ...args]];
    child = spawn(command, argv, {
      stdio: ['ignore', fd, fd],
      env: serverEnv(runAs),
      detached: true, // own session: a terminal ^C goes to the application, which then stops us
      cwd: runAs ? '/' : cwd,
      ...(runAs && netns === undefined ? { uid: runAs.uid, gid: runAs.gid } : {}),
    });
  } finally {
    process.umask(umask);
    fs.closeSync(fd);
  }
  child.unref(); // do not keep the parent alive; the exit hook stops us
  return new Server(name, child, logFile, from, onUnexpectedExit);
}

export async function waitReady(server: Server, probe: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (server.exited) throw server.failure(`${server.name} exited during startup (${server.why})`);
    // check `exited` again after a successful probe: it must be *our* server that answered
    if ((await probe()) && !server.exited) {
      server.ready = true;
      return;
    }
    if (Date.now() > deadline) throw server.failure(`${server.name} did not become ready within ${timeoutMs / 1000}s`);
    await sleep(50);
  }
}

/** A free loopback port (the OS picks it), not one of `exclude`. */
export async function freePort(exclude: ReadonlySet<number>): Promise<number> {
  for (;;) {
    const port = await new Promise<number>((resolve, reject) => {
      const srv = net.createServer();
      srv.unref();
      srv.once('error', reject);
      srv.listen(0, '127.0.0.1', () => {
        const addr = srv.address();
        srv.close(() => resolve(typeof addr === 'object' && addr ? addr.port : 0));
      });
    });
    if (port > 0 && !exclude.has(port)) return port;
  }
}

export const PORT_RACE = /already in use/i; // port taken between choosing and binding, or shm of an orphan
