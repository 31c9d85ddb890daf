/**
 * Runs a command with REDIS_URL and DATABASE_URL pointing at private local servers.
 *
 *   node dist/dev/with-services.js [--test] -- <command> [args...]
 *
 * Variables that are already set are passed through untouched (CI, or your own
 * servers); only the missing services are started: in `<repo>/.fleet/test`, wiped
 * and tuned for speed, with --test; in `<repo>/.fleet/run`, persistent, without.
 * The command inherits stdio; SIGINT/SIGTERM/SIGHUP are forwarded to it. When it
 * exits the services are stopped and its exit code is returned (128+n for signal n).
 */
import { spawn } from 'node:child_process';
import * as os from 'node:os';
import * as path from 'node:path';
import { repoRoot } from '../src/util';
import { MissingBinaryError, startLocalServices } from './servers';
import type { LocalServices } from './servers';
import type { ChildProcess } from 'node:child_process';

const USAGE = 'usage: node dist/dev/with-services.js [--test] -- <command> [args...]';
const FORWARDED: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

function say(msg: string): void {
  process.stderr.write(`with-services: ${msg}\n`);
}

function parseArgs(argv: string[]): { test: boolean; command: string[] } | undefined {
  let test = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') return { test, command: argv.slice(i + 1) };
    if (a === '--test') test = true;
    else if (a?.startsWith('-')) return undefined;
    else return { test, command: argv.slice(i) }; // tolerate a missing `--`
  }
  return { test, command: [] };
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
