/**
 * PostgreSQL specifics: recognising our postmaster and its children (also ones left over by a killed run) and
 * stopping those, pg_hba.conf and password authentication, readiness probes, the server version, initdb, and
 * switching a data directory of `initdb --auth=trust` (older versions) to passwords.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Client } from 'pg';
import { sleep } from '../../src/util';
import { CREDENTIALS_FILE, newPassword, scramVerifier, writePrivateFile } from './credentials';
import { readPid, readText, realpathOrSelf, rotateLog } from './fs-helpers';
import type { RunAs } from './os-user';
import { argvHasPath, isProcessAlive, liveNamed, processesInDir, runLogged, signal, terminate, waitGone } from './process';

export const PG_USER = 'fleet';
export const PG_DATABASE = 'fleet';
const INITDB_MARKER = 'fleet-initdb.done';

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

/** Our postmasters and their (possibly orphaned) children serving `dataDir` (Linux only). */
export function pgProcesses(dataDir: string): number[] {
  return processesInDir(dataDir, (pid) => isOurPostmaster(pid, dataDir, false) || isOurPgChild(pid, dataDir));
}

export async function stopLeftoverPostgres(dataDir: string, log: (m: string) => void): Promise<void> {
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

/** pg_hba method for TCP: scram-sha-256 (PostgreSQL 14+ stores passwords that way); md5 before (accepts both). */
function hostAuthMethod(major: number): string {
  return major >= 14 ? 'scram-sha-256' : 'md5';
}

/** Does pg_hba.conf let TCP clients in without a password (a data directory of `initdb --auth=trust`)? */
export function hbaTrustsHost(dataDir: string): boolean {
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

export async function pgQuery<T>(port: number, database: string, password: string, fn: (c: Client) => Promise<T>, host = '127.0.0.1'): Promise<T> {
  const client = new Client({ host, port, user: PG_USER, password, database, connectionTimeoutMillis: 2000 });
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
export async function pgReady(port: number, dataDir: string, password: string, credentialsFile: string, host = '127.0.0.1'): Promise<boolean> {
  try {
    const dd = await pgQuery(port, 'postgres', password, (c) => c.query<{ data_directory: string }>('SHOW data_directory'), host);
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

export function pgMajorVersion(binDir: string): string {
  const r = spawnSync(path.join(binDir, 'postgres'), ['--version'], { encoding: 'utf8' });
  const m = /(\d+)(?:\.(\d+))?/.exec(r.stdout ?? '');
  if (!m?.[1]) throw new Error(`cannot tell the version of ${binDir}/postgres: ${r.stdout}${r.stderr}`);
  return Number(m[1]) >= 10 ? m[1] : `${m[1]}.${m[2] ?? '0'}`;
}

/** What `initdb` and `requirePassword` need to know of the services they work for. */
export interface PgContext {
  /** the services directory (logs, credentials.json) */
  dir: string;
  /** test mode: initdb --no-sync */
  fast: boolean;
  /** a wiped directory (tests): initialising is expected, not worth a message */
  fresh: boolean;
  log: (m: string) => void;
}

/** Switches a data directory of `initdb --auth=trust` (older versions) to password authentication. */
export async function requirePassword(
  ctx: PgContext,
  port: number,
  dataDir: string,
  runAs: RunAs | undefined,
  password: string,
  major: number,
): Promise<void> {
  ctx.log(`switching PostgreSQL in ${dataDir} to password authentication (password in ${path.join(ctx.dir, CREDENTIALS_FILE)})`);
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

/** Lets clients from `cidr` in with the password too (a lab host's clients); once. */
export function admitClients(dataDir: string, cidr: string, runAs: RunAs | undefined, major: number): void {
  const file = path.join(dataDir, 'pg_hba.conf');
  const text = readText(file) ?? '';
  const line = `host    all             all             ${cidr.padEnd(23)} ${hostAuthMethod(major)}`;
  if (!text.split('\n').includes(line)) writePrivateFile(file, `${text.replace(/\n*$/, '\n')}${line}\n`, runAs);
}

/** Creates the cluster unless it exists; true when it did. */
export async function initdb(ctx: PgContext, binDir: string, dataDir: string, runAs: RunAs | undefined, password: string): Promise<boolean> {
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
    if (fs.readdirSync(dataDir).length > 0) ctx.log(`${dataDir} holds an incomplete cluster; re-creating it`);
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
  fs.mkdirSync(dataDir, { mode: 0o700 });
  if (runAs) fs.chownSync(dataDir, runAs.uid, runAs.gid);
  if (!ctx.fresh) ctx.log(`initialising PostgreSQL ${major} data directory ${dataDir}`);
  const logFile = path.join(ctx.dir, 'initdb.log');
  rotateLog(logFile);
  // next to the data directory: a place the server's user can read (and, for root, only it and root)
  const pwFile = path.join(path.dirname(dataDir), 'initdb.pw');
  writePrivateFile(pwFile, `${password}\n`, runAs);
  try {
    const args = [
      '-D', dataDir, '-U', PG_USER, '--pwfile', pwFile,
      // no Unix-domain socket is ever opened (unix_socket_directories=''), so `local` is moot
      '--auth-local=trust', `--auth-host=${hostAuthMethod(parseFloat(major))}`,
      '-E', 'UTF8', '--no-locale', ...(ctx.fast ? ['--no-sync'] : []),
    ];
    await runLogged(path.join(binDir, 'initdb'), args, logFile, runAs ? { runAs } : {});
  } finally {
    fs.rmSync(pwFile, { force: true });
  }
  fs.writeFileSync(path.join(dataDir, INITDB_MARKER), `initialised ${new Date().toISOString()}\n`);
  if (runAs) fs.chownSync(path.join(dataDir, INITDB_MARKER), runAs.uid, runAs.gid);
  return true;
}
