/**
 * The `fleet` command. Each subcommand is a thin shell over the composition root and the SDK; errors become one
 * clear line on stderr and a non-zero exit (2 for bad input, 1 for everything else).
 */
import * as fs from 'node:fs';
import { Command, CommanderError } from 'commander';
import { createDataSource } from '../entities/schema/data-source';
import { closeOnSignals, startFleet } from '../app';
import { loadConfig } from '../config';
import { migrate, migrationStatus } from '../entities/schema/migrate';
import { ConfigError, isTransient, ResyncRequiredError, SchemaTooNewError, ValidationError } from '../errors';
import { createLogger } from '../log';
import { LifecycleProducer } from '../queues/producer';
import { readDeploymentStatus } from './status';
import { createToken, parseTokenFile, SCOPES, TokenFileError } from '../http/tokens';
import { reaching, resolveEndpoints, starting, UnreachableError, UsageError } from './reach';
import { restartMe } from './restart';
import { PortTakenError, runStart } from './start';
import { decodeCursor, isStreamId, tail, TailCursorError } from './tail';
import { followOutput, stopOnSignals } from './following';
import { addWatchCommand } from './watch-command';
import { runDemo } from './demo';
import { transitionStreamKey } from '../streams/outbox-relay';
import { createRedis, describeServer, pingRedis } from '../redis/connection';
import { MAX_STREAM_PARTITIONS } from '../streams/partitions';
import { repartition } from '../streams/repartition';
import { printable, UUID_PATTERN } from '../util';

/** Exit code of a process that meets a schema newer than it can run against (SchemaTooNewError). */
export const SCHEMA_TOO_NEW_EXIT_CODE = 6;

async function runMigrate(options: { readonly status?: boolean }): Promise<void> {
  const config = loadConfig();
  const endpoints = resolveEndpoints(config);
  const ds = createDataSource({ url: endpoints.databaseUrl, poolSize: 2, applicationName: 'lifecycle-fleet-migrate', statementTimeoutMs: 0 });
  const postgres = describeServer('PostgreSQL', endpoints.databaseUrl);
  await reaching(postgres, () => ds.initialize());
  try {
    if (options.status === true) {
      const states = await reaching(postgres, () => migrationStatus(ds));
      for (const { name, state } of states) process.stdout.write(`${state.padEnd(8)}${name}\n`);
      const count = (state: string) => states.filter((m) => m.state === state).length;
      const unknown = count('unknown');
      process.stdout.write(
        `${count('applied')} applied, ${count('pending')} pending${unknown > 0 ? `, ${unknown} unknown to this version (applied by a newer one)` : ''}\n`,
      );
      return;
    }
    const { ran } = await reaching(postgres, () => migrate(ds));
    process.stdout.write(ran.length === 0 ? 'schema is up to date\n' : `applied: ${ran.join(', ')}\n`);
  } finally {
    await ds.destroy();
  }
}

async function runWorker(): Promise<void> {
  const config = loadConfig();
  const logger = createLogger(config.logLevel, undefined, { format: config.logFormat });
  const endpoints = resolveEndpoints(config);
  const fleet = await starting(endpoints, () =>
    startFleet(config, endpoints, logger, { worker: true, relay: true, sweep: true, http: false, onStuck: restartMe }),
  );
  // the handlers first: whoever reads the start line may stop the process at once
  const stopped = closeOnSignals(fleet, logger);
  logger.info({ prefix: config.prefix, concurrency: config.concurrency }, 'worker started (lifecycle jobs, outbox relay, sweep)');
  await stopped;
}

async function runHttp(): Promise<void> {
  const config = loadConfig();
  const logger = createLogger(config.logLevel, undefined, { format: config.logFormat });
  const endpoints = resolveEndpoints(config);
  const fleet = await starting(endpoints, () => startFleet(config, endpoints, logger, { worker: false, relay: false, sweep: false, http: true }));
  const stopped = closeOnSignals(fleet, logger);
  logger.info({ url: fleet.httpUrl }, 'http started');
  await stopped;
}

async function runEnqueue(name: string, json: string): Promise<void> {
  let payload: unknown;
  try {
    payload = JSON.parse(json);
  } catch (err) {
    throw new UsageError(`<json>: not valid JSON (${(err as Error).message})`);
  }
  const config = loadConfig();
  const redisUrl = resolveEndpoints(config).redisUrl;
  const producer = new LifecycleProducer({ connection: redisUrl, prefix: config.prefix });
  try {
    const result = await reaching(describeServer('Redis', redisUrl), () => producer.enqueue(name, payload));
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    await producer.close();
  }
}

async function runStatus(deploymentId: string, options: { json?: boolean }): Promise<void> {
  if (!UUID_PATTERN.test(deploymentId)) {
    throw new UsageError(`<deploymentId>: must be a UUID, got "${deploymentId}"`);
  }
  const config = loadConfig();
  const databaseUrl = resolveEndpoints(config).databaseUrl;
  const ds = createDataSource({ url: databaseUrl, poolSize: 1, applicationName: 'lifecycle-fleet-cli' });
  const postgres = describeServer('PostgreSQL', databaseUrl);
  await reaching(postgres, () => ds.initialize());
  try {
    const status = await reaching(postgres, () => readDeploymentStatus(ds, deploymentId));
    if (status === null) {
      process.stderr.write(`deployment ${deploymentId} not found\n`);
      process.exitCode = 1;
      return;
    }
    // JSON.stringify escapes C0 controls but not DEL, C1 or bidi overrides; printable() keeps JSON JSON
    process.stdout.write(options.json === true ? `${printable(JSON.stringify(status, null, 2), { keepNewlines: true })}\n` : status.text);
  } finally {
    await ds.destroy();
  }
}

/** How long after the first signal `fleet tail` exits even if something still holds it (it stops within about 1 s). */
const TAIL_STOP_MS = 2000;

async function runTail(options: { group?: string; consumer?: string; from?: string; json?: boolean }): Promise<void> {
  if (options.consumer !== undefined && options.group === undefined) throw new UsageError('--consumer needs --group');
  if (options.from !== undefined && !isStreamId(options.from)) {
    if (options.group !== undefined)
      throw new UsageError(`--from: with --group, must be a stream id like 1763900000000-0, 0 or $, got "${options.from}"`);
    try {
      decodeCursor(options.from);
    } catch (err) {
      if (err instanceof TailCursorError) throw new UsageError(err.message);
      throw err;
    }
  }
  const config = loadConfig();
  const redisUrl = resolveEndpoints(config).redisUrl;
  // The first SIGINT or SIGTERM stops the tail, whatever Redis does: the tail returns within about a second (it waits
  // for nothing Redis has to answer), and should anything still hold the process, it exits at TAIL_STOP_MS anyway. A
  // second signal exits at once.
  const stopping = stopOnSignals('fleet tail', TAIL_STOP_MS);
  const { stop } = stopping;
  // Redis must answer first, as for `fleet enqueue`: unreachable at start is one line and exit code 4, not a tail
  // waiting in silence (an outage after the start is waited out, and said once)
  const reachable = reaching(describeServer('Redis', redisUrl), () => pingRedis(redisUrl));
  reachable.catch(() => undefined); // left behind by a stop
  if ((await Promise.race([reachable.then(() => 'reached' as const), stop.then(() => 'stopped' as const)])) === 'stopped') return;
  // a closed stdout (`fleet tail | head -1`) ends the tail quietly
  const out = followOutput(stopping);
  try {
    await tail({
      redisUrl,
      streamKey: transitionStreamKey(config.prefix),
      ...options,
      write: out.write,
      stop,
      report: (_level, message) => process.stderr.write(`fleet tail: ${message}\n`),
      // not after a reader closed stdout (`fleet tail | head -1`): it took what it wanted, and the tail ends quietly
      onCursor: (cursor) => {
        if (!out.closed()) process.stderr.write(`fleet tail: to resume every partition from here: --from ${cursor}\n`);
      },
    });
  } catch (err) {
    if (err instanceof TailCursorError) throw new UsageError(err.message);
    if (err instanceof ResyncRequiredError) {
      process.stderr.write(`fleet: ${err.message}\n`);
      process.exitCode = 3;
      return;
    }
    throw err;
  }
}

/** How long `fleet streams repartition` waits for the relay's lock and the consumer groups by default (s). */
const REPARTITION_TIMEOUT_S = 60;

/**
 * `fleet streams repartition --to N`: changes the number of partitions of a live fleet's stream, losing nothing and
 * keeping every deployment's order for consumers (src/streams/repartition.ts). Progress goes to stderr, the outcome
 * to stdout; a refusal (a group behind, the relay's lock not handed over) exits 1 with nothing changed.
 */
async function runRepartition(options: { to?: string; timeout?: string }): Promise<void> {
  const rule = `a whole number from 1 to ${MAX_STREAM_PARTITIONS}`;
  if (options.to === undefined) throw new UsageError(`--to: required: the new number of partitions, ${rule}`);
  const to = /^\d+$/.test(options.to) ? Number(options.to) : NaN;
  if (!(to >= 1 && to <= MAX_STREAM_PARTITIONS)) throw new UsageError(`--to: must be ${rule}, got "${printable(options.to)}"`);
  const timeoutText = options.timeout ?? String(REPARTITION_TIMEOUT_S);
  const timeoutS = /^\d+(\.\d+)?$/.test(timeoutText) ? Number(timeoutText) : NaN;
  if (!(timeoutS > 0 && timeoutS <= 86_400))
    throw new UsageError(`--timeout: must be a number of seconds above 0 and at most 86400, got "${printable(timeoutText)}"`);
  const config = loadConfig();
  const endpoints = resolveEndpoints(config);
  const redis = createRedis(endpoints.redisUrl, 'producer', 'lifecycle-fleet-repartition');
  redis.on('error', () => undefined); // a connection error fails the command below, once
  try {
    const outcome = await starting(endpoints, () =>
      repartition({
        databaseUrl: endpoints.databaseUrl,
        redis,
        streamKey: transitionStreamKey(config.prefix),
        to,
        timeoutMs: timeoutS * 1000,
        report: (line) => process.stderr.write(`fleet streams repartition: ${line}\n`),
      }),
    );
    if (outcome.kind === 'refused') {
      process.stderr.write(`fleet streams repartition: refused: ${outcome.message}\n`);
      process.exitCode = 1;
      return;
    }
    process.stdout.write(
      outcome.kind === 'unchanged'
        ? `unchanged: ${outcome.partitions} partition(s)\n`
        : `repartitioned: ${outcome.from} -> ${outcome.to} partition(s)\n`,
    );
  } finally {
    redis.disconnect();
  }
}

async function runDemoCommand(options: { api?: string }): Promise<void> {
  const config = loadConfig();
  const apiUrl = options.api ?? `http://${config.httpHost.includes(':') ? `[${config.httpHost}]` : config.httpHost}:${config.httpPort}`;
  const tty = process.stderr.isTTY;
  const report = await runDemo({
    config,
    redisUrl: resolveEndpoints(config).redisUrl,
    apiUrl,
    // the demo's lines quote what the fleet stored (a job's failed reason, dispatch answers): escaped, then our own
    // line clearing
    say: (line) => process.stderr.write(`${tty ? '\r\x1b[K' : ''}${printable(line, { keepNewlines: true })}\n`),
    progress: (line) => {
      if (tty) process.stderr.write(`\r\x1b[K${printable(line)}`);
    },
  });
  process.stdout.write(`${printable(JSON.stringify(report))}\n`);
  if (!report.ok) process.exitCode = 1;
}

/**
 * `fleet token create`: a new random token, printed once (line 1) with its file entry (line 2, JSON). With
 * `--file`, the entry is also added to that tokens file (created if missing; written whole, then renamed into place,
 * so a running fleet's SIGHUP reload never reads half a file).
 */
function runTokenCreate(options: { name: string; scopes: string; file?: string }): void {
  const scopes = options.scopes
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
  let created: ReturnType<typeof createToken>;
  try {
    created = createToken(options.name, scopes);
  } catch (err) {
    if (err instanceof TokenFileError) throw new UsageError(err.problems.map((p) => p.replace(/^\[0\]\./, '--')).join('; '));
    throw err;
  }
  if (options.file !== undefined) {
    const file = options.file;
    const existing = fs.existsSync(file) ? parseTokenFile(fs.readFileSync(file, 'utf8'), file) : [];
    if (existing.some((e) => e.name === created.entry.name)) throw new UsageError(`--name: "${created.entry.name}" is already in ${file}`);
    const tmp = `${file}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, `${JSON.stringify([...existing, created.entry], null, 2)}\n`, { mode: 0o600 });
    fs.renameSync(tmp, file);
  }
  process.stdout.write(`${created.token}\n${JSON.stringify(created.entry)}\n`);
  process.stderr.write(
    options.file !== undefined
      ? `fleet: token "${created.entry.name}" added to ${options.file}; it is shown only now. Send SIGHUP to running fleets to load it.\n`
      : 'fleet: the token is shown only now. Add the entry to FLEET_API_TOKENS_FILE (only its hash is kept) and send SIGHUP to running fleets.\n',
  );
}

/** What `fleet --help` says after the commands. */
const PROGRAM_HELP = `
Configuration comes from the environment (REDIS_URL, DATABASE_URL, FLEET_PREFIX, ...; see the README).
With REDIS_URL/DATABASE_URL unset, \`fleet start\` runs local Redis and PostgreSQL under .fleet/, and the
other commands use them while it runs.

Examples:
  fleet start
  fleet enqueue deployment.create '{"deploymentId":"6f1c...","name":"web"}'
  fleet status 6f1c2a9e-0d4b-4c55-9a55-3f1a0c6d2b11`;

export function buildProgram(): Command {
  const program = new Command('fleet')
    .description('lifecycle-fleet: deployment lifecycle workers on BullMQ and PostgreSQL')
    .showHelpAfterError('(run `fleet --help` for usage)')
    .exitOverride()
    .addHelpText('after', PROGRAM_HELP);

  program
    .command('start')
    .description('run everything in one process (local Redis/PostgreSQL when REDIS_URL/DATABASE_URL are unset)')
    .action(runStart);
  program
    .command('worker')
    .description('run a lifecycle worker, an outbox relay (standby unless it leads) and the sweep, against REDIS_URL and DATABASE_URL')
    .action(runWorker);
  program.command('http').description('serve the HTTP API, dispatch, /metrics and Bull Board').action(runHttp);
  program
    .command('migrate')
    .description('apply pending database migrations (once, under an advisory lock)')
    .option('--status', 'list the migrations, applied and pending, and change nothing')
    .action(runMigrate);
  program
    .command('enqueue')
    .description('validate and enqueue one lifecycle event; prints its eventId and jobId')
    .argument('<name>', 'event name, e.g. deployment.create')
    .argument('<json>', 'the payload as JSON')
    .action(runEnqueue);
  program
    .command('tail')
    .description('print transitions as they happen (exit 3 when --from was trimmed away: resync from the history API)')
    .option('--group <group>', 'read through this consumer group (a durable position)')
    .option('--consumer <name>', 'consumer name within the group (default tail-<pid>)')
    .option(
      '--from <id>',
      'start at this stream id on every partition (0 = all retained, $ = new only; default $), or at the cursor a tail printed when it stopped',
    )
    .option('--json', 'one JSON object per line instead of text')
    .action(runTail);
  addWatchCommand(program);
  program
    .command('streams')
    .description('manage the transition stream')
    .command('repartition')
    .description(
      "change the number of partitions of a running fleet's stream, losing nothing and keeping each deployment's order: takes the relays' lock, waits until every consumer group has acknowledged everything, then switches (exit 1, nothing changed, when a group stays behind)",
    )
    .option('--to <n>', `the new number of partitions (1-${MAX_STREAM_PARTITIONS})`)
    .option(
      '--timeout <seconds>',
      `how long to wait for the active relay's lock, and then for the consumer groups to catch up (each; default ${REPARTITION_TIMEOUT_S})`,
    )
    .action(runRepartition);
  program
    .command('demo')
    .description('drive a realistic workload through a running fleet (`npm start`): every state, orphans, dispatch fallback')
    .option('--api <url>', 'the fleet HTTP API (default http://FLEET_HTTP_HOST:FLEET_HTTP_PORT)')
    .action(runDemoCommand);
  program
    .command('status')
    .description('show a deployment, its current attempt and its latest transitions')
    .argument('<deploymentId>', 'the deployment id (UUID)')
    .option('--json', 'print JSON instead of text')
    .action(runStatus);
  program
    .command('token')
    .description('manage HTTP API tokens')
    .command('create')
    .description(`create an API token (scopes: ${SCOPES.join(', ')}); prints the token once, then its FLEET_API_TOKENS_FILE entry`)
    .requiredOption('--name <name>', 'the token name, recorded as the actor of what it causes')
    .requiredOption('--scopes <list>', 'comma-separated scopes, e.g. read,events:write')
    .option('--file <path>', 'also add the entry to this tokens file')
    .action(runTokenCreate);
  return program;
}

export async function main(argv: readonly string[]): Promise<void> {
  try {
    await buildProgram().parseAsync([...argv]);
  } catch (err) {
    if (err instanceof CommanderError) {
      process.exitCode = err.exitCode;
      return;
    }
    if (err instanceof ValidationError) {
      process.stderr.write(`fleet: ${err.code}\n${err.issues.map((i) => `  ${i.field}: ${i.rule}`).join('\n')}\n`);
      process.exitCode = 2;
      return;
    }
    if (err instanceof ConfigError || err instanceof UsageError || err instanceof TokenFileError || err instanceof PortTakenError) {
      process.stderr.write(`fleet: ${err.message}\n`);
      process.exitCode = 2;
      return;
    }
    if (err instanceof SchemaTooNewError) {
      process.stderr.write(`fleet: ${err.message}\n`);
      process.exitCode = SCHEMA_TOO_NEW_EXIT_CODE;
      return;
    }
    if (err instanceof UnreachableError) {
      process.stderr.write(`fleet: ${err.message}\n`);
      process.exitCode = 4;
      return;
    }
    process.stderr.write(`fleet: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = isTransient(err) ? 4 : 1;
  }
}
