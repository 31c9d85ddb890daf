/**
 * Private, throw-away Redis and PostgreSQL servers for development and tests.
 *
 * Everything lives under one directory (`<repo>/.fleet/run` for `npm start`,
 * `<repo>/.fleet/test` for `npm test`): data, pid files and logs. The servers
 * listen on free loopback ports picked at start, never on the default ports, and
 * nothing here touches a system-wide Redis or PostgreSQL service.
 *
 * Layout of `dir`:
 *   redis/            Redis working dir (AOF lives in redis/appendonlydir)
 *   redis.pid         Redis pid file (left behind only if Redis was SIGKILLed)
 *   pg/               PostgreSQL data directory (unless `pg-location` says otherwise)
 *   pg-location       (root only) path of the data directory when it had to be
 *                     placed under the temp dir because `fleetpg` cannot reach `dir`
 *   owner.json        pid of the process currently owning these services
 *   *.log             output of redis-server, initdb, postgres, apt-get
 *
 * When running as root, initdb/postgres run as the dedicated system user
 * `fleetpg` (PostgreSQL refuses to run as root). The servers are started in
 * their own session so that a terminal ^C reaches the application first; they
 * are stopped by `stop()`, on process exit, and on SIGINT/SIGTERM/SIGHUP when
 * nobody else handles those signals. Servers orphaned by a SIGKILLed parent are
 * found and stopped on the next start in the same directory.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client } from 'pg';
import type { ChildProcess, SpawnSyncReturns } from 'node:child_process';

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
  redisUrl?: string;
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

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Waits for `p` or `ms`, whichever is first, without leaving a timer behind. */
async function within(p: Promise<void>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([p, new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

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
  comm: string;
  cmdline: string;
  /** resolved working directory; undefined when unknown (not Linux, or not permitted) */
  cwd?: string;
}

function procInfo(pid: number): ProcInfo | undefined {
  if (fs.existsSync('/proc/self/stat')) {
    const comm = readText(`/proc/${pid}/comm`);
    if (comm === undefined) return undefined;
    const cmdline = (readText(`/proc/${pid}/cmdline`) ?? '').split('\0').join(' ');
    let cwd: string | undefined;
    try {
      cwd = fs.readlinkSync(`/proc/${pid}/cwd`);
    } catch {
      cwd = undefined;
    }
    return { comm: comm.trim(), cmdline, cwd };
  }
  const ps = spawnSync('ps', ['-p', String(pid), '-o', 'comm='], { encoding: 'utf8' });
  const comm = ps.status === 0 ? ps.stdout.trim() : '';
  return comm ? { comm: path.basename(comm), cmdline: comm } : undefined;
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

/** Is `pid` a live process named like `name` whose cwd (when known) is `dir`? */
function isOurServer(pid: number, name: string, dir: string): boolean {
  if (pid === process.pid || !isProcessAlive(pid)) return false;
  const info = procInfo(pid);
  if (!info || !(info.comm.includes(name) || info.cmdline.includes(name))) return false;
  return info.cwd === undefined || info.cwd === realpathOrSelf(dir);
}

/** Live processes named like `name` running with cwd `dir` (Linux only; [] elsewhere). */
function serversInDir(name: string, dir: string): number[] {
  if (!fs.existsSync('/proc/self/cwd') || !fs.existsSync(dir)) return [];
  const want = realpathOrSelf(dir);
  const found: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    try {
      if (fs.readlinkSync(`/proc/${entry}/cwd`) !== want) continue;
    } catch {
      continue;
    }
    if (isOurServer(pid, name, dir)) found.push(pid);
  }
  return found;
}

function readPid(file: string): number | undefined {
  const first = readText(file)?.split('\n')[0]?.trim();
  const pid = first ? Number(first) : NaN;
  return Number.isInteger(pid) && pid > 0 ? pid : undefined;
}

/** Runs a command to completion with its output appended to `logFile`. */
async function runLogged(
  cmd: string,
  args: string[],
  logFile: string,
  extra: { env?: NodeJS.ProcessEnv; runAs?: RunAs } = {},
): Promise<void> {
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
  const result = await new Promise<{ code: number | null; sig: NodeJS.Signals | null; error?: Error }>((resolve) => {
    child.once('error', (error) => resolve({ code: null, sig: null, error }));
    child.once('exit', (code, sig) => resolve({ code, sig }));
  });
  if (result.code !== 0) {
    const why = result.error?.message ?? (result.sig ? `killed by ${result.sig}` : `exit code ${String(result.code)}`);
    throw new Error(`${path.basename(cmd)} failed (${why}); log ${logFile}:\n${logTail(logFile, from)}`);
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

interface OwnerRecord {
  pid: number;
  start: string | null;
}

function ownerFile(dir: string): string {
  return path.join(dir, 'owner.json');
}

/** Throws if another live process currently owns the services in `dir`. */
function checkOwner(dir: string): void {
  let rec: OwnerRecord;
  try {
    rec = JSON.parse(fs.readFileSync(ownerFile(dir), 'utf8')) as OwnerRecord;
  } catch {
    return;
  }
  if (typeof rec.pid !== 'number' || rec.pid === process.pid || !isProcessAlive(rec.pid)) return;
  if (rec.start !== null && procStartTime(rec.pid) !== rec.start) return; // pid was reused
  throw new Error(`local services in ${dir} are in use by process ${rec.pid}; stop it first or use another directory`);
}

function writeOwner(dir: string): void {
  const rec: OwnerRecord = { pid: process.pid, start: procStartTime(process.pid) };
  fs.writeFileSync(ownerFile(dir), `${JSON.stringify(rec)}\n`);
}

async function terminate(pids: number[], sig: NodeJS.Signals, timeoutMs: number): Promise<void> {
  pids.forEach((p) => signal(p, sig));
  if (await waitGone(pids, timeoutMs)) return;
  pids.filter(isProcessAlive).forEach((p) => signal(p, 'SIGKILL'));
  await waitGone(pids, 5000);
}

async function stopLeftoverRedis(dir: string, log: (m: string) => void): Promise<void> {
  const pidFile = path.join(dir, 'redis.pid');
  const redisDir = path.join(dir, 'redis');
  const pids = new Set(serversInDir('redis', redisDir));
  const filePid = readPid(pidFile);
  if (filePid !== undefined && isOurServer(filePid, 'redis', redisDir)) pids.add(filePid);
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
  const postmaster = filePid !== undefined && isOurServer(filePid, 'postgres', dataDir) ? filePid : undefined;
  // a SIGKILLed postmaster leaves backends behind (cwd = data dir) that keep its shared memory busy
  const all = new Set(serversInDir('postgres', dataDir));
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

/** Empties `dir` (keeping the directory itself and its mode) and removes its external PG data dir. */
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
  for (const entry of fs.readdirSync(dir)) fs.rmSync(path.join(dir, entry), { recursive: true, force: true });
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
      await within(this.done, ms);
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

/** Resolves true when the Redis on `port` is process `pid` and has finished loading its data. */
function redisReady(port: number, pid: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    let buf = '';
    const done = (ok: boolean): void => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(1000, () => done(false));
    sock.once('error', () => done(false));
    sock.once('connect', () => sock.write('INFO\r\n'));
    sock.on('data', (chunk: Buffer) => {
      buf += chunk.toString('utf8');
      const eol = buf.indexOf('\r\n');
      if (eol < 0) return;
      if (!buf.startsWith('$')) return done(false); // e.g. -LOADING
      const len = Number(buf.slice(1, eol));
      if (Buffer.byteLength(buf) < eol + 2 + len) return;
      done(buf.includes(`\r\nprocess_id:${pid}\r\n`) && buf.includes('\r\nloading:0\r\n'));
    });
  });
}

async function pgQuery<T>(port: number, database: string, fn: (c: Client) => Promise<T>): Promise<T> {
  const client = new Client({ host: '127.0.0.1', port, user: PG_USER, database, connectionTimeoutMillis: 2000 });
  client.on('error', () => undefined);
  try {
    await client.connect();
    return await fn(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** Resolves true when the PostgreSQL on `port` accepts connections and serves `dataDir`. */
async function pgReady(port: number, dataDir: string): Promise<boolean> {
  try {
    const dd = await pgQuery(port, 'postgres', (c) => c.query<{ data_directory: string }>('SHOW data_directory'));
    return realpathOrSelf(dd.rows[0]?.data_directory ?? '') === realpathOrSelf(dataDir);
  } catch {
    return false;
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
const CLEANUP_SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

function onExit(): void {
  for (const inst of active) inst.signalAll();
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
  private stopping?: Promise<void>;

  constructor(
    readonly dir: string,
    private readonly opts: LocalServicesOptions,
    private readonly log: (m: string) => void,
  ) {
    active.add(this);
    installHooks();
  }

  private readonly unexpected = (s: Server, why: string): void => {
    this.log(`${s.name} exited unexpectedly (${why}); see ${s.logFile}`);
  };

  async startRedis(bin: string, usedPorts: Set<number>): Promise<void> {
    const redisDir = path.join(this.dir, 'redis');
    fs.mkdirSync(redisDir, { recursive: true });
    const logFile = path.join(this.dir, 'redis.log');
    rotateLog(logFile);
    for (let attempt = 1; ; attempt++) {
      const port = await freePort(usedPorts);
      usedPorts.add(port);
      const args = [
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
        await waitReady(server, () => redisReady(port, pid), 30_000);
        this.redisPort = port;
        return;
      } catch (err) {
        await server.stop([['SIGTERM', 5000]]);
        if (attempt >= 3 || !PORT_RACE.test(logTail(logFile, server.logFrom))) throw err;
      }
    }
  }

  async startPostgres(binDir: string, runAs: RunAs | undefined, usedPorts: Set<number>): Promise<void> {
    const dataDir = choosePgDataDir(this.dir, runAs, this.log);
    this.pgDataDir = dataDir;
    await this.initdb(binDir, dataDir, runAs);

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
        await waitReady(server, () => pgReady(port, dataDir), 120_000); // crash recovery may take a while
        this.pgPort = port;
        break;
      } catch (err) {
        await server.stop([['SIGINT', 10_000], ['SIGQUIT', 5000]]);
        if (attempt >= 3 || !PORT_RACE.test(logTail(logFile, server.logFrom))) throw err;
        await sleep(500 * attempt);
      }
    }
    await pgQuery(port, 'postgres', async (c) => {
      const exists = await c.query('SELECT 1 FROM pg_database WHERE datname = $1', [PG_DATABASE]);
      if (exists.rowCount === 0) await c.query(`CREATE DATABASE ${PG_DATABASE}`);
    });
  }

  private async initdb(binDir: string, dataDir: string, runAs: RunAs | undefined): Promise<void> {
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
      return;
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
    const args = ['-D', dataDir, '--auth=trust', '-U', PG_USER, '-E', 'UTF8', '--no-locale', ...(this.opts.fast ? ['--no-sync'] : [])];
    await runLogged(path.join(binDir, 'initdb'), args, logFile, runAs ? { runAs } : {});
    fs.writeFileSync(path.join(dataDir, INITDB_MARKER), `initialised ${new Date().toISOString()}\n`);
    if (runAs) fs.chownSync(path.join(dataDir, INITDB_MARKER), runAs.uid, runAs.gid);
  }

  private assertNotStopping(): void {
    if (this.stopping) throw new Error(`local services in ${this.dir} were stopped while starting`);
  }

  /** Synchronous best-effort shutdown request, for process exit. */
  signalAll(): void {
    if (this.redis?.pid) signal(this.redis.pid, 'SIGTERM');
    if (this.pg?.pid) signal(this.pg.pid, 'SIGINT'); // fast shutdown, completes on its own
  }

  stop(): Promise<void> {
    this.stopping ??= (async () => {
      await Promise.all([
        this.redis?.stop([['SIGTERM', 15_000]]),
        this.pg?.stop([['SIGINT', 30_000], ['SIGQUIT', 5000]]), // fast, then immediate
      ]);
      fs.rmSync(ownerFile(this.dir), { force: true });
      active.delete(this);
      if (active.size === 0) uninstallHooks();
    })();
    return this.stopping;
  }
}

// ---------------------------------------------------------------------------

export async function startLocalServices(opts: LocalServicesOptions): Promise<LocalServices> {
  const dir = path.resolve(opts.dir);
  const log = opts.log ?? ((): void => undefined);
  if ([...active].some((i) => i.dir === dir)) throw new Error(`local services in ${dir} are already running in this process`);
  fs.mkdirSync(dir, { recursive: true });
  checkOwner(dir);

  const inst = new Instance(dir, opts, log);
  const usedPorts = new Set<number>();
  const bins: Binaries = {};
  try {
    // whatever an earlier (killed) run left running in this dir goes first, wanted or not
    await stopLeftoverRedis(dir, log);
    for (const dataDir of new Set([path.join(dir, 'pg'), recordedPgLocation(dir)])) {
      if (dataDir) await stopLeftoverPostgres(dataDir, log);
    }
    if (opts.fresh) wipe(dir);
    writeOwner(dir);
    Object.assign(bins, await ensureBinaries(opts, dir, log));
    const runAs = opts.postgres && isRoot() ? ensureOsUser(log) : undefined;
    const results = await Promise.allSettled([
      bins.redisBin ? inst.startRedis(bins.redisBin, usedPorts) : undefined,
      bins.pgBinDir ? inst.startPostgres(bins.pgBinDir, runAs, usedPorts) : undefined,
    ]);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  } catch (err) {
    await inst.stop();
    throw err;
  }

  const services: LocalServices = {
    redisBin: bins.redisBin,
    pgBinDir: bins.pgBinDir,
    pgDataDir: inst.pgDataDir,
    stop: () => inst.stop(),
    get redisPid(): number | undefined {
      return inst.redis?.pid;
    },
    get pgPid(): number | undefined {
      return inst.pg?.pid;
    },
  };
  if (inst.redisPort !== undefined) {
    services.redisPort = inst.redisPort;
    services.redisUrl = `redis://127.0.0.1:${inst.redisPort}`;
  }
  if (inst.pgPort !== undefined) {
    services.pgPort = inst.pgPort;
    services.databaseUrl = `postgres://${PG_USER}@127.0.0.1:${inst.pgPort}/${PG_DATABASE}`;
  }
  return services;
}
