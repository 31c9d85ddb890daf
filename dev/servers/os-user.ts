/**
 * Running as root: the `fleetpg` system user that PostgreSQL runs as (it refuses to run as root), and where its
 * data directory goes when that user cannot reach the services directory (a private directory under the temp dir,
 * recorded in `<dir>/pg-location`).
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { SpawnSyncReturns } from 'node:child_process';
import { errCode, isExecutableFile, readText, which } from './fs-helpers';

const OS_USER = 'fleetpg';
const EXTERNAL_PREFIX = 'lifecycle-fleet-pg-';

export interface RunAs {
  name: string;
  uid: number;
  gid: number;
  /** its home directory (the HOME its processes get), when the user database says */
  home?: string;
}

function lookupUser(name: string): RunAs | undefined {
  const uid = spawnSync('id', ['-u', name], { encoding: 'utf8' });
  const gid = spawnSync('id', ['-g', name], { encoding: 'utf8' });
  if (uid.status !== 0 || gid.status !== 0) return undefined;
  const home = spawnSync('getent', ['passwd', name], { encoding: 'utf8' }).stdout?.split(':')[5]?.trim();
  return { name, uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()), ...(home ? { home } : {}) };
}

export function ensureOsUser(log: (m: string) => void): RunAs {
  const existing = lookupUser(OS_USER);
  if (existing) return existing;
  const shell = ['/usr/sbin/nologin', '/sbin/nologin'].find((s) => fs.existsSync(s)) ?? '/bin/false';
  const useradd = which('useradd', ['/usr/sbin', '/sbin']);
  const adduser = which('adduser', ['/usr/sbin', '/sbin']);
  let r: SpawnSyncReturns<string> | undefined;
  if (useradd) {
    r = spawnSync(useradd, ['--system', '--user-group', '--no-create-home', '--home-dir', '/nonexistent', '--shell', shell, OS_USER], {
      encoding: 'utf8',
    });
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

export function externalBaseFor(dir: string): string[] {
  const hash = createHash('sha256').update(dir).digest('hex').slice(0, 12);
  return [...new Set([os.tmpdir(), '/tmp', '/var/tmp'])].map((t) => path.join(t, `${EXTERNAL_PREFIX}${hash}`));
}

function isExternalDataDir(p: string): boolean {
  return path.isAbsolute(p) && path.basename(p) === 'data' && path.basename(path.dirname(p)).startsWith(EXTERNAL_PREFIX);
}

export function recordedPgLocation(dir: string): string | undefined {
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
export function choosePgDataDir(dir: string, user: RunAs | undefined, log: (m: string) => void): string {
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
