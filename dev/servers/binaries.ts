/**
 * What the local servers and the test suite need from the machine, in one place: each thing, how to tell it is
 * there, the Debian package that brings it and the command that installs it. `npm start` and `npm test` install
 * what is missing with apt-get when they run as root on Debian/Ubuntu; anywhere else they stop with the command to
 * run (MissingBinaryError).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileSize, isExecutableFile, isRoot, realpathOrSelf, which } from './fs-helpers';
import { runLogged } from './process';
import type { LocalServicesOptions } from './types';

/** Something a command needs, the Debian package that brings it, and how to tell it is there. */
export interface Requirement {
  /** the command or file, as messages name it */
  readonly name: string;
  /** the Debian package that brings it */
  readonly pkg: string;
  /** what needs it, for messages */
  readonly neededBy: string;
  readonly present: () => boolean;
  /** needed only when running as root (what needs it does not run otherwise) */
  readonly onlyAsRoot?: boolean;
  /**
   * Only the package's tool is wanted, not its server: installed without its recommends, in an apt-get run of its
   * own, and the packaged service (this name) is stopped and disabled again where the install started it.
   */
  readonly toolOnlyOf?: string;
  /** the package's names on Fedora (dnf) and macOS (Homebrew), where the tooling supports those */
  readonly dnf?: string;
  readonly brew?: string;
}

/** A required binary is missing and could not be installed; `message` is the command to run. */
export class MissingBinaryError extends Error {
  constructor(
    readonly command: string,
    readonly missing: readonly Requirement[] = [],
  ) {
    super(command);
    this.name = 'MissingBinaryError';
  }
}

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

const REDIS_SERVER: Requirement = {
  name: 'redis-server',
  pkg: 'redis-server',
  neededBy: 'the local Redis',
  present: () => findRedisServer() !== undefined,
  dnf: 'redis',
  brew: 'redis',
};

const POSTGRESQL: Requirement = {
  name: PG_BINARIES.join(', '),
  pkg: 'postgresql',
  neededBy: 'the local PostgreSQL',
  present: () => findPgBinDir() !== undefined,
  dnf: 'postgresql-server',
  brew: 'postgresql@15',
};

/** The servers `startLocalServices` will start. */
export function serverRequirements(opts: { redis: boolean; postgres: boolean }): Requirement[] {
  return [...(opts.redis ? [REDIS_SERVER] : []), ...(opts.postgres ? [POSTGRESQL] : [])];
}

/** Debian's chromium, which the browser tests drive through playwright-core (no downloaded browser). */
export const CHROMIUM = '/usr/bin/chromium';

/** The interpreter the Python consumer test runs: Debian's, which imports Debian's redis-py. */
export const DEBIAN_PYTHON = '/usr/bin/python3';

const onPath = (command: string) => (): boolean => which(command) !== undefined;

/**
 * Every tool a test runs that a fresh Debian machine (with Node and npm) may lack; each test checks for its own
 * tool the same way and skips, saying so, without it. `npm test` brings them (dev/with-services.ts --test-tools).
 */
export const TEST_TOOLS: readonly Requirement[] = [
  { name: CHROMIUM, pkg: 'chromium', neededBy: 'the browser tests (test/helpers/browser.ts)', present: () => fs.existsSync(CHROMIUM) },
  {
    name: `redis for ${DEBIAN_PYTHON}`,
    pkg: 'python3-redis',
    neededBy: 'the Python consumer (test/e2e/python-consumer.e2e.test.ts)',
    present: () => spawnSync(DEBIAN_PYTHON, ['-c', 'import redis'], { stdio: 'ignore' }).status === 0,
  },
  { name: 'faketime', pkg: 'faketime', neededBy: 'the clock tests (test/integration/clocks.test.ts)', present: onPath('faketime') },
  { name: 'cc', pkg: 'gcc', neededBy: 'the clock-jump tests, which build test/fixtures/clock-shift.c', present: onPath('cc') },
  {
    name: 'promtool',
    pkg: 'prometheus',
    neededBy: 'the alert rules checks (test/integration/monitoring.test.ts)',
    present: onPath('promtool'),
    toolOnlyOf: 'prometheus',
  },
  { name: 'redis-cli', pkg: 'redis-tools', neededBy: 'the Redis Cluster tests (dev/redis-cluster.ts)', present: onPath('redis-cli') },
  { name: 'openssl', pkg: 'openssl', neededBy: 'the TLS tests (test/integration/hardening.test.ts)', present: onPath('openssl') },
  { name: 'script', pkg: 'bsdutils', neededBy: 'the LOG_FORMAT test (test/integration/log-format.test.ts)', present: onPath('script') },
  {
    name: 'ip',
    pkg: 'iproute2',
    neededBy: 'the hosts harness (dev/netns.ts), which needs root',
    present: onPath('ip'),
    onlyAsRoot: true,
  },
  {
    name: 'pg_autoctl',
    pkg: 'postgresql-15-auto-failover',
    neededBy: 'the PostgreSQL failover lab (dev/pg-failover.ts), which needs root',
    present: onPath('pg_autoctl'),
    onlyAsRoot: true,
  },
];

/**
 * Root as the installer sees it: root, unless FLEET_INSTALL_AS_USER=1 asks it to act as it would for an ordinary user
 * (test/integration/test-tools.test.ts, where the checkout is one `nobody` cannot read: a clone under /root or in a
 * mktemp -d folder).
 */
function installerIsRoot(): boolean {
  return isRoot() && process.env.FLEET_INSTALL_AS_USER !== '1';
}

/** Those of `reqs` this machine lacks (for this user: what runs only as root is not needed otherwise). */
export function missingRequirements(reqs: readonly Requirement[], asRoot = installerIsRoot()): Requirement[] {
  return reqs.filter((r) => (asRoot || r.onlyAsRoot !== true) && !r.present());
}

/** May requirements be installed here: root, apt-get and Debian (or a derivative)? */
export function canInstall(): boolean {
  return installerIsRoot() && which('apt-get') !== undefined && fs.existsSync('/etc/debian_version');
}

/** The apt-get runs that install `reqs`: the plain packages first, then those wanted only for their tool. */
function aptRuns(reqs: readonly Requirement[]): string[][] {
  const plain = reqs.filter((r) => r.toolOnlyOf === undefined).map((r) => r.pkg);
  const toolOnly = reqs.filter((r) => r.toolOnlyOf !== undefined).map((r) => r.pkg);
  return [
    ...(plain.length > 0 ? [['install', '-y', ...plain]] : []),
    ...(toolOnly.length > 0 ? [['install', '-y', '--no-install-recommends', ...toolOnly]] : []),
  ];
}

/** The command a user must run to install `reqs` on this machine. */
export function installCommand(reqs: readonly Requirement[]): string {
  const sudo = installerIsRoot() ? '' : 'sudo ';
  const apt = which('apt-get') !== undefined;
  const dnf = reqs.map((r) => r.dnf);
  if (!apt && which('dnf') && dnf.every((n) => n !== undefined)) return `${sudo}dnf install -y ${dnf.join(' ')}`;
  const brew = reqs.map((r) => r.brew);
  if (!apt && process.platform === 'darwin' && brew.every((n) => n !== undefined)) return `brew install ${brew.join(' ')}`;
  const line = aptRuns(reqs)
    .map((args) => `${sudo}apt-get ${args.join(' ')}`)
    .join(' && ');
  return apt ? line : `${line}  # Debian's package names`;
}

/**
 * Installs `reqs` with apt-get (one `apt-get update` first), output appended to `logFile`, and checks each is there
 * afterwards. Only where `canInstall()`; otherwise throws MissingBinaryError with the command to run.
 */
export async function installRequirements(reqs: readonly Requirement[], logFile: string, log: (m: string) => void): Promise<void> {
  const aptGet = which('apt-get');
  if (!canInstall() || aptGet === undefined) throw new MissingBinaryError(installCommand(reqs), reqs);
  log(`installing ${reqs.map((r) => r.pkg).join(' ')} with apt-get (output in ${logFile})`);
  fs.mkdirSync(path.dirname(logFile), { recursive: true });
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  await runLogged(aptGet, ['update'], logFile, { env });
  for (const args of aptRuns(reqs)) await runLogged(aptGet, args, logFile, { env });
  for (const service of new Set(reqs.flatMap((r) => (r.toolOnlyOf === undefined ? [] : [r.toolOnlyOf])))) {
    await stopPackagedService(service, logFile, log);
  }
  const still = reqs.filter((r) => !r.present());
  if (still.length > 0) {
    throw new Error(
      `apt-get installed ${still.map((r) => r.pkg).join(' ')} but ${still.map((r) => r.name).join(', ')} still not found; see ${logFile}`,
    );
  }
}

/**
 * Stops and disables the server a package's install started (a machine with an init system and no policy-rc.d to
 * deny it): only the package's tool was wanted. A failure is logged, not thrown: the tool is there either way.
 */
async function stopPackagedService(service: string, logFile: string, log: (m: string) => void): Promise<void> {
  const systemctl = which('systemctl');
  const initScript = `/etc/init.d/${service}`;
  let run: { cmd: string; args: string[] } | undefined;
  if (fs.existsSync('/run/systemd/system') && systemctl !== undefined) run = { cmd: systemctl, args: ['disable', '--now', `${service}.service`] };
  else if (fileSize(`/run/${service}/${service}.pid`) > 0 && isExecutableFile(initScript)) run = { cmd: initScript, args: ['stop'] };
  if (run === undefined) return;
  try {
    await runLogged(run.cmd, run.args, logFile);
    log(`stopped the ${service} service the install started (only its tool is wanted)`);
  } catch (err) {
    log(`could not stop the ${service} service the install started: ${err instanceof Error ? err.message : String(err)}`);
  }
}

export interface Binaries {
  redisBin?: string;
  pgBinDir?: string;
}

export async function ensureBinaries(opts: LocalServicesOptions, dir: string, log: (m: string) => void): Promise<Binaries> {
  const missing = missingRequirements(serverRequirements(opts));
  if (missing.length > 0) await installRequirements(missing, path.join(dir, 'apt-get.log'), log);
  return {
    redisBin: opts.redis ? findRedisServer() : undefined,
    pgBinDir: opts.postgres ? findPgBinDir() : undefined,
  };
}
