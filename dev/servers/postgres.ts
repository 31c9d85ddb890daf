/**
 * PostgreSQL specifics: recognising our postmaster and its children (also ones left over by a killed run) and
 * stopping those, pg_hba.conf and password authentication, readiness probes, the server version, initdb, the two
 * roles, switching a data directory of `initdb --auth=trust` (older versions) to passwords, and giving the fleet's
 * role least privilege in a data directory where it was the superuser (older versions).
 *
 * The roles: `fleet_admin`, the cluster's superuser, which only this module uses (readiness, roles, databases) and
 * tests that set up other roles (`adminDatabaseUrl`); and `fleet`, DATABASE_URL's login: not a superuser, it owns
 * the database `fleet` (so it runs the migrations there) and may create databases (the tests and the benchmarks make
 * one per run), and nothing else: no server files, no programs, no other roles, no replication.
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
import { argvHasPath, isProcessAlive, liveNamed, processesInDir, runLogged, serverEnv, signal, terminate, waitGone } from './process';

export const PG_USER = 'fleet';
export const PG_ADMIN = 'fleet_admin';
export const PG_DATABASE = 'fleet';
const INITDB_MARKER = 'fleet-initdb.done';
/** Written once the cluster has its two roles: by initdb now, or by the conversion of an older cluster. */
const ROLES_MARKER = 'fleet-roles.done';
/** The conversion's temporary superuser (a role cannot rename itself). */
const PG_UPGRADE = 'fleet_upgrade';

/** A role and its password. */
export interface PgLogin {
  readonly user: string;
  readonly password: string;
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

export async function pgQuery<T>(port: number, database: string, login: PgLogin, fn: (c: Client) => Promise<T>, host = '127.0.0.1'): Promise<T> {
  const client = new Client({ host, port, user: login.user, password: login.password, database, connectionTimeoutMillis: 2000 });
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
 * Resolves true when the PostgreSQL on `port` accepts connections and serves `dataDir` (asked as its superuser,
 * `login`); throws when it rejects the password, which waiting does not fix.
 */
export async function pgReady(port: number, dataDir: string, login: PgLogin, credentialsFile: string, host = '127.0.0.1'): Promise<boolean> {
  try {
    const dd = await pgQuery(port, 'postgres', login, (c) => c.query<{ data_directory: string }>('SHOW data_directory'), host);
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

/** Does the PostgreSQL on `port` let `user` in without the password (i.e. with a wrong one)? */
async function pgAdmitsWithoutPassword(port: number, user: string): Promise<boolean> {
  // not '' nor undefined: node-postgres would then fall back to PGPASSWORD and ~/.pgpass
  const wrong = `not-${newPassword()}`;
  const client = new Client({ host: '127.0.0.1', port, user, password: wrong, database: 'postgres', connectionTimeoutMillis: 2000 });
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

/** The password as PostgreSQL stores it: the password itself appears in no statement, hence in no server log. */
function passwordVerifier(login: PgLogin, major: number): string {
  return major >= 10
    ? scramVerifier(login.password)
    : `md5${createHash('md5')
        .update(login.password + login.user)
        .digest('hex')}`;
}

/** Switches a data directory of `initdb --auth=trust` (older versions) to password authentication, `login`'s first. */
export async function requirePassword(
  ctx: PgContext,
  port: number,
  dataDir: string,
  runAs: RunAs | undefined,
  login: PgLogin,
  major: number,
): Promise<void> {
  ctx.log(`switching PostgreSQL in ${dataDir} to password authentication (password in ${path.join(ctx.dir, CREDENTIALS_FILE)})`);
  await pgQuery(port, 'postgres', login, (c) => c.query(`ALTER ROLE ${login.user} PASSWORD '${passwordVerifier(login, major)}'`));
  writePrivateFile(path.join(dataDir, 'pg_hba.conf'), hbaConf(hostAuthMethod(major)), runAs);
  await pgQuery(port, 'postgres', login, (c) => c.query('SELECT pg_reload_conf()'));
  const deadline = Date.now() + 10_000;
  while (await pgAdmitsWithoutPassword(port, login.user)) {
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

/** Does the cluster in `dataDir` have its two roles (false: made by an older version, whose superuser is `fleet`)? */
export function hasRoles(dataDir: string): boolean {
  return fs.existsSync(path.join(dataDir, ROLES_MARKER));
}

function writeMarker(dataDir: string, name: string, runAs: RunAs | undefined): void {
  fs.writeFileSync(path.join(dataDir, name), `${new Date().toISOString()}\n`);
  if (runAs) fs.chownSync(path.join(dataDir, name), runAs.uid, runAs.gid);
}

/**
 * Gives every table, view, sequence and schema of the current database that `fleet_admin` owns to `fleet` (REASSIGN
 * OWNED refuses the objects of the cluster's bootstrap superuser). A sequence owned by a column goes with its table.
 */
const GIVE_OBJECTS_TO_FLEET = `
DO $$
DECLARE
  r record;
  admin oid := (SELECT oid FROM pg_roles WHERE rolname = '${PG_ADMIN}');
BEGIN
  FOR r IN
    SELECT nspname FROM pg_namespace
     WHERE nspowner = admin AND nspname NOT IN ('public', 'information_schema') AND nspname NOT LIKE 'pg\\_%'
  LOOP
    EXECUTE format('ALTER SCHEMA %I OWNER TO ${PG_USER}', r.nspname);
  END LOOP;
  FOR r IN
    SELECT c.oid::regclass AS rel, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relowner = admin AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
       AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
  LOOP
    EXECUTE format('ALTER %s %s OWNER TO ${PG_USER}',
      CASE r.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
      r.rel);
  END LOOP;
END $$`;

async function databaseExists(c: Client, name: string): Promise<boolean> {
  return ((await c.query('SELECT 1 FROM pg_database WHERE datname = $1', [name])).rowCount ?? 0) > 0;
}

async function roleExists(c: Client, name: string): Promise<boolean> {
  return ((await c.query('SELECT 1 FROM pg_roles WHERE rolname = $1', [name])).rowCount ?? 0) > 0;
}

/**
 * A cluster made by an older version: its bootstrap superuser is `fleet`, the fleet's own login, owning the database
 * `fleet` and all in it. It becomes what initdb makes now, keeping the data and the fleet's URL:
 * 1. as the old `fleet`, a temporary superuser (a role cannot rename itself);
 * 2. as that, in one transaction: `fleet` renamed `fleet_admin` with the admin password, a new login `fleet` with the
 *    fleet's password, and the database given to it;
 * 3. as `fleet_admin`: the temporary role dropped, and the database's tables, views, sequences and schemas given to
 *    `fleet`. Then the marker: a conversion cut short (before it) is finished by the next start.
 */
export async function convertOldRoles(
  ctx: PgContext,
  port: number,
  dataDir: string,
  runAs: RunAs | undefined,
  roles: { readonly fleet: PgLogin; readonly admin: PgLogin },
  major: number,
  host = '127.0.0.1',
): Promise<void> {
  const renamed = await pgQuery(port, 'postgres', roles.admin, async () => true, host).catch((err: unknown) => {
    if (isAuthFailure(err)) return false;
    throw err;
  });
  if (!renamed) {
    ctx.log(
      `PostgreSQL in ${dataDir}: the fleet's role "${PG_USER}" is the superuser (made by an older version); making "${PG_ADMIN}" the superuser and "${PG_USER}" a least-privilege role`,
    );
    const upgrade = { user: PG_UPGRADE, password: roles.admin.password };
    await pgQuery(
      port,
      'postgres',
      roles.fleet,
      async (c) => {
        const verb = (await roleExists(c, PG_UPGRADE)) ? 'ALTER' : 'CREATE';
        await c.query(`${verb} ROLE ${PG_UPGRADE} SUPERUSER LOGIN PASSWORD '${passwordVerifier(upgrade, major)}'`);
      },
      host,
    );
    await pgQuery(
      port,
      'postgres',
      upgrade,
      async (c) => {
        await c.query('BEGIN');
        await c.query(`ALTER ROLE ${PG_USER} RENAME TO ${PG_ADMIN}`);
        await c.query(`ALTER ROLE ${PG_ADMIN} PASSWORD '${passwordVerifier(roles.admin, major)}'`);
        await c.query(`CREATE ROLE ${PG_USER} LOGIN PASSWORD '${passwordVerifier(roles.fleet, major)}'`);
        if (await databaseExists(c, PG_DATABASE)) await c.query(`ALTER DATABASE ${PG_DATABASE} OWNER TO ${PG_USER}`);
        await c.query('COMMIT');
      },
      host,
    );
  }
  const hasDatabase = await pgQuery(
    port,
    'postgres',
    roles.admin,
    async (c) => {
      await c.query(`DROP ROLE IF EXISTS ${PG_UPGRADE}`);
      return databaseExists(c, PG_DATABASE);
    },
    host,
  );
  if (hasDatabase) await pgQuery(port, PG_DATABASE, roles.admin, (c) => c.query(GIVE_OBJECTS_TO_FLEET), host);
  writeMarker(dataDir, ROLES_MARKER, runAs);
}

/**
 * The fleet's role as it must be, whatever it was (at every start): a login with the fleet's password that may
 * create databases and nothing more, owning the database `fleet` (created if missing).
 */
export async function ensureFleetRole(port: number, admin: PgLogin, fleet: PgLogin, major: number, host = '127.0.0.1'): Promise<void> {
  await pgQuery(
    port,
    'postgres',
    admin,
    async (c) => {
      const verb = (await roleExists(c, PG_USER)) ? 'ALTER' : 'CREATE';
      await c.query(
        `${verb} ROLE ${PG_USER} LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS CREATEDB PASSWORD '${passwordVerifier(fleet, major)}'`,
      );
      await c.query(
        (await databaseExists(c, PG_DATABASE))
          ? `ALTER DATABASE ${PG_DATABASE} OWNER TO ${PG_USER}`
          : `CREATE DATABASE ${PG_DATABASE} OWNER ${PG_USER}`,
      );
    },
    host,
  );
}

/** Creates the cluster unless it exists, its superuser `fleet_admin` with `password`; true when it did. */
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
      '-D',
      dataDir,
      '-U',
      PG_ADMIN,
      '--pwfile',
      pwFile,
      // no Unix-domain socket is ever opened (unix_socket_directories=''), so `local` is moot
      '--auth-local=trust',
      `--auth-host=${hostAuthMethod(parseFloat(major))}`,
      '-E',
      'UTF8',
      '--no-locale',
      ...(ctx.fast ? ['--no-sync'] : []),
    ];
    await runLogged(path.join(binDir, 'initdb'), args, logFile, { env: serverEnv(runAs), ...(runAs ? { runAs } : {}) });
  } finally {
    fs.rmSync(pwFile, { force: true });
  }
  writeMarker(dataDir, INITDB_MARKER, runAs);
  writeMarker(dataDir, ROLES_MARKER, runAs);
  return true;
}
