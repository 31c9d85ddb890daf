/**
 * Finding redis-server and the PostgreSQL bin directory, the install command to suggest when one is missing, and
 * installing them with apt-get (root on Debian/Ubuntu only).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isExecutableFile, isRoot, realpathOrSelf, which } from './fs-helpers';
import { runLogged } from './process';
import type { LocalServicesOptions } from './types';

/** A required binary is missing and could not be installed; `message` is the command to run. */
export class MissingBinaryError extends Error {
  constructor(readonly command: string) {
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

export interface Binaries {
  redisBin?: string;
  pgBinDir?: string;
}

export async function ensureBinaries(opts: LocalServicesOptions, dir: string, log: (m: string) => void): Promise<Binaries> {
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
