/**
 * Other processes: inspection through /proc (name, argv, cwd, uid, state, start time), liveness, signals, waiting
 * for pids to be gone, finding processes by working directory, running a helper command (apt-get, initdb) to
 * completion with its output in a log file, and the clean environment the servers and initdb get.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { isProcessAlive, sleep } from '../../src/util';
import { fileSize, logTail, readText, realpathOrSelf } from './fs-helpers';
import type { RunAs } from './os-user';

interface ProcInfo {
  /** the process name: /proc/<pid>/comm on Linux, else the basename of `ps -o comm=` */
  comm: string;
  /** argv (Linux only; servers may overwrite it with a title) */
  argv?: string[];
  /** resolved working directory; undefined when unknown (not Linux, or not permitted) */
  cwd?: string;
  /** effective uid (Linux only) */
  uid?: number;
}

const HAVE_PROC = fs.existsSync('/proc/self/stat');

function procInfo(pid: number): ProcInfo | undefined {
  if (HAVE_PROC) {
    const comm = readText(`/proc/${pid}/comm`);
    if (comm === undefined) return undefined;
    const argv = (readText(`/proc/${pid}/cmdline`) ?? '').split('\0');
    while (argv.length > 0 && argv[argv.length - 1] === '') argv.pop();
    let cwd: string | undefined;
    try {
      cwd = fs.readlinkSync(`/proc/${pid}/cwd`);
    } catch {
      cwd = undefined;
    }
    let uid: number | undefined;
    try {
      uid = fs.statSync(`/proc/${pid}`).uid;
    } catch {
      uid = undefined;
    }
    return { comm: comm.replace(/\n$/, ''), argv, cwd, uid };
  }
  const ps = spawnSync('ps', ['-o', 'comm=', '-p', String(pid)], { encoding: 'utf8' });
  const comm = ps.status === 0 ? ps.stdout.trim() : '';
  return comm ? { comm: path.basename(comm) } : undefined;
}

/** Process start time in clock ticks since boot (Linux only) - tells a reused pid apart. */
export function procStartTime(pid: number): string | null {
  const stat = readText(`/proc/${pid}/stat`);
  if (stat === undefined) return null;
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? null;
}

export { isProcessAlive };

export function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}

export async function waitGone(pids: number[], timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (pids.some(isProcessAlive)) {
    if (Date.now() > deadline) return false;
    await sleep(50);
  }
  return true;
}

function samePath(a: string | undefined, b: string): boolean {
  return a !== undefined && (path.resolve(a) === path.resolve(b) || realpathOrSelf(a) === realpathOrSelf(b));
}

/** Does `argv` hold `flag` followed by the path `p`? */
export function argvHasPath(argv: string[], flag: string, p: string): boolean {
  return argv.some((a, i) => a === flag && samePath(argv[i + 1], p));
}

/** Live process `pid` (not us) named exactly `comm`, with its cwd `dir` when that is known. */
export function liveNamed(pid: number, comm: string, dir: string): ProcInfo | undefined {
  if (pid === process.pid || !isProcessAlive(pid)) return undefined;
  const info = procInfo(pid);
  if (info?.comm !== comm) return undefined;
  if (info.cwd !== undefined && info.cwd !== realpathOrSelf(dir)) return undefined;
  return info;
}

/** Live processes with cwd `dir` that `isOurs` accepts (Linux only; [] elsewhere). */
export function processesInDir(dir: string, isOurs: (pid: number) => boolean): number[] {
  if (!HAVE_PROC || !fs.existsSync(dir)) return [];
  const want = realpathOrSelf(dir);
  const found: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (fs.readlinkSync(`/proc/${entry}/cwd`) !== want) continue;
    } catch {
      continue;
    }
    if (isOurs(Number(entry))) found.push(Number(entry));
  }
  return found;
}

/** What a server's environment may hold: the command path, the locale and the time zone. */
const SERVER_ENV = /^(PATH|LANG|LANGUAGE|LC_[A-Z_]+|TZ)$/;

/**
 * The environment of a server we start (redis-server, postgres) and of initdb: an allow-list of the caller's
 * (PATH, LANG, LANGUAGE, LC_*, TZ) and the HOME of the user it runs as. Never the rest: the caller's environment
 * holds the fleet's configuration (FLEET_BOARD_PASSWORD, tokens), which a superuser of the server, or anyone who
 * can read the server's /proc/<pid>/environ, could otherwise read.
 */
export function serverEnv(runAs: RunAs | undefined): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = Object.fromEntries(Object.entries(process.env).filter(([name]) => SERVER_ENV.test(name)));
  const home = runAs === undefined ? os.homedir() : runAs.home;
  if (home !== undefined && home !== '') env['HOME'] = home;
  return env;
}

/** How long apt-get, initdb... may take before they are stopped and the start fails. */
const RUN_TIMEOUT_MS = 15 * 60_000;

/** Runs a command to completion with its output appended to `logFile`; stops it after `timeoutMs`. */
export async function runLogged(
  cmd: string,
  args: string[],
  logFile: string,
  extra: { env?: NodeJS.ProcessEnv; runAs?: RunAs; timeoutMs?: number } = {},
): Promise<void> {
  const timeoutMs = extra.timeoutMs ?? RUN_TIMEOUT_MS;
  const fd = fs.openSync(logFile, 'a');
  const from = fileSize(logFile);
  fs.writeSync(fd, `\n$ ${[cmd, ...args].join(' ')}\n`);
  let child: ChildProcess;
  try {
    child = spawn(cmd, args, {
      stdio: ['ignore', fd, fd],
      env: extra.env ?? process.env,
      ...(extra.runAs ? { uid: extra.runAs.uid, gid: extra.runAs.gid, cwd: '/' } : {}),
    });
  } finally {
    fs.closeSync(fd);
  }
  let timedOut = false;
  let killTimer: NodeJS.Timeout | undefined;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGTERM');
    killTimer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  }, timeoutMs);
  const result = await new Promise<{ code: number | null; sig: NodeJS.Signals | null; error?: Error }>((resolve) => {
    child.once('error', (error) => resolve({ code: null, sig: null, error }));
    child.once('exit', (code, sig) => resolve({ code, sig }));
  }).finally(() => {
    clearTimeout(timer);
    clearTimeout(killTimer);
  });
  const name = path.basename(cmd) + (args[0] && !args[0].startsWith('-') ? ` ${args[0]}` : ''); // e.g. `apt-get update`
  if (timedOut) {
    const limit = timeoutMs >= 60_000 ? `${Math.round(timeoutMs / 60_000)} min` : `${timeoutMs / 1000} s`;
    throw new Error(`${name} did not finish within ${limit} and was stopped; log ${logFile}:\n${logTail(logFile, from)}`);
  }
  if (result.code !== 0) {
    const why = result.error?.message ?? (result.sig ? `killed by ${result.sig}` : `exit code ${String(result.code)}`);
    throw new Error(`${name} failed (${why}); log ${logFile}:\n${logTail(logFile, from)}`);
  }
}

/** Sends `sig` to `pids`, and SIGKILL to those still alive after `timeoutMs`. */
export async function terminate(pids: number[], sig: NodeJS.Signals, timeoutMs: number): Promise<void> {
  pids.forEach((p) => signal(p, sig));
  if (await waitGone(pids, timeoutMs)) return;
  pids.filter(isProcessAlive).forEach((p) => signal(p, 'SIGKILL'));
  await waitGone(pids, 5000);
}
