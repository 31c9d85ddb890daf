/**
 * Redis specifics: redis.conf (the secret part of the configuration), recognising our redis-servers (also ones
 * left over by a killed run) and stopping those, and a minimal RESP client that tells when our server is ready.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { writePrivateFile } from './credentials';
import { readPid, realpathOrSelf } from './fs-helpers';
import { argvHasPath, liveNamed, processesInDir, terminate } from './process';

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

/** Our redis-servers running in `redisDir` (Linux only). */
function redisProcesses(redisDir: string, confFile: string): number[] {
  return processesInDir(redisDir, (pid) => isOurRedis(pid, redisDir, confFile, false));
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

function redisConfFile(dir: string): string {
  return path.join(dir, 'redis.conf');
}

export async function stopLeftoverRedis(dir: string, log: (m: string) => void): Promise<void> {
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

/** RESP encoding of one command. */
function resp(...args: string[]): string {
  return `*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('')}`;
}

/** Resolves true when the Redis on `port` takes `password`, is process `pid` and has finished loading its data. */
export function redisReady(port: number, pid: number, password: string, host = '127.0.0.1'): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host, port });
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

/**
 * Writes `<dir>/redis.conf` (mode 0600, at every start) and returns its path. Secrets go into this file, not onto
 * the command line (argv is world-readable until Redis retitles itself); the title template keeps this file's path
 * in the title, which is how a later start recognises the server.
 */
export function writeRedisConf(dir: string, bin: string, password: string): string {
  const conf = redisConfFile(dir);
  writePrivateFile(
    conf,
    [
      '# written by lifecycle-fleet (dev/servers) at every start; the password is in credentials.json',
      `requirepass ${redisQuote(password)}`,
      ...(redisHasTitleTemplate(bin) ? ['proc-title-template "{title} {listen-addr} {server-mode} {config-file}"'] : []),
      '',
    ].join('\n'),
  );
  return conf;
}
