/**
 * The `fleet watch` command: its options, their checks (exit 2 naming the option and the rule), and the watch's end
 * as lines and exit codes: 0 stopped (the cursor to resume from on stderr), 3 resync (the backfill hint), 1 overflow
 * or a refusal other than bad input, 2 for 400/401/403, 4 when the fleet cannot be reached at the start.
 */
import type { Command } from 'commander';
import { DEFAULT_FLEET_URL, loadWatchConfig } from '../config';
import { CursorError } from '../errors';
import { MAX_WATCH_DEPLOYMENTS } from '../http/api-schemas';
import { DEPLOYMENT_STATES } from '../machine';
import { printable, UUID_PATTERN } from '../util';
import { followOutput, stopOnSignals } from './following';
import { UsageError } from './reach';
import { decodeCursor } from '../streams/stream-follower';
import { watch, type WatchOutcome } from './watch';

/** How long after the first signal `fleet watch` exits even if something still holds it (it stops at once). */
const WATCH_STOP_MS = 2000;

/** How a bad `--from` is named: a watch takes cursors only (no stream id: the fleet's HTTP API has no such position). */
const WATCH_CURSOR_WORDS = {
  field: '--from',
  expected: 'the cursor a fleet watch or a fleet tail printed when it stopped',
  restart: 'start without --from, after reading what you missed from GET /api/deployments/:id/transitions',
};

interface WatchCommandOptions {
  readonly url?: string;
  readonly deployment?: readonly string[];
  readonly state?: readonly string[];
  readonly from?: string;
  readonly json?: boolean;
}

/** A repeatable option's values, each of which may also be a comma-separated list. */
const collect = (value: string, previous: readonly string[] = []): string[] => [
  ...previous,
  ...value
    .split(',')
    .map((v) => v.trim())
    .filter((v) => v !== ''),
];

/** The options as the watch takes them, or a UsageError naming the first bad one. */
function checked(options: WatchCommandOptions): { deploymentIds: string[]; states: string[]; from: string | null } {
  const ids = options.deployment ?? [];
  const wanted = options.state ?? [];
  const bad = ids.find((id) => !UUID_PATTERN.test(id));
  if (bad !== undefined) throw new UsageError(`--deployment: must be a UUID, got "${printable(bad.slice(0, 80))}"`);
  const deploymentIds = [...new Set(ids.map((id) => id.toLowerCase()))];
  if (deploymentIds.length > MAX_WATCH_DEPLOYMENTS)
    throw new UsageError(`--deployment: at most ${MAX_WATCH_DEPLOYMENTS}, got ${deploymentIds.length}`);
  const badState = wanted.find((s) => !(DEPLOYMENT_STATES as readonly string[]).includes(s));
  if (badState !== undefined) {
    throw new UsageError(`--state: must be one of ${DEPLOYMENT_STATES.join(', ')}, got "${printable(badState.slice(0, 40))}"`);
  }
  if (options.from !== undefined) {
    try {
      decodeCursor(options.from, WATCH_CURSOR_WORDS);
    } catch (err) {
      if (err instanceof CursorError) throw new UsageError(err.message);
      throw err;
    }
  }
  return { deploymentIds, states: [...new Set(wanted)], from: options.from ?? null };
}

/** The end as lines on stderr and an exit code. */
function finish(end: WatchOutcome, say: (line: string) => void): void {
  switch (end.kind) {
    case 'stopped':
      if (end.cursor !== null) say(`fleet watch: to resume from here: --from ${end.cursor}`);
      return;
    case 'resync':
      say(`fleet: the watch must resync (${end.reason}): ${end.message}`);
      say(`fleet watch: backfill with ${end.backfill}, then run fleet watch again without --from`);
      process.exitCode = 3;
      return;
    case 'overflow':
      say(`fleet: the fleet closed the watch: it fell behind (${end.message})`);
      if (end.cursor !== null) say(`fleet watch: to resume from where it was: --from ${end.cursor}`);
      process.exitCode = 1;
      return;
    case 'refused':
      say(`fleet: ${end.message}`);
      process.exitCode = end.status === 400 || end.status === 401 || end.status === 403 ? 2 : 1;
      return;
    default: {
      const never: never = end;
      throw new Error(`unknown end ${JSON.stringify(never)}`);
    }
  }
}

async function runWatch(options: WatchCommandOptions): Promise<void> {
  const { deploymentIds, states, from } = checked(options);
  const config = loadWatchConfig(process.env, options.url);
  const stopping = stopOnSignals('fleet watch', WATCH_STOP_MS);
  const out = followOutput(stopping);
  // what the fleet sent (a message, a cursor) is quoted: escaped
  const say = (line: string): void => {
    if (!out.closed()) process.stderr.write(`${printable(line)}\n`);
  };
  const end = await watch({
    url: config.url,
    token: config.token,
    deploymentIds,
    states,
    from,
    json: options.json === true,
    write: out.write,
    stop: stopping.stop,
    report: (message) => say(`fleet watch: ${message}`),
  });
  finish(end, say);
}

/** Registers `fleet watch` on the program (as a `.command()`, so it inherits the program's settings). */
export function addWatchCommand(program: Command): void {
  program
    .command('watch')
    .description(
      'print transitions as they happen, from a fleet over HTTP (GET /api/watch) with a token: as fleet tail prints them, for operators without Redis access',
    )
    .option('--url <url>', `the fleet's HTTP API (default FLEET_URL, else ${DEFAULT_FLEET_URL})`)
    .option('--deployment <id>', `only this deployment (repeatable, or comma-separated; at most ${MAX_WATCH_DEPLOYMENTS})`, collect)
    .option('--state <state>', `only transitions to this state (repeatable, or comma-separated: ${DEPLOYMENT_STATES.join(', ')})`, collect)
    .option('--from <cursor>', 'start after this cursor: what a fleet watch or a fleet tail printed when it stopped (default: from now)')
    .option('--json', 'one JSON object per line instead of text')
    .addHelpText(
      'after',
      `
The token comes from FLEET_TOKEN only (a token with the read scope: \`fleet token create --scopes read\`), never
from a flag: a flag's value shows in \`ps\` and in the shell's history. A fleet on loopback with no tokens file
needs none.

A dropped connection is made again, resuming after the last transition printed (nothing missed or repeated).
On SIGINT or SIGTERM it prints the cursor to resume from on stderr. Exit codes: 0 stopped; 2 bad input, or the
fleet refused the token (401) or its scope (403) or a filter (400); 3 the cursor was trimmed away (backfill from
GET /api/deployments/:id/transitions, then watch again without --from); 1 the watch fell behind and was closed
(overflow), or another refusal; 4 the fleet is unreachable at the start.`,
    )
    .action(runWatch);
}
