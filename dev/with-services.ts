/**
 * Runs a command with REDIS_URL and DATABASE_URL pointing at private local servers.
 *
 *   node dist/dev/with-services.js [--test] [--test-tools] -- <command> [args...]
 *
 * Variables that are already set are passed through untouched (CI, or your own
 * servers); only the missing services are started: in `<repo>/.fleet/test`, wiped
 * and tuned for speed, with --test; in `<repo>/.fleet/run`, persistent, without.
 * With --test-tools (`npm test`), the tools the tests run (chromium, faketime, ...:
 * TEST_TOOLS in dev/servers/binaries.ts) come first: installed with apt-get as root
 * on Debian, otherwise the run stops with the command that installs them, unless
 * FLEET_TEST_ALLOW_SKIPS=1 lets the tests that need them skip.
 * The command inherits stdio; SIGINT/SIGTERM/SIGHUP are forwarded to it. When it
 * exits the services are stopped and its exit code is returned (128+n for signal n).
 */
import { spawn } from 'node:child_process';
import * as os from 'node:os';
import * as path from 'node:path';
import { repoRoot } from '../src/util';
import {
  canInstall,
  installCommand,
  installRequirements,
  MissingBinaryError,
  missingRequirements,
  serverRequirements,
  startLocalServices,
  TEST_TOOLS,
} from './servers';
import type { LocalServices, Requirement } from './servers';
import type { ChildProcess } from 'node:child_process';

const USAGE = 'usage: node dist/dev/with-services.js [--test] [--test-tools] -- <command> [args...]';
/** `1`: with --test-tools, run without the missing tools (the tests that need them skip) instead of stopping. */
const ALLOW_SKIPS = 'FLEET_TEST_ALLOW_SKIPS';
const FORWARDED: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

function say(msg: string): void {
  process.stderr.write(`with-services: ${msg}\n`);
}

interface Args {
  test: boolean;
  testTools: boolean;
  command: string[];
}

function parseArgs(argv: string[]): Args | undefined {
  const args: Args = { test: false, testTools: false, command: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') return { ...args, command: argv.slice(i + 1) };
    if (a === '--test') args.test = true;
    else if (a === '--test-tools') args.testTools = true;
    else if (a?.startsWith('-')) return undefined;
    else return { ...args, command: argv.slice(i) }; // tolerate a missing `--`
  }
  return args;
}

const listed = (reqs: readonly Requirement[]): string => reqs.map((r) => `\n  ${r.name} (Debian package ${r.pkg}): ${r.neededBy}`).join('');

/** What an ordinary user (or a machine without apt-get) is told: what is missing, for what, and the command. */
function missingMessage(missing: readonly Requirement[]): string {
  const them = missing.length === 1 ? 'it' : 'them';
  const lines = [`the tests need what this machine lacks:${listed(missing)}`, `install ${them} with:`, `  ${installCommand(missing)}`];
  for (const r of missing) {
    if (r.toolOnlyOf === undefined) continue;
    lines.push(
      `(${r.pkg} is wanted for ${r.name} only: where its install starts the ${r.toolOnlyOf} server, \`systemctl disable --now ${r.toolOnlyOf}\` stops it)`,
    );
  }
  lines.push(`or set ${ALLOW_SKIPS}=1 to run without (the tests that need ${them} skip)`);
  return lines.join('\n');
}

/**
 * --test-tools: brings what the tests run (and the servers' binaries, in the same apt-get run) before the command
 * starts. Returns the exit code to stop with, or undefined to go on.
 */
async function ensureTestTools(servers: { redis: boolean; postgres: boolean }, logFile: string): Promise<number | undefined> {
  const allowSkips = process.env[ALLOW_SKIPS];
  if (allowSkips !== undefined && !['', '0', '1'].includes(allowSkips)) {
    say(`${ALLOW_SKIPS} must be 1 (run; the tests whose tools are missing skip) or 0 (the default), not ${JSON.stringify(allowSkips)}`);
    return 2;
  }
  const tools = missingRequirements(TEST_TOOLS);
  if (tools.length === 0) return undefined;
  if (allowSkips === '1') {
    say(`${ALLOW_SKIPS}=1: the tests that need these skip:${listed(tools)}`);
    return undefined;
  }
  const missing = [...missingRequirements(serverRequirements(servers)), ...tools];
  if (!canInstall()) {
    say(missingMessage(missing));
    return 1;
  }
  try {
    await installRequirements(missing, logFile, say);
  } catch (err) {
    say(`could not install what the tests need: ${err instanceof Error ? err.message : String(err)}`);
    return 1;
  }
  return undefined;
}

function signalExitCode(sig: NodeJS.Signals): number {
  return 128 + (os.constants.signals[sig] ?? 0);
}

async function main(): Promise<number> {
  const args = parseArgs(process.argv.slice(2));
  const [cmd, ...cmdArgs] = args?.command ?? [];
  if (!args || cmd === undefined) {
    say(USAGE);
    return 2;
  }

  // installed before the services start so that their default ^C handling defers to us
  let child: ChildProcess | undefined;
  let caught: NodeJS.Signals | undefined;
  const forward = (sig: NodeJS.Signals): void => {
    if (child && child.exitCode === null && child.signalCode === null) child.kill(sig);
    else caught ??= sig;
  };
  for (const sig of FORWARDED) process.on(sig, forward);

  const root = repoRoot();
  const env: NodeJS.ProcessEnv = { ...process.env };
  const needRedis = !env['REDIS_URL'];
  const needPg = !env['DATABASE_URL'];
  if (args.testTools) {
    // beside the services' directory: a --test run wipes that one
    const stop = await ensureTestTools({ redis: needRedis, postgres: needPg }, path.join(root, '.fleet', 'apt-get.log'));
    if (stop !== undefined) return stop;
  }
  let services: LocalServices | undefined;
  if (needRedis || needPg) {
    const dir = path.join(root, '.fleet', args.test ? 'test' : 'run');
    try {
      services = await startLocalServices({
        dir,
        redis: needRedis,
        postgres: needPg,
        fresh: args.test,
        fast: args.test,
        log: say,
      });
    } catch (err) {
      if (err instanceof MissingBinaryError) say(`missing local server binaries; install them with:\n  ${err.command}`);
      else say(`could not start local services: ${err instanceof Error ? err.message : String(err)}`);
      return 1;
    }
    if (services.redisUrl) env['REDIS_URL'] = services.redisUrl;
    if (services.databaseUrl) env['DATABASE_URL'] = services.databaseUrl;
    // the fleet's role is no superuser; the few tests that need one (e.g. to set deadlock_timeout) read this
    if (args.test && services.adminDatabaseUrl) env['FLEET_TEST_ADMIN_DATABASE_URL'] = services.adminDatabaseUrl;
    const started = [
      services.redisPort !== undefined ? `redis on 127.0.0.1:${services.redisPort}` : '',
      services.pgPort !== undefined ? `postgres on 127.0.0.1:${services.pgPort}` : '',
    ].filter(Boolean);
    say(`started ${started.join(' and ')} (data and logs in ${path.relative(process.cwd(), dir) || '.'})`);
  }

  let code: number;
  if (caught) {
    code = signalExitCode(caught);
  } else {
    // like `npm run`, make the repo's node_modules/.bin commands (mocha, ...) available
    env['PATH'] = [path.join(root, 'node_modules', '.bin'), env['PATH']].filter(Boolean).join(path.delimiter);
    code = await new Promise<number>((resolve) => {
      child = spawn(cmd, cmdArgs, { stdio: 'inherit', env });
      child.once('error', (err: NodeJS.ErrnoException) => {
        say(`cannot run ${cmd}: ${err.message}`);
        resolve(err.code === 'ENOENT' ? 127 : 126);
      });
      child.once('exit', (exitCode, sig) => resolve(exitCode ?? (sig ? signalExitCode(sig) : 1)));
    });
  }

  if (services) {
    await services.stop().catch((err: unknown) => say(`stopping services failed: ${String(err)}`));
  }
  return code;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    say(err instanceof Error ? (err.stack ?? err.message) : String(err));
    process.exit(1);
  },
);
