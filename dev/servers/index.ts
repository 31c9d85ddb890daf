/**
 * Private, throw-away Redis and PostgreSQL servers for development and tests.
 *
 * Everything lives under one directory (`<repo>/.fleet/run` for `npm start`,
 * `<repo>/.fleet/test` for `npm test`): data, pid files and logs. The servers
 * listen on free loopback ports picked at start, never on the default ports, and
 * nothing here touches a system-wide Redis or PostgreSQL service.
 *
 * Layout of `dir`:
 *   owner.lock        lock of the process currently owning these services (created with O_EXCL;
 *                     taken over only when that process is dead)
 *   credentials.json  (mode 0600) the Redis and PostgreSQL passwords, generated at first start
 *   redis.conf        (mode 0600) the part of the Redis configuration that is secret (requirepass)
 *   redis/            Redis working dir (AOF lives in redis/appendonlydir)
 *   redis.pid         Redis pid file (left behind only if Redis was SIGKILLed)
 *   pg/               PostgreSQL data directory (unless `pg-location` says otherwise)
 *   pg-location       (root only) path of the data directory when it had to be
 *                     placed under the temp dir because `fleetpg` cannot reach `dir`
 *   *.log             output of redis-server, initdb, postgres, apt-get
 *
 * Both servers require a password: PostgreSQL (user `fleet`) password authentication on
 * TCP, no Unix-domain socket at all; Redis `requirepass`. The returned URLs carry them, so
 * treat those URLs as secrets. Data directories made by older versions (`initdb --auth=trust`)
 * are switched to password authentication on their next start.
 *
 * When running as root, initdb/postgres run as the dedicated system user
 * `fleetpg` (PostgreSQL refuses to run as root). The servers are started in
 * their own session so that a terminal ^C reaches the application first; they
 * are stopped by `stop()`, on process exit, and on SIGINT/SIGTERM when nobody
 * else handles those signals. SIGHUP is deliberately left alone (see CLEANUP_SIGNALS).
 * Servers orphaned by a killed parent are found and stopped on the next start in
 * the same directory; only processes that are provably ours are signalled: named
 * exactly `redis-server`/`postgres` and running with our config file / data directory.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash, createHmac, pbkdf2Sync, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client } from 'pg';
import type { ChildProcess, SpawnSyncReturns } from 'node:child_process';
import { settleWithin, sleep } from '../../src/util';

export interface LocalServicesOptions {
  /** directory holding data, logs and pid files, e.g. `<repo>/.fleet/run` or `<repo>/.fleet/test` */
  dir: string;
  /** start redis-server? */
  redis: boolean;
  /** start PostgreSQL? */
  postgres: boolean;
  /** wipe `dir` first (tests) instead of reusing persistent data (npm start) */
  fresh: boolean;
  /** test mode: fsync=off, synchronous_commit=off, full_page_writes=off for speed */
  fast: boolean;
  log?: (msg: string) => void;
}

export interface LocalServices {
  /** `redis://:<password>@127.0.0.1:<port>`: a secret, never log it */
  redisUrl?: string;
  /** `postgres://fleet:<password>@127.0.0.1:<port>/fleet`: a secret, never log it */
  databaseUrl?: string;
  redisPort?: number;
  pgPort?: number;
  pgDataDir?: string;
  pgBinDir?: string;
  redisBin?: string;
  /** pid of redis-server (while running) */
  redisPid?: number;
  /** pid of the postmaster (while running) */
  pgPid?: number;
  /** Stops both servers; idempotent; resolves once both processes are gone. */
  stop(): Promise<void>;
  /**
   * Kills redis-server (SIGKILL: a crash; SIGTERM: a clean shutdown), stays down for `downMs` (default 0), then
   * starts it again on the same port and data directory and waits until it has loaded its AOF (`wipe`: with the
   * data deleted while it is down, so it comes back empty, as a lost disk or a fresh replica). For fault tests.
   */
  restartRedis(options?: { signal?: 'SIGKILL' | 'SIGTERM'; downMs?: number; wipe?: boolean }): Promise<void>;
  /**
   * Stops PostgreSQL (`immediate`: SIGQUIT to the postmaster, a crash followed by recovery, as
   * `pg_ctl restart -m immediate`; `fast`: SIGINT), stays down for `downMs` (default 0), then starts it again on the
   * same port and data directory and waits until it accepts connections. For fault tests.
   */
  restartPostgres(options?: { mode?: 'immediate' | 'fast'; downMs?: number }): Promise<void>;
}

/** A required binary is missing and could not be installed; `message` is the command to run. */
export class MissingBinaryError extends Error {
  constructor(readonly command: string) {
    super(command);
    this.name = 'MissingBinaryError';
  }
}

const PG_USER = 'fleet';
const PG_DATABASE = 'fleet';
const OS_USER = 'fleetpg';
const EXTERNAL_PREFIX = 'lifecycle-fleet-pg-';
const INITDB_MARKER = 'fleet-initdb.done';

// ---------------------------------------------------------------------------
// small process / fs helpers



function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

function errCode(err: unknown): string | undefined {
  return err instanceof Error && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

function isExecutableFile(p: string): boolean {
  try {
    fs.accessSync(p, fs.constants.X_OK);
    return fs.statSync(p).isFile();
  } catch {
    return false;
  }
}

/** First executable `name` on PATH, then in `extraDirs`. Symlinks are NOT resolved. */
function which(name: string, extraDirs: string[] = []): string | undefined {
  const dirs = [...(process.env['PATH'] ?? '').split(path.delimiter).filter(Boolean), ...extraDirs];
  for (const d of dirs) {
    const p = path.resolve(d, name);
    if (isExecutableFile(p)) return p;
  }
  return undefined;
}

function readText(file: string): string | undefined {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

function realpathOrSelf(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return path.resolve(p);
  }
}

/** Last `bytes` of `file` from `from` on (to explain a failed start). */
function logTail(file: string, from = 0, bytes = 2000): string {
  try {
    const text = fs.readFileSync(file, 'utf8').slice(from);
    return text.length > bytes ? `...${text.slice(-bytes)}` : text;
  } catch {
    return '';
  }
}

function fileSize(file: string): number {
  try {
    return fs.statSync(file).size;
  } catch {
    return 0;
  }
}

/** Keep one previous log per service so logs in a persistent dir do not grow forever. */
function rotateLog(file: string): void {
  try {
    fs.renameSync(file, `${file}.1`);
  } catch {
    // no previous log
  }
}

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

/** Process state letter from /proc (Linux only). */
function procState(pid: number): string | undefined {
  const stat = readText(`/proc/${pid}/stat`);
  if (stat === undefined) return undefined;
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
}

/** Process start time in clock ticks since boot (Linux only) - tells a reused pid apart. */
function procStartTime(pid: number): string | null {
  const stat = readText(`/proc/${pid}/stat`);
  if (stat === undefined) return null;
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? null;
}

/** Is `pid` a live (not zombie) process? */
export function isProcessAlive(pid: number): boolean {
  // 0 and negative numbers address process groups, not a process
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    if (errCode(err) !== 'EPERM') return false;
  }
  const state = procState(pid);
  return state !== 'Z' && state !== 'X';
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}

async function waitGone(pids: number[], timeoutMs: number): Promise<boolean> {
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
function argvHasPath(argv: string[], flag: string, p: string): boolean {
  return argv.some((a, i) => a === flag && samePath(argv[i + 1], p));
}

/** Live process `pid` (not us) named exactly `comm`, with its cwd `dir` when that is known. */
function liveNamed(pid: number, comm: string, dir: string): ProcInfo | undefined {
  if (pid === process.pid || !isProcessAlive(pid)) return undefined;
  const info = procInfo(pid);
  if (info?.comm !== comm) return undefined;
  if (info.cwd !== undefined && info.cwd !== realpathOrSelf(dir)) return undefined;
  return info;
}

/** Redis' default process title ("<argv0> <addr>:<port>", optionally "[cluster]"...), Redis < 6.2 has no other. */
const REDIS_DEFAULT_TITLE = /^\S*redis-server \S+:\d+( \[\w+\])?$/;

/**
 * Is `pid` a redis-server of ours: named exactly `redis-server`, cwd the Redis dir, and its title (we set
 * proc-title-template) ends with our config file, or its argv still holds `--dir <redisDir>`. A pid read from
 * our pid file is also accepted with Redis' default title (Redis < 6.2, or started by an older version of this
 * module), as long as name and cwd match. Off Linux only the name of a pid-file pid can be checked.
 */
function isOurRedis(pid: number, redisDir: string, confFile: string, fromPidFile: boolean): boolean {
  const info = liveNamed(pid, 'redis-server', redisDir);
  if (!info) return false;
  if (info.argv === undefined) return fromPidFile; // no /proc: `ps -o comm=` matched exactly
  const title = info.argv.filter(Boolean).join(' ').trim();
  if ([confFile, realpathOrSelf(confFile)].some((c) => title.endsWith(` ${c}`))) return true;
  if (argvHasPath(info.argv, '--dir', redisDir)) return true;
  return fromPidFile && info.cwd !== undefined && REDIS_DEFAULT_TITLE.test(title);
}

/** Is `pid` a postmaster of ours: named exactly `postgres` and started with `-D <dataDir>`? */
function isOurPostmaster(pid: number, dataDir: string, fromPidFile: boolean): boolean {
  const info = liveNamed(pid, 'postgres', dataDir);
  if (!info) return false;
  if (info.argv === undefined) return fromPidFile; // no /proc: `ps -o comm=` matched exactly
  return argvHasPath(info.argv, '-D', dataDir);
}

/**
 * Is `pid` a child of one of our postmasters (a backend, the checkpointer, ...), possibly orphaned: named
 * exactly `postgres`, titled `postgres: ...` (children overwrite their argv), cwd `dataDir`, and run by the
 * owner of `dataDir` (PostgreSQL only runs as the owner of its data directory). Linux only.
 */
function isOurPgChild(pid: number, dataDir: string): boolean {
  const info = liveNamed(pid, 'postgres', dataDir);
  if (info?.argv === undefined || info.cwd === undefined) return false;
  let owner: number;
  try {
    owner = fs.statSync(dataDir).uid;
  } catch {
    return false;
  }
  return (info.argv[0] ?? '').startsWith('postgres: ') && info.uid === owner;
}

/** Live processes with cwd `dir` that `isOurs` accepts (Linux only; [] elsewhere). */
function processesInDir(dir: string, isOurs: (pid: number) => boolean): number[] {
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

/** Our redis-servers running in `redisDir` (Linux only). */
function redisProcesses(redisDir: string, confFile: string): number[] {
  return processesInDir(redisDir, (pid) => isOurRedis(pid, redisDir, confFile, false));
}

/** Our postmasters and their (possibly orphaned) children serving `dataDir` (Linux only). */
function pgProcesses(dataDir: string): number[] {
  return processesInDir(dataDir, (pid) => isOurPostmaster(pid, dataDir, false) || isOurPgChild(pid, dataDir));
}

function readPid(file: string): number | undefined {
  const first = readText(file)?.split('\n')[0]?.trim();
  const pid = first ? Number(first) : NaN;
  return Number.isInteger(pid) && pid > 0 ? pid : undefined;
}

/** How long apt-get, initdb... may take before they are stopped and the start fails. */
const RUN_TIMEOUT_MS = 15 * 60_000;

/** Runs a command to completion with its output appended to `logFile`; stops it after `timeoutMs`. */
async function runLogged(
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

async function freePort(exclude: ReadonlySet<number>): Promise<number> {
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

// ---------------------------------------------------------------------------
// binaries

function findRedisServer(): string | undefined {
  // never resolve symlinks here: Debian's redis-server -> redis-check-rdb picks its mode from argv[0]
  return which('redis-server', ['/usr/bin', '/usr/local/bin', '/usr/sbin']);
}

const PG_BINARIES = ['initdb', 'postgres', 'pg_ctl'];

function findPgBinDir(): string | undefined {
  const candidates: string[] = [];
  const initdb = which('initdb');
  if (initdb) candidates.push(path.dirname(realpathOrSelf(initdb)), path.dirname(initdb));
  const pgConfig = which('pg_config');
  if (pgConfig) {
    const r = spawnSync(pgConfig, ['--bindir'], { encoding: 'utf8' });
    if (r.status === 0 && r.stdout.trim()) candidates.push(r.stdout.trim());
  }
  const versions: string[] = [];
  try {
    versions.push(...fs.readdirSync('/usr/lib/postgresql').filter((v) => /^\d+(\.\d+)?$/.test(v)));
  } catch {
    // not a Debian-style install
  }
  versions.sort((a, b) => Number(b) - Number(a));
  candidates.push(...versions.map((v) => `/usr/lib/postgresql/${v}/bin`), '/usr/local/pgsql/bin');
  return candidates.find((d) => PG_BINARIES.every((b) => isExecutableFile(path.join(d, b))));
}

/** The command a user must run to install `pkgs` (Debian names) on this machine. */
function installCommand(pkgs: string[]): string {
  const sudo = isRoot() ? '' : 'sudo ';
  if (!which('apt-get') && which('dnf')) {
    const names = pkgs.map((p) => (p === 'redis-server' ? 'redis' : 'postgresql-server'));
    return `${sudo}dnf install -y ${names.join(' ')}`;
  }
  if (!which('apt-get') && process.platform === 'darwin') {
    const names = pkgs.map((p) => (p === 'redis-server' ? 'redis' : 'postgresql@15'));
    return `brew install ${names.join(' ')}`;
  }
  return `${sudo}apt-get install -y ${pkgs.join(' ')}`;
}

interface Binaries {
  redisBin?: string;
  pgBinDir?: string;
}

async function ensureBinaries(opts: LocalServicesOptions, dir: string, log: (m: string) => void): Promise<Binaries> {
  const find = (): Binaries => ({
    redisBin: opts.redis ? findRedisServer() : undefined,
    pgBinDir: opts.postgres ? findPgBinDir() : undefined,
  });
  let bins = find();
  const missing = (b: Binaries): string[] => [
    ...(opts.redis && !b.redisBin ? ['redis-server'] : []),
    ...(opts.postgres && !b.pgBinDir ? ['postgresql'] : []),
  ];
  const pkgs = missing(bins);
  if (pkgs.length === 0) return bins;

  const aptGet = which('apt-get');
  if (!(isRoot() && aptGet && fs.existsSync('/etc/debian_version'))) throw new MissingBinaryError(installCommand(pkgs));
  const aptLog = path.join(dir, 'apt-get.log');
  log(`installing ${pkgs.join(' ')} with apt-get (output in ${aptLog})`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  await runLogged(aptGet, ['update'], aptLog, { env });
  await runLogged(aptGet, ['install', '-y', ...pkgs], aptLog, { env });
  bins = find();
  const still = missing(bins);
  if (still.length > 0) throw new Error(`apt-get installed ${still.join(' ')} but the binaries are still not found; see ${aptLog}`);
  return bins;
}

// ---------------------------------------------------------------------------
// root: the fleetpg OS user

interface RunAs {
  name: string;
  uid: number;
  gid: number;
}

function lookupUser(name: string): RunAs | undefined {
  const uid = spawnSync('id', ['-u', name], { encoding: 'utf8' });
  const gid = spawnSync('id', ['-g', name], { encoding: 'utf8' });
  if (uid.status !== 0 || gid.status !== 0) return undefined;
  return { name, uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) };
}

function ensureOsUser(log: (m: string) => void): RunAs {
  const existing = lookupUser(OS_USER);
  if (existing) return existing;
  const shell = ['/usr/sbin/nologin', '/sbin/nologin'].find((s) => fs.existsSync(s)) ?? '/bin/false';
  const useradd = which('useradd', ['/usr/sbin', '/sbin']);
  const adduser = which('adduser', ['/usr/sbin', '/sbin']);
  let r: SpawnSyncReturns<string> | undefined;
  if (useradd) {
    r = spawnSync(
      useradd,
      ['--system', '--user-group', '--no-create-home', '--home-dir', '/nonexistent', '--shell', shell, OS_USER],
      { encoding: 'utf8' },
    );
  } else if (adduser) {
    r = spawnSync(adduser, ['-S', '-D', '-H', '-s', shell, OS_USER], { encoding: 'utf8' }); // busybox
  }
  const created = lookupUser(OS_USER); // also covers a concurrent creation
  if (!created) {
    const why = r ? `${r.stderr}`.trim() : 'neither useradd nor adduser is available';
    throw new Error(`PostgreSQL refuses to run as root and the system user ${OS_USER} could not be created: ${why}`);
  }
  log(`created system user ${OS_USER} (uid ${created.uid}) to run PostgreSQL`);
  return created;
}

/** Can `user` reach `dir` (search permission on it and all its ancestors)? */
function canTraverse(dir: string, user: RunAs): boolean {
  const test = ['/usr/bin/test', '/bin/test'].find(isExecutableFile) ?? 'test';
  return spawnSync(test, ['-x', dir], { uid: user.uid, gid: user.gid, cwd: '/', stdio: 'ignore' }).status === 0;
}

function externalBaseFor(dir: string): string[] {
  const hash = createHash('sha256').update(dir).digest('hex').slice(0, 12);
  return [...new Set([os.tmpdir(), '/tmp', '/var/tmp'])].map((t) => path.join(t, `${EXTERNAL_PREFIX}${hash}`));
}

function isExternalDataDir(p: string): boolean {
  return path.isAbsolute(p) && path.basename(p) === 'data' && path.basename(path.dirname(p)).startsWith(EXTERNAL_PREFIX);
}

function recordedPgLocation(dir: string): string | undefined {
  const recorded = readText(path.join(dir, 'pg-location'))?.trim();
  return recorded && isExternalDataDir(recorded) ? recorded : undefined;
}

/** Creates (root) `base` as a private directory owned by `user`, refusing anything suspicious. */
function prepareExternalBase(base: string, user: RunAs): void {
  try {
    fs.mkdirSync(base, { mode: 0o700 });
  } catch (err) {
    if (errCode(err) !== 'EEXIST') throw err;
  }
  const st = fs.lstatSync(base);
  if (!st.isDirectory() || (st.uid !== 0 && st.uid !== user.uid)) {
    throw new Error(`refusing to use ${base} for PostgreSQL data: not a directory owned by root or ${user.name}`);
  }
  fs.chownSync(base, user.uid, user.gid);
  fs.chmodSync(base, 0o700);
}

/** Chooses the data directory: `<dir>/pg`, or (root, unreachable `dir`) a private dir under the temp dir. */
function choosePgDataDir(dir: string, user: RunAs | undefined, log: (m: string) => void): string {
  const local = path.join(dir, 'pg');
  if (!user) return local;
  const recorded = recordedPgLocation(dir);
  if (recorded) {
    prepareExternalBase(path.dirname(recorded), user);
    return recorded;
  }
  if (canTraverse(dir, user)) return local;
  const base = externalBaseFor(dir).find((b) => canTraverse(path.dirname(b), user));
  if (!base) throw new Error(`user ${OS_USER} can reach neither ${dir} nor a temp directory for PostgreSQL data`);
  if (fs.existsSync(path.join(local, 'PG_VERSION'))) log(`${OS_USER} can no longer reach ${local}; not using it`);
  prepareExternalBase(base, user);
  const dataDir = path.join(base, 'data');
  fs.writeFileSync(path.join(dir, 'pg-location'), `${dataDir}\n`);
  log(`user ${OS_USER} cannot traverse ${dir}; PostgreSQL data goes to ${dataDir} (recorded in ${dir}/pg-location)`);
  return dataDir;
}

// ---------------------------------------------------------------------------
// leftovers of earlier runs

// ---------------------------------------------------------------------------
// ownership of `dir`: one starter at a time

interface LockRecord {
  pid: number;
  /** process start time (Linux), tells a reused pid apart */
  start: string | null;
  /** tells this lock apart from any other lock of the same process */
  token: string;
}

const LOCK_FILE = 'owner.lock';
/** held (created with O_EXCL) only for the few synchronous steps that remove a stale lock */
const TAKEOVER_FILE = 'owner.lock.takeover';
/** written by versions before owner.lock; honoured so that an old, still running owner is not trampled */
const LEGACY_OWNER_FILE = 'owner.json';

/** dirs this process is starting or running services in */
const claimed = new Set<string>();

interface LockState {
  raw: string;
  ino: number;
  mtimeMs: number;
  /** undefined: empty or unparsable (being written right now, or garbage) */
  rec?: LockRecord;
}

function readLock(file: string): LockState | undefined {
  let st: fs.Stats;
  let raw: string;
  try {
    st = fs.statSync(file);
    raw = fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
  let rec: LockRecord | undefined;
  try {
    const v = JSON.parse(raw) as Partial<LockRecord>;
    if (typeof v.pid === 'number' && typeof v.token === 'string') rec = { pid: v.pid, start: v.start ?? null, token: v.token };
  } catch {
    rec = undefined;
  }
  return { raw, ino: st.ino, mtimeMs: st.mtimeMs, rec };
}

/** Is the process that wrote `rec` still running (and not another process that got its pid)? */
function holderAlive(rec: { pid: number; start?: string | null }): boolean {
  // our own pid: a lock a previous instance in this process failed to remove (`claimed` rules out a live one)
  if (rec.pid === process.pid || !isProcessAlive(rec.pid)) return false;
  const start = procStartTime(rec.pid);
  return rec.start === undefined || rec.start === null || start === null || start === rec.start;
}

function inUse(dir: string, pid: number): Error {
  return new Error(`local services in ${dir} are in use by process ${pid}; stop it first or use another directory`);
}

/** Runs `fn` (synchronous, short) holding the takeover file of `dir`. */
async function underTakeoverLock(dir: string, fn: () => void): Promise<void> {
  const file = path.join(dir, TAKEOVER_FILE);
  for (let attempt = 1; ; attempt++) {
    try {
      fs.writeFileSync(file, `${process.pid}\n`, { flag: 'wx' });
      break;
    } catch (err) {
      if (errCode(err) !== 'EEXIST') throw err;
    }
    // it is held for a few synchronous file operations: one that stays belongs to a process killed meanwhile
    const holder = readPid(file);
    const age = Date.now() - (fs.statSync(file, { throwIfNoEntry: false })?.mtimeMs ?? Date.now());
    if ((holder !== undefined && holder !== process.pid && !isProcessAlive(holder)) || age > 10_000) {
      fs.rmSync(file, { force: true });
    } else if (attempt > 1000) {
      throw new Error(`${file} stays in the way; remove it if no other process is starting services in ${dir}`);
    } else {
      await sleep(10);
    }
  }
  try {
    fn();
  } finally {
    fs.rmSync(file, { force: true });
  }
}

/**
 * Makes this process the owner of `dir`: creates `owner.lock` with O_EXCL. A lock whose process is dead is
 * removed, under the takeover file and only if it is still the very file found stale, then creation is tried
 * again; so of any number of concurrent starters exactly one wins, and the others fail with "in use by N".
 */
async function acquireLock(dir: string): Promise<LockRecord> {
  const file = path.join(dir, LOCK_FILE);
  const mine: LockRecord = { pid: process.pid, start: procStartTime(process.pid), token: randomBytes(12).toString('hex') };
  for (let attempt = 1; attempt <= 1000; attempt++) {
    try {
      const fd = fs.openSync(file, 'wx', 0o644);
      try {
        fs.writeSync(fd, `${JSON.stringify(mine)}\n`);
      } finally {
        fs.closeSync(fd);
      }
      if (readLock(file)?.rec?.token === mine.token) return mine; // re-check after writing
      continue;
    } catch (err) {
      if (errCode(err) !== 'EEXIST') throw err;
    }
    const held = readLock(file);
    if (held === undefined) continue; // released meanwhile
    if (held.rec === undefined) {
      // created but not written yet (a writer is between open and write): give it a moment
      if (Date.now() - held.mtimeMs < 5000) {
        await sleep(10);
        continue;
      }
    } else if (holderAlive(held.rec)) {
      throw inUse(dir, held.rec.pid);
    }
    await underTakeoverLock(dir, () => {
      const now = readLock(file);
      if (now?.ino === held.ino && now.raw === held.raw) fs.rmSync(file, { force: true });
    });
  }
  throw new Error(`could not take ${file}`);
}

/** Removes our lock (synchronous: also used on process exit). */
function releaseLock(dir: string, token: string): void {
  const file = path.join(dir, LOCK_FILE);
  if (readLock(file)?.rec?.token === token) fs.rmSync(file, { force: true });
}

/** Throws if an older version of this module, still running, owns `dir`; else removes its record. */
function checkLegacyOwner(dir: string): void {
  const file = path.join(dir, LEGACY_OWNER_FILE);
  let rec: { pid?: unknown; start?: unknown };
  try {
    rec = JSON.parse(fs.readFileSync(file, 'utf8')) as { pid?: unknown; start?: unknown };
  } catch {
    fs.rmSync(file, { force: true });
    return;
  }
  if (typeof rec.pid === 'number' && holderAlive({ pid: rec.pid, start: typeof rec.start === 'string' ? rec.start : null })) {
    throw inUse(dir, rec.pid);
  }
  fs.rmSync(file, { force: true });
}

// ---------------------------------------------------------------------------
// credentials

interface Credentials {
  redisPassword: string;
  postgresPassword: string;
}

const CREDENTIALS_FILE = 'credentials.json';

function newPassword(): string {
  return randomBytes(24).toString('hex');
}

/** Writes `file` with mode 0600 (owned by `owner` when given), atomically. */
function writePrivateFile(file: string, text: string, owner?: RunAs): void {
  const tmp = `${file}.${process.pid}.tmp`;
  fs.rmSync(tmp, { force: true });
  fs.writeFileSync(tmp, text, { mode: 0o600, flag: 'wx' });
  try {
    if (owner) fs.chownSync(tmp, owner.uid, owner.gid);
    fs.renameSync(tmp, file);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw err;
  }
}

/**
 * The passwords of `dir` from credentials.json (mode 0600), created or completed as needed. `created` lists
 * the passwords made up just now (none existed before).
 */
function loadCredentials(dir: string): { creds: Credentials; created: Set<keyof Credentials> } {
  const file = path.join(dir, CREDENTIALS_FILE);
  let stored: Partial<Record<keyof Credentials, unknown>> = {};
  const st = fs.lstatSync(file, { throwIfNoEntry: false });
  if (st) {
    if (!st.isFile()) throw new Error(`${file} is not a regular file`);
    if ((st.mode & 0o077) !== 0) fs.chmodSync(file, 0o600);
    try {
      stored = JSON.parse(fs.readFileSync(file, 'utf8')) as typeof stored;
    } catch {
      stored = {};
    }
  }
  const created = new Set<keyof Credentials>();
  const pick = (key: keyof Credentials): string => {
    const v = stored[key];
    if (typeof v === 'string' && v !== '' && !/[\s"'\\]/.test(v)) return v;
    created.add(key);
    return newPassword();
  };
  const creds: Credentials = { redisPassword: pick('redisPassword'), postgresPassword: pick('postgresPassword') };
  if (created.size > 0) writePrivateFile(file, `${JSON.stringify(creds, null, 2)}\n`);
  return { creds, created };
}

/** A SCRAM-SHA-256 verifier for `password`, as PostgreSQL stores it (so the password itself never reaches it). */
function scramVerifier(password: string): string {
  const salt = randomBytes(16);
  const iterations = 4096;
  const salted = pbkdf2Sync(password, salt, iterations, 32, 'sha256');
  const clientKey = createHmac('sha256', salted).update('Client Key').digest();
  const storedKey = createHash('sha256').update(clientKey).digest();
  const serverKey = createHmac('sha256', salted).update('Server Key').digest();
  const b64 = (b: Buffer): string => b.toString('base64');
  return `SCRAM-SHA-256$${iterations}:${b64(salt)}$${b64(storedKey)}:${b64(serverKey)}`;
}

/** pg_hba method for TCP: scram-sha-256 (PostgreSQL 14+ stores passwords that way); md5 before (accepts both). */
function hostAuthMethod(major: number): string {
  return major >= 14 ? 'scram-sha-256' : 'md5';
}

/** Does pg_hba.conf let TCP clients in without a password (a data directory of `initdb --auth=trust`)? */
function hbaTrustsHost(dataDir: string): boolean {
  const text = readText(path.join(dataDir, 'pg_hba.conf')) ?? '';
  return text.split('\n').some((line) => {
    const fields = line.replace(/#.*/, '').trim().split(/\s+/);
    return (fields[0] ?? '').startsWith('host') && fields.includes('trust');
  });
}

function hbaConf(method: string): string {
  return [
    '# written by lifecycle-fleet (dev/servers): passwords over TCP; the Unix-domain socket is disabled',
    '# TYPE  DATABASE        USER            ADDRESS                 METHOD',
    'local   all             all                                     trust',
    `host    all             all             127.0.0.1/32            ${method}`,
    `host    all             all             ::1/128                 ${method}`,
    'local   replication     all                                     trust',
    `host    replication     all             127.0.0.1/32            ${method}`,
    `host    replication     all             ::1/128                 ${method}`,
    '',
  ].join('\n');
}

/** Quotes `s` for a redis.conf line. */
function redisQuote(s: string): string {
  return `"${s.replace(/[\\"]/g, (c) => `\\${c}`).replace(/\n/g, '\\n')}"`;
}

/** Redis 6.2+ has proc-title-template, which lets us keep our config file in the process title. */
function redisHasTitleTemplate(bin: string): boolean {
  const r = spawnSync(bin, ['--version'], { encoding: 'utf8' });
  const m = /v=(\d+)\.(\d+)/.exec(r.stdout ?? '');
  return m !== null && (Number(m[1]) > 6 || (Number(m[1]) === 6 && Number(m[2]) >= 2));
}

// ---------------------------------------------------------------------------
// leftovers of earlier runs

async function terminate(pids: number[], sig: NodeJS.Signals, timeoutMs: number): Promise<void> {
  pids.forEach((p) => signal(p, sig));
  if (await waitGone(pids, timeoutMs)) return;
  pids.filter(isProcessAlive).forEach((p) => signal(p, 'SIGKILL'));
  await waitGone(pids, 5000);
}

function redisConfFile(dir: string): string {
  return path.join(dir, 'redis.conf');
}

async function stopLeftoverRedis(dir: string, log: (m: string) => void): Promise<void> {
  const pidFile = path.join(dir, 'redis.pid');
  const redisDir = path.join(dir, 'redis');
  const conf = redisConfFile(dir);
  const pids = new Set(redisProcesses(redisDir, conf));
  const filePid = readPid(pidFile);
  if (filePid !== undefined && isOurRedis(filePid, redisDir, conf, true)) pids.add(filePid);
  if (pids.size > 0) {
    log(`stopping redis-server left over from an earlier run (pid ${[...pids].join(', ')})`);
    await terminate([...pids], 'SIGTERM', 10_000);
  }
  fs.rmSync(pidFile, { force: true });
}

async function stopLeftoverPostgres(dataDir: string, log: (m: string) => void): Promise<void> {
  if (!fs.existsSync(dataDir)) return;
  const pidFile = path.join(dataDir, 'postmaster.pid');
  const filePid = readPid(pidFile);
  const postmaster = filePid !== undefined && isOurPostmaster(filePid, dataDir, true) ? filePid : undefined;
  // a SIGKILLed postmaster leaves backends behind (cwd = data dir) that keep its shared memory busy
  const all = new Set(pgProcesses(dataDir));
  if (postmaster !== undefined) {
    log(`stopping PostgreSQL left over from an earlier run (postmaster pid ${postmaster})`);
    signal(postmaster, 'SIGQUIT'); // = pg_ctl stop -m immediate
    all.add(postmaster);
    await waitGone([...all], 10_000);
  }
  const rest = [...all].filter(isProcessAlive);
  if (rest.length > 0) {
    log(`killing orphaned PostgreSQL processes (pid ${rest.join(', ')})`);
    await terminate(rest, 'SIGKILL', 5000);
  }
  // stale (dead or reused pid): postgres would usually cope, but not if the pid now belongs to another process of ours
  if (postmaster === undefined || !isProcessAlive(postmaster)) fs.rmSync(pidFile, { force: true });
}

/** Empties `dir` (keeping the directory itself, its mode and our lock) and removes its external PG data dir. */
function wipe(dir: string): void {
  if (dir === path.parse(dir).root || dir === os.homedir() || fs.existsSync(path.join(dir, '.git'))) {
    throw new Error(`refusing to wipe ${dir}`);
  }
  const external = [recordedPgLocation(dir), ...externalBaseFor(dir).map((b) => path.join(b, 'data'))];
  for (const dataDir of external) {
    if (!dataDir) continue;
    const base = path.dirname(dataDir);
    try {
      if (fs.lstatSync(base).isDirectory()) fs.rmSync(base, { recursive: true, force: true });
    } catch {
      // not there
    }
  }
  for (const entry of fs.readdirSync(dir)) {
    if (entry === LOCK_FILE || entry === TAKEOVER_FILE) continue;
    fs.rmSync(path.join(dir, entry), { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------------------
// running servers

class Server {
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

function spawnServer(
  name: string,
  bin: string,
  args: string[],
  logFile: string,
  cwd: string,
  runAs: RunAs | undefined,
  onUnexpectedExit: (s: Server, why: string) => void,
): Server {
  const from = fileSize(logFile);
  const fd = fs.openSync(logFile, 'a');
  let child: ChildProcess;
  try {
    child = spawn(bin, args, {
      stdio: ['ignore', fd, fd],
      detached: true, // own session: a terminal ^C goes to the application, which then stops us
      cwd: runAs ? '/' : cwd,
      ...(runAs ? { uid: runAs.uid, gid: runAs.gid } : {}),
    });
  } finally {
    fs.closeSync(fd);
  }
  child.unref(); // do not keep the parent alive; the exit hook stops us
  return new Server(name, child, logFile, from, onUnexpectedExit);
}

async function waitReady(server: Server, probe: () => Promise<boolean>, timeoutMs: number): Promise<void> {
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

/** RESP encoding of one command. */
function resp(...args: string[]): string {
  return `*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('')}`;
}

/** Resolves true when the Redis on `port` takes `password`, is process `pid` and has finished loading its data. */
function redisReady(port: number, pid: number, password: string): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    let buf = '';
    const done = (ok: boolean): void => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(1000, () => done(false));
    sock.once('error', () => done(false));
    sock.once('connect', () => sock.write(resp('AUTH', password) + resp('INFO')));
    sock.on('data', (chunk: Buffer) => {
      buf += chunk.toString('utf8');
      const authEnd = buf.indexOf('\r\n');
      if (authEnd < 0) return;
      if (buf.slice(0, authEnd) !== '+OK') return done(false); // another Redis, or another password
      const info = buf.slice(authEnd + 2);
      const eol = info.indexOf('\r\n');
      if (eol < 0) return;
      if (!info.startsWith('$')) return done(false); // e.g. -LOADING
      const len = Number(info.slice(1, eol));
      if (Buffer.byteLength(info) < eol + 2 + len) return;
      done(info.includes(`\r\nprocess_id:${pid}\r\n`) && info.includes('\r\nloading:0\r\n'));
    });
  });
}

async function pgQuery<T>(port: number, database: string, password: string, fn: (c: Client) => Promise<T>): Promise<T> {
  const client = new Client({ host: '127.0.0.1', port, user: PG_USER, password, database, connectionTimeoutMillis: 2000 });
  client.on('error', () => undefined);
  try {
    await client.connect();
    return await fn(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** PostgreSQL's "password authentication failed" (28P01) and "no pg_hba.conf entry" (28000). */
function isAuthFailure(err: unknown): boolean {
  return err instanceof Error && 'code' in err && (err.code === '28P01' || err.code === '28000');
}

/**
 * Resolves true when the PostgreSQL on `port` accepts connections and serves `dataDir`; throws when it
 * rejects the password, which waiting does not fix.
 */
async function pgReady(port: number, dataDir: string, password: string, credentialsFile: string): Promise<boolean> {
  try {
    const dd = await pgQuery(port, 'postgres', password, (c) => c.query<{ data_directory: string }>('SHOW data_directory'));
    return realpathOrSelf(dd.rows[0]?.data_directory ?? '') === realpathOrSelf(dataDir);
  } catch (err) {
    if (isAuthFailure(err)) {
      throw new Error(
        `PostgreSQL in ${dataDir} rejects the password of ${credentialsFile} (${(err as Error).message}); ` +
          `restore the credentials.json that belongs to it, or delete ${dataDir} (its data will be lost)`,
      );
    }
    return false;
  }
}

/** Does the PostgreSQL on `port` let a client in without the password (i.e. with a wrong one)? */
async function pgAdmitsWithoutPassword(port: number): Promise<boolean> {
  // not '' nor undefined: node-postgres would then fall back to PGPASSWORD and ~/.pgpass
  const wrong = `not-${newPassword()}`;
  const client = new Client({ host: '127.0.0.1', port, user: PG_USER, password: wrong, database: 'postgres', connectionTimeoutMillis: 2000 });
  client.on('error', () => undefined);
  try {
    await client.connect();
    return true;
  } catch {
    return false;
  } finally {
    await client.end().catch(() => undefined);
  }
}

function pgMajorVersion(binDir: string): string {
  const r = spawnSync(path.join(binDir, 'postgres'), ['--version'], { encoding: 'utf8' });
  const m = /(\d+)(?:\.(\d+))?/.exec(r.stdout ?? '');
  if (!m?.[1]) throw new Error(`cannot tell the version of ${binDir}/postgres: ${r.stdout}${r.stderr}`);
  return Number(m[1]) >= 10 ? m[1] : `${m[1]}.${m[2] ?? '0'}`;
}

const PORT_RACE = /already in use/i; // port taken between choosing and binding, or shm of an orphan

// ---------------------------------------------------------------------------
// process-wide cleanup: exit hook and default signal handling

const active = new Set<Instance>();
/**
 * Not SIGHUP: with no listener of ours, SIGHUP keeps its meaning for the application. Under `nohup` (or an
 * application that ignores SIGHUP or uses it to reload) a listener here would have stopped Redis/PostgreSQL
 * underneath a process that goes on running, since Node replaces an inherited SIG_IGN once anyone listens.
 * When SIGHUP does kill the process (its default action, e.g. the terminal closed), the servers, in their own
 * session, outlive it and are stopped by the next start in the same directory.
 */
const CLEANUP_SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM'];

function onExit(): void {
  for (const inst of active) {
    inst.signalAll();
    inst.releaseLock();
  }
}

function onSignal(sig: NodeJS.Signals): void {
  // someone else handles this signal (e.g. with-services, or the application's shutdown): leave it to them
  if (process.listenerCount(sig) > 1) return;
  void Promise.allSettled([...active].map((i) => i.stop())).then(() => {
    uninstallHooks();
    process.kill(process.pid, sig); // default action now that the servers are down
  });
}

function installHooks(): void {
  if (active.size !== 1) return;
  process.on('exit', onExit);
  for (const sig of CLEANUP_SIGNALS) process.on(sig, onSignal);
}

function uninstallHooks(): void {
  process.removeListener('exit', onExit);
  for (const sig of CLEANUP_SIGNALS) process.removeListener(sig, onSignal);
}

class Instance {
  redis?: Server;
  pg?: Server;
  redisPort?: number;
  pgPort?: number;
  pgDataDir?: string;
  private redisStart?: { bin: string; args: string[]; logFile: string; dir: string };
  private pgStart?: { bin: string; args: string[]; logFile: string; dataDir: string; runAs: RunAs | undefined };
  private stopping?: Promise<void>;

  constructor(
    readonly dir: string,
    private readonly opts: LocalServicesOptions,
    private readonly log: (m: string) => void,
    private readonly lockToken: string,
  ) {
    active.add(this);
    installHooks();
  }

  private readonly unexpected = (s: Server, why: string): void => {
    this.log(`${s.name} exited unexpectedly (${why}); see ${s.logFile}`);
  };

  async startRedis(bin: string, password: string, usedPorts: Set<number>): Promise<void> {
    const redisDir = path.join(this.dir, 'redis');
    fs.mkdirSync(redisDir, { recursive: true });
    // secrets go into a 0600 file, not onto the command line (argv is world-readable until Redis retitles itself);
    // the title template keeps this file's path in the title, which is how a later start recognises the server
    const conf = redisConfFile(this.dir);
    writePrivateFile(
      conf,
      [
        '# written by lifecycle-fleet (dev/servers) at every start; the password is in credentials.json',
        `requirepass ${redisQuote(password)}`,
        ...(redisHasTitleTemplate(bin) ? ['proc-title-template "{title} {listen-addr} {server-mode} {config-file}"'] : []),
        '',
      ].join('\n'),
    );
    const logFile = path.join(this.dir, 'redis.log');
    rotateLog(logFile);
    for (let attempt = 1; ; attempt++) {
      const port = await freePort(usedPorts);
      usedPorts.add(port);
      const args = [
        conf,
        '--port', String(port), '--bind', '127.0.0.1', '--protected-mode', 'yes',
        '--dir', redisDir, '--appendonly', 'yes', '--save', '',
        '--maxmemory-policy', 'noeviction', '--daemonize', 'no',
        '--pidfile', path.join(this.dir, 'redis.pid'),
      ];
      this.assertNotStopping();
      const server = spawnServer('redis-server', bin, args, logFile, redisDir, undefined, this.unexpected);
      this.redis = server;
      const pid = server.child.pid ?? -1;
      try {
        await waitReady(server, () => redisReady(port, pid, password), 30_000);
        this.redisPort = port;
        this.redisStart = { bin, args, logFile, dir: redisDir };
        return;
      } catch (err) {
        await server.stop([['SIGTERM', 5000]]);
        if (attempt >= 3 || !PORT_RACE.test(logTail(logFile, server.logFrom))) throw err;
      }
    }
  }

  async startPostgres(
    binDir: string,
    runAs: RunAs | undefined,
    password: string,
    passwordIsNew: boolean,
    usedPorts: Set<number>,
  ): Promise<void> {
    const dataDir = choosePgDataDir(this.dir, runAs, this.log);
    this.pgDataDir = dataDir;
    const major = parseFloat(pgMajorVersion(binDir));
    const credentialsFile = path.join(this.dir, CREDENTIALS_FILE);
    const initialised = await this.initdb(binDir, dataDir, runAs, password);
    const trusting = hbaTrustsHost(dataDir); // made by an older version: switched to passwords below
    if (!initialised && passwordIsNew && !trusting) {
      throw new Error(
        `PostgreSQL in ${dataDir} requires a password, but ${credentialsFile} was missing; ` +
          `restore it, or delete ${dataDir} (its data will be lost)`,
      );
    }

    const logFile = path.join(this.dir, 'postgres.log');
    rotateLog(logFile);
    let port = 0;
    for (let attempt = 1; ; attempt++) {
      port = await freePort(usedPorts);
      usedPorts.add(port);
      const args = [
        '-D', dataDir, '-p', String(port),
        '-c', 'listen_addresses=127.0.0.1', '-c', 'unix_socket_directories=', '-c', 'max_connections=200',
        ...(this.opts.fast ? ['-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off'] : []),
      ];
      this.assertNotStopping();
      const server = spawnServer('postgres', path.join(binDir, 'postgres'), args, logFile, dataDir, runAs, this.unexpected);
      this.pg = server;
      try {
        // crash recovery may take a while
        await waitReady(server, () => pgReady(port, dataDir, password, credentialsFile), 120_000);
        this.pgPort = port;
        this.pgStart = { bin: path.join(binDir, 'postgres'), args, logFile, dataDir, runAs };
        break;
      } catch (err) {
        await server.stop([['SIGINT', 10_000], ['SIGQUIT', 5000]]);
        if (attempt >= 3 || !PORT_RACE.test(logTail(logFile, server.logFrom))) throw err;
        await sleep(500 * attempt);
      }
    }
    if (trusting) await this.requirePassword(port, dataDir, runAs, password, major);
    await pgQuery(port, 'postgres', password, async (c) => {
      const exists = await c.query('SELECT 1 FROM pg_database WHERE datname = $1', [PG_DATABASE]);
      if (exists.rowCount === 0) await c.query(`CREATE DATABASE ${PG_DATABASE}`);
    });
  }

  /** Switches a data directory of `initdb --auth=trust` (older versions) to password authentication. */
  private async requirePassword(port: number, dataDir: string, runAs: RunAs | undefined, password: string, major: number): Promise<void> {
    this.log(`switching PostgreSQL in ${dataDir} to password authentication (password in ${path.join(this.dir, CREDENTIALS_FILE)})`);
    // a pre-hashed password: the password itself appears in no statement, hence in no server log
    const verifier = major >= 10 ? scramVerifier(password) : `md5${createHash('md5').update(password + PG_USER).digest('hex')}`;
    await pgQuery(port, 'postgres', password, (c) => c.query(`ALTER ROLE ${PG_USER} PASSWORD '${verifier}'`));
    writePrivateFile(path.join(dataDir, 'pg_hba.conf'), hbaConf(hostAuthMethod(major)), runAs);
    await pgQuery(port, 'postgres', password, (c) => c.query('SELECT pg_reload_conf()'));
    const deadline = Date.now() + 10_000;
    while (await pgAdmitsWithoutPassword(port)) {
      if (Date.now() > deadline) throw new Error(`PostgreSQL in ${dataDir} still admits clients without a password after reloading pg_hba.conf`);
      await sleep(50);
    }
  }

  /** Creates the cluster unless it exists; true when it did. */
  private async initdb(binDir: string, dataDir: string, runAs: RunAs | undefined, password: string): Promise<boolean> {
    const major = pgMajorVersion(binDir);
    const existing = readText(path.join(dataDir, 'PG_VERSION'))?.trim();
    if (existing !== undefined && fs.existsSync(path.join(dataDir, INITDB_MARKER))) {
      if (existing !== major) {
        throw new Error(
          `${dataDir} holds a PostgreSQL ${existing} cluster but ${binDir} is PostgreSQL ${major}; ` +
            `delete ${dataDir} (its data will be lost) or install PostgreSQL ${existing}`,
        );
      }
      if (runAs && fs.statSync(dataDir).uid !== runAs.uid) {
        spawnSync('chown', ['-R', `${runAs.uid}:${runAs.gid}`, dataDir], { stdio: 'ignore' });
      }
      return false;
    }
    if (fs.existsSync(dataDir)) {
      if (fs.readdirSync(dataDir).length > 0) this.log(`${dataDir} holds an incomplete cluster; re-creating it`);
      fs.rmSync(dataDir, { recursive: true, force: true });
    }
    fs.mkdirSync(dataDir, { mode: 0o700 });
    if (runAs) fs.chownSync(dataDir, runAs.uid, runAs.gid);
    if (!this.opts.fresh) this.log(`initialising PostgreSQL ${major} data directory ${dataDir}`);
    const logFile = path.join(this.dir, 'initdb.log');
    rotateLog(logFile);
    // next to the data directory: a place the server's user can read (and, for root, only it and root)
    const pwFile = path.join(path.dirname(dataDir), 'initdb.pw');
    writePrivateFile(pwFile, `${password}\n`, runAs);
    try {
      const args = [
        '-D', dataDir, '-U', PG_USER, '--pwfile', pwFile,
        // no Unix-domain socket is ever opened (unix_socket_directories=''), so `local` is moot
        '--auth-local=trust', `--auth-host=${hostAuthMethod(parseFloat(major))}`,
        '-E', 'UTF8', '--no-locale', ...(this.opts.fast ? ['--no-sync'] : []),
      ];
      await runLogged(path.join(binDir, 'initdb'), args, logFile, runAs ? { runAs } : {});
    } finally {
      fs.rmSync(pwFile, { force: true });
    }
    fs.writeFileSync(path.join(dataDir, INITDB_MARKER), `initialised ${new Date().toISOString()}\n`);
    if (runAs) fs.chownSync(path.join(dataDir, INITDB_MARKER), runAs.uid, runAs.gid);
    return true;
  }

  async restartRedis(sig: 'SIGKILL' | 'SIGTERM', downMs: number, password: string, wipe = false): Promise<void> {
    const start = this.redisStart;
    const port = this.redisPort;
    if (start === undefined || port === undefined || this.redis === undefined) throw new Error('redis-server is not running here');
    this.assertNotStopping();
    await this.redis.stop([[sig, 15_000]]);
    if (wipe) {
      for (const data of ['appendonlydir', 'dump.rdb']) fs.rmSync(path.join(start.dir, data), { recursive: true, force: true });
    }
    if (downMs > 0) await sleep(downMs);
    this.assertNotStopping();
    const server = spawnServer('redis-server', start.bin, start.args, start.logFile, start.dir, undefined, this.unexpected);
    this.redis = server;
    const pid = server.child.pid ?? -1;
    await waitReady(server, () => redisReady(port, pid, password), 60_000);
  }

  async restartPostgres(mode: 'immediate' | 'fast', downMs: number, password: string): Promise<void> {
    const start = this.pgStart;
    const port = this.pgPort;
    if (start === undefined || port === undefined || this.pg === undefined) throw new Error('PostgreSQL is not running here');
    this.assertNotStopping();
    // SIGQUIT = pg_ctl stop -m immediate: the postmaster kills its backends at once and exits; the next start recovers
    await this.pg.stop(mode === 'immediate' ? [['SIGQUIT', 15_000]] : [['SIGINT', 30_000], ['SIGQUIT', 5000]]);
    // backends the postmaster left behind would keep its shared memory busy
    await waitGone(pgProcesses(start.dataDir), 10_000);
    if (downMs > 0) await sleep(downMs);
    const credentialsFile = path.join(this.dir, CREDENTIALS_FILE);
    for (let attempt = 1; ; attempt++) {
      this.assertNotStopping();
      const server = spawnServer('postgres', start.bin, start.args, start.logFile, start.dataDir, start.runAs, this.unexpected);
      this.pg = server;
      try {
        await waitReady(server, () => pgReady(port, start.dataDir, password, credentialsFile), 120_000);
        return;
      } catch (err) {
        await server.stop([['SIGINT', 10_000], ['SIGQUIT', 5000]]);
        if (attempt >= 5 || !PORT_RACE.test(logTail(start.logFile, server.logFrom))) throw err;
        await sleep(500 * attempt);
      }
    }
  }

  private assertNotStopping(): void {
    if (this.stopping) throw new Error(`local services in ${this.dir} were stopped while starting`);
  }

  /** Synchronous best-effort shutdown request, for process exit. */
  signalAll(): void {
    if (this.redis?.pid) signal(this.redis.pid, 'SIGTERM');
    if (this.pg?.pid) signal(this.pg.pid, 'SIGINT'); // fast shutdown, completes on its own
  }

  releaseLock(): void {
    releaseLock(this.dir, this.lockToken);
  }

  stop(): Promise<void> {
    this.stopping ??= (async () => {
      try {
        await Promise.all([
          this.redis?.stop([['SIGTERM', 15_000]]),
          this.pg?.stop([['SIGINT', 30_000], ['SIGQUIT', 5000]]), // fast, then immediate
        ]);
      } finally {
        this.releaseLock();
        claimed.delete(this.dir);
        active.delete(this);
        if (active.size === 0) uninstallHooks();
      }
    })();
    return this.stopping;
  }
}

// ---------------------------------------------------------------------------

export async function startLocalServices(opts: LocalServicesOptions): Promise<LocalServices> {
  const dir = path.resolve(opts.dir);
  const log = opts.log ?? ((): void => undefined);
  if (claimed.has(dir)) throw new Error(`local services in ${dir} are already running in this process`);
  claimed.add(dir);
  let lock: LockRecord;
  try {
    fs.mkdirSync(dir, { recursive: true });
    lock = await acquireLock(dir);
    try {
      checkLegacyOwner(dir);
    } catch (err) {
      releaseLock(dir, lock.token);
      throw err;
    }
  } catch (err) {
    claimed.delete(dir);
    throw err;
  }

  const inst = new Instance(dir, opts, log, lock.token);
  const usedPorts = new Set<number>();
  const bins: Binaries = {};
  let creds: Credentials;
  try {
    // whatever an earlier (killed) run left running in this dir goes first, wanted or not
    await stopLeftoverRedis(dir, log);
    for (const dataDir of new Set([path.join(dir, 'pg'), recordedPgLocation(dir)])) {
      if (dataDir) await stopLeftoverPostgres(dataDir, log);
    }
    if (opts.fresh) wipe(dir);
    const loaded = loadCredentials(dir);
    creds = loaded.creds;
    Object.assign(bins, await ensureBinaries(opts, dir, log));
    const runAs = opts.postgres && isRoot() ? ensureOsUser(log) : undefined;
    const pgPassword = creds.postgresPassword;
    const results = await Promise.allSettled([
      bins.redisBin ? inst.startRedis(bins.redisBin, creds.redisPassword, usedPorts) : undefined,
      bins.pgBinDir ? inst.startPostgres(bins.pgBinDir, runAs, pgPassword, loaded.created.has('postgresPassword'), usedPorts) : undefined,
    ]);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  } catch (err) {
    await inst.stop();
    throw err;
  }

  const { redisPassword, postgresPassword } = creds;
  const services: LocalServices = {
    redisBin: bins.redisBin,
    pgBinDir: bins.pgBinDir,
    pgDataDir: inst.pgDataDir,
    stop: () => inst.stop(),
    restartRedis: (o = {}) => inst.restartRedis(o.signal ?? 'SIGKILL', o.downMs ?? 0, redisPassword, o.wipe ?? false),
    restartPostgres: (o = {}) => inst.restartPostgres(o.mode ?? 'immediate', o.downMs ?? 0, postgresPassword),
    get redisPid(): number | undefined {
      return inst.redis?.pid;
    },
    get pgPid(): number | undefined {
      return inst.pg?.pid;
    },
  };
  if (inst.redisPort !== undefined) {
    services.redisPort = inst.redisPort;
    services.redisUrl = `redis://:${encodeURIComponent(redisPassword)}@127.0.0.1:${inst.redisPort}`;
  }
  if (inst.pgPort !== undefined) {
    services.pgPort = inst.pgPort;
    services.databaseUrl = `postgres://${PG_USER}:${encodeURIComponent(postgresPassword)}@127.0.0.1:${inst.pgPort}/${PG_DATABASE}`;
  }
  return services;
}
