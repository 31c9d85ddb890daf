/**
 * LOG_FORMAT end to end: a `fleet http` on a pseudo-terminal (util-linux `script`) prints pino-pretty's coloured
 * lines, and JSON when LOG_FORMAT=json; off a terminal (a pipe, as every test and the bench run it) JSON, so the
 * readiness lines they wait for stay machine-readable.
 */
import { spawn } from 'node:child_process';
import * as path from 'node:path';
import { expect } from 'chai';
import { repoRoot } from '../../src/util';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

const FLEET = path.join(repoRoot(), 'bin', 'fleet.js');

/** Single-quoted for sh. */
const quote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

/**
 * Runs `fleet http` until it is serving, then stops it with SIGTERM: on a pseudo-terminal through `script -qfec`, or
 * with stdout on a pipe. Returns what it printed (stdout and stderr; `script` merges them) and its exit code.
 */
async function fleetHttp(terminal: boolean, env: NodeJS.ProcessEnv): Promise<{ output: string; code: number | null }> {
  const child = terminal
    ? spawn('script', ['-qfec', `${quote(process.execPath)} ${quote(FLEET)} http`, '/dev/null'], { env, stdio: ['ignore', 'pipe', 'pipe'] })
    : spawn(process.execPath, [FLEET, 'http'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (c: Buffer) => (output += c.toString()));
  child.stderr.on('data', (c: Buffer) => (output += c.toString()));
  // 'close': the process has exited and its output has all been read
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  try {
    await waitFor('fleet http to serve', () => (output.includes('http started') ? true : undefined), 30_000);
    // under `script` the fleet is script's child in a session of its own: its pid is in its log line (JSON or pretty)
    const pid = Number((/"pid":(\d+)/.exec(output) ?? /INFO\S* \((\d+)\)/.exec(output))?.[1]);
    expect(pid, output).to.be.greaterThan(0);
    process.kill(pid, 'SIGTERM');
    const code = await exited;
    return { output, code };
  } finally {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}

const lines = (output: string): string[] => output.split(/\r?\n/).filter((l) => l.trim() !== '');

describe('LOG_FORMAT: fleet commands on a terminal and off one', function () {
  this.timeout(90_000);
  let db: TestDatabase;
  let prefix: string;
  let env: NodeJS.ProcessEnv;

  before(async () => {
    db = await openTestDatabase(2);
    prefix = uniquePrefix();
    env = { PATH: process.env.PATH, REDIS_URL: testEnv().redisUrl, DATABASE_URL: db.url, FLEET_PREFIX: prefix, FLEET_HTTP_PORT: '0' };
  });
  after(async () => {
    await db?.close();
    await dropPrefix(prefix);
  });

  it('on a terminal: pretty, coloured lines, no JSON, no secret', async () => {
    const { output, code } = await fleetHttp(true, env);
    expect(code, output).to.equal(0);
    const started = lines(output).find((l) => l.includes('http started'));
    expect(started, output).to.match(/^\[\d\d:\d\d:\d\d\.\d{3}\] /);
    expect(started).to.contain('\x1b[32mINFO\x1b[39m ('); // the level, in green
    expect(output).to.not.contain('{"level"');
    expect(output).to.contain('stopping'); // the shutdown is logged too, in the same format
    for (const url of [testEnv().redisUrl, db.url]) {
      const password = decodeURIComponent(new URL(url).password);
      if (password !== '') expect(output).to.not.contain(password);
    }
  });

  it('on a terminal with LOG_FORMAT=json: JSON lines', async () => {
    const { output, code } = await fleetHttp(true, { ...env, LOG_FORMAT: 'json' });
    expect(code, output).to.equal(0);
    const records = lines(output).map((l) => JSON.parse(l) as { msg: string; level: number });
    expect(records.map((r) => r.msg)).to.include('http started');
  });

  it('off a terminal: JSON lines, as the tests and the bench read them', async () => {
    const { output, code } = await fleetHttp(false, env);
    expect(code, output).to.equal(0);
    const records = lines(output).map((l) => JSON.parse(l) as { msg: string; level: number });
    expect(records.map((r) => r.msg)).to.include('http started');
    expect(output).to.not.contain('\x1b[');
  });

  it('a bad LOG_FORMAT stops the command, naming the variable and the allowed values', async () => {
    const { output } = await new Promise<{ output: string }>((resolve) => {
      const child = spawn(process.execPath, [FLEET, 'http'], { env: { ...env, LOG_FORMAT: 'fancy' }, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      child.stdout.on('data', (c: Buffer) => (out += c.toString()));
      child.stderr.on('data', (c: Buffer) => (out += c.toString()));
      child.on('close', (code) => resolve({ output: `${out}\nexit ${code}` }));
    });
    expect(output).to.contain('LOG_FORMAT: must be one of pretty, json, got "fancy"').and.to.contain('exit 2');
  });
});
