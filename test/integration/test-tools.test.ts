/**
 * `npm test` brings the tools the tests run (dev/with-services.ts --test-tools, TEST_TOOLS in dev/servers/binaries.ts).
 * Each case runs the real with-services in a child process with a PATH of its own: a directory of links to every
 * command on this machine's PATH but the ones the case takes away, and an `apt-get` that only records how it was
 * called (so nothing is installed for real). REDIS_URL and DATABASE_URL are set, so no server starts; the command it
 * runs prints a marker. An ordinary user's cases run as `nobody` (setpriv) when the test runs as root.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import { missingRequirements, TEST_TOOLS } from '../../dev/servers';
import { which } from '../../dev/servers/fs-helpers';
import { repoRoot } from '../../src/util';

const WITH_SERVICES = path.join(repoRoot(), 'dist', 'dev', 'with-services.js');
const MARKER = 'the command ran';
const AS_ROOT = process.getuid?.() === 0;

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  /** each apt-get call: `DEBIAN_FRONTEND=<value> <args>` */
  aptCalls: string[];
}

const AS_NOBODY = [which('setpriv') ?? 'setpriv', '--reuid=nobody', '--regid=nogroup', '--clear-groups', '--'];

/** Whether `nobody` can read with-services in this checkout (every folder above it must be open to others). */
const NOBODY_READS_CHECKOUT =
  AS_ROOT &&
  spawnSync(AS_NOBODY[0] ?? '', [...AS_NOBODY.slice(1), process.execPath, '-e', `require('fs').accessSync(${JSON.stringify(WITH_SERVICES)})`])
    .status === 0;

/** A PATH directory: a link to every command on this machine's PATH but `without`, and the recording apt-get. */
class ShadowPath {
  readonly dir: string;
  private readonly aptLog: string;

  constructor(without: string[], opts: { aptGet: boolean; installs?: Record<string, string> } = { aptGet: true }) {
    const base = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-test-tools-'));
    fs.chmodSync(base, 0o755); // nobody reads it
    this.dir = path.join(base, 'bin');
    this.aptLog = path.join(base, 'apt-calls');
    fs.mkdirSync(this.dir, { mode: 0o755 });
    const skip = new Set([...without, 'apt-get']);
    for (const d of (process.env.PATH ?? '').split(path.delimiter).filter(Boolean)) {
      let entries: string[] = [];
      try {
        entries = fs.readdirSync(d);
      } catch {
        continue; // a PATH entry that is not there
      }
      for (const name of entries) {
        if (skip.has(name) || fs.existsSync(path.join(this.dir, name))) continue;
        fs.symlinkSync(path.resolve(d, name), path.join(this.dir, name));
      }
    }
    if (!opts.aptGet) return;
    // `install <package>` of one of `installs` (package -> command) brings that command: a link to this machine's own
    const brings = Object.entries(opts.installs ?? {}).map(
      ([pkg, cmd]) => `  [ "$a" = ${pkg} ] && ln -sf ${which(cmd) ?? '/nonexistent'} ${this.dir}/${cmd}`,
    );
    const script = [
      '#!/bin/sh',
      `echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND $*" >> ${this.aptLog}`,
      'if [ "$1" = install ]; then for a in "$@"; do',
      ...brings,
      '  :',
      'done; fi',
      'exit 0',
    ].join('\n');
    fs.writeFileSync(path.join(this.dir, 'apt-get'), `${script}\n`, { mode: 0o755 });
  }

  /** Runs with-services --test-tools with this PATH, as `nobody` when `asUser` (and the test runs as root). */
  async run(opts: { asUser: boolean; env?: NodeJS.ProcessEnv }): Promise<Run> {
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      PATH: this.dir,
      REDIS_URL: 'redis://127.0.0.1:1',
      DATABASE_URL: 'postgres://x@127.0.0.1:1/x',
      ...opts.env,
    };
    if (opts.env?.FLEET_TEST_ALLOW_SKIPS === undefined) delete env.FLEET_TEST_ALLOW_SKIPS;
    const argv = [process.execPath, WITH_SERVICES, '--test-tools', '--', process.execPath, '-e', `console.log(${JSON.stringify(MARKER)})`];
    // as `nobody` where it can read the checkout; else (a clone under /root, or in a mktemp -d folder) as root told to
    // act as an ordinary user would (FLEET_INSTALL_AS_USER=1)
    const asNobody = opts.asUser && AS_ROOT && NOBODY_READS_CHECKOUT;
    if (opts.asUser && AS_ROOT && !asNobody) env.FLEET_INSTALL_AS_USER = '1';
    const [cmd, ...args] = asNobody ? [...AS_NOBODY, ...argv] : argv;
    const child = spawn(cmd ?? '', args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const code = await new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
    const aptCalls = fs.existsSync(this.aptLog) ? fs.readFileSync(this.aptLog, 'utf8').trim().split('\n') : [];
    return { code, stdout, stderr, aptCalls };
  }

  remove(): void {
    fs.rmSync(path.dirname(this.dir), { recursive: true, force: true });
  }
}

/** The Debian packages the message lists, in its order (`  <name> (Debian package <pkg>): <why>`). */
const listedPackages = (stderr: string): string[] => [...stderr.matchAll(/^ {2}.+ \(Debian package (\S+)\): /gm)].map((m) => m[1] ?? '');

describe('npm test brings the tools the tests run (with-services --test-tools)', function () {
  this.timeout(60_000);
  const shadows: ShadowPath[] = [];
  const shadow = (...args: ConstructorParameters<typeof ShadowPath>): ShadowPath => {
    const s = new ShadowPath(...args);
    shadows.push(s);
    return s;
  };

  before(function () {
    // each case takes tools away from a machine that has them all (`npm test` made sure of it)
    const lacking = missingRequirements(TEST_TOOLS, true).map((r) => r.pkg);
    if (lacking.length > 0) {
      console.log(`      SKIPPED: this machine lacks ${lacking.join(' ')} (FLEET_TEST_ALLOW_SKIPS=1?); the cases take tools away from a full set`);
      this.skip();
    }
  });
  after(() => {
    for (const s of shadows) s.remove();
  });

  it('as an ordinary user: stops before the command, listing exactly what is missing and the sudo apt-get line', async () => {
    const run = await shadow(['faketime', 'promtool']).run({ asUser: true });
    expect(run.code, run.stderr).to.equal(1);
    expect(run.stdout).not.to.include(MARKER);
    expect(listedPackages(run.stderr), run.stderr).to.deep.equal(['faketime', 'prometheus']);
    expect(run.stderr.split('\n'), run.stderr).to.include(
      '  sudo apt-get install -y faketime && sudo apt-get install -y --no-install-recommends prometheus',
    );
    expect(run.stderr).to.include('FLEET_TEST_ALLOW_SKIPS=1');
    expect(run.aptCalls, 'apt-get is not run').to.deep.equal([]);
  });

  it('as an ordinary user with FLEET_TEST_ALLOW_SKIPS=1: runs the command, naming what the skipped tests lack', async () => {
    const run = await shadow(['faketime']).run({ asUser: true, env: { FLEET_TEST_ALLOW_SKIPS: '1' } });
    expect(run.code, run.stderr).to.equal(0);
    expect(run.stdout).to.include(MARKER);
    expect(listedPackages(run.stderr), run.stderr).to.deep.equal(['faketime']);
    expect(run.aptCalls).to.deep.equal([]);
  });

  it('takes FLEET_TEST_ALLOW_SKIPS=0 as unset: stops', async () => {
    const run = await shadow(['faketime']).run({ asUser: true, env: { FLEET_TEST_ALLOW_SKIPS: '0' } });
    expect(run.code, run.stderr).to.equal(1);
    expect(run.stdout).not.to.include(MARKER);
    expect(run.stderr.split('\n'), run.stderr).to.include('  sudo apt-get install -y faketime');
  });

  it('refuses a FLEET_TEST_ALLOW_SKIPS that is neither 1 nor 0, naming the variable and its values', async () => {
    const run = await shadow(['faketime']).run({ asUser: true, env: { FLEET_TEST_ALLOW_SKIPS: 'yes' } });
    expect(run.code, run.stderr).to.equal(2);
    expect(run.stdout).not.to.include(MARKER);
    expect(run.stderr).to.include('FLEET_TEST_ALLOW_SKIPS must be 1').and.include('"yes"');
  });

  it('as an ordinary user, does not ask for iproute2, which only root runs', async () => {
    const run = await shadow(['ip']).run({ asUser: true });
    expect(run.code, run.stderr).to.equal(0);
    expect(run.stdout).to.include(MARKER);
  });

  describe('as root', () => {
    before(function () {
      if (!AS_ROOT || !fs.existsSync('/etc/debian_version')) this.skip(); // installing is for root on Debian
    });

    it('with everything there: runs the command and never calls apt-get', async () => {
      const run = await shadow([]).run({ asUser: false });
      expect(run.code, run.stderr).to.equal(0);
      expect(run.stdout).to.include(MARKER);
      expect(run.aptCalls).to.deep.equal([]);
      expect(run.stderr).not.to.include('installing');
    });

    it('installs exactly what is missing, after one apt-get update, then runs the command', async () => {
      const run = await shadow(['faketime', 'ip'], { aptGet: true, installs: { faketime: 'faketime', iproute2: 'ip' } }).run({ asUser: false });
      expect(run.code, run.stderr).to.equal(0);
      expect(run.stdout).to.include(MARKER);
      expect(run.aptCalls).to.deep.equal(['DEBIAN_FRONTEND=noninteractive update', 'DEBIAN_FRONTEND=noninteractive install -y faketime iproute2']);
      expect(run.stderr).to.include('installing faketime iproute2 with apt-get');
    });

    it('stops when the install leaves a tool missing, naming it', async () => {
      const run = await shadow(['faketime']).run({ asUser: false });
      expect(run.code, run.stderr).to.equal(1);
      expect(run.stdout).not.to.include(MARKER);
      expect(run.stderr).to.include('could not install what the tests need').and.include('faketime still not found');
    });

    it('without apt-get: stops with the apt-get line (no sudo), marked as Debian names', async () => {
      const run = await shadow(['faketime'], { aptGet: false }).run({ asUser: false });
      expect(run.code, run.stderr).to.equal(1);
      expect(run.stdout).not.to.include(MARKER);
      expect(run.stderr.split('\n'), run.stderr).to.include("  apt-get install -y faketime  # Debian's package names");
    });
  });
});
