/**
 * `fleet start`: everything in one process, with private local Redis and PostgreSQL (dev/servers) for whichever of
 * REDIS_URL/DATABASE_URL is unset; and `.fleet/run/endpoints.json`, through which the other `fleet` commands find
 * those local servers while `fleet start` runs.
 *
 * This is the only product file that uses dev/servers, and it loads it lazily (a dynamic import, only when local
 * servers are to be started): a production install without dist/dev still runs `fleet worker`, `fleet http`, ...
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { createDataSource } from '../entities/schema/data-source';
import { isProcessAlive, repoRoot } from '../util';
import { closeOnSignals, startFleet, type Endpoints } from '../app';
import { restartMe } from './restart';
import { loadConfig } from '../config';
import { migrate } from '../entities/schema/migrate';
import { createLogger, scrubUrls } from '../log';
import type * as DevServers from '../../dev/servers';

/** Where `fleet start` records the local services it started, so other `fleet` commands can find them. */
const localEndpointsFile = (): string => path.join(repoRoot(), '.fleet', 'run', 'endpoints.json');

/** The endpoints of the local services of a running `fleet start` in this checkout, if there is one. */
export function runningLocalEndpoints(): Endpoints | undefined {
  try {
    const local = JSON.parse(fs.readFileSync(localEndpointsFile(), 'utf8')) as Endpoints & { pid: number };
    if (isProcessAlive(local.pid)) return { redisUrl: local.redisUrl, databaseUrl: local.databaseUrl };
  } catch {
    // no local fleet running
  }
  return undefined;
}

/** dev/servers, loaded now; an install without it (production) gets a clear message instead of a require stack. */
async function loadDevServers(): Promise<typeof DevServers> {
  try {
    return await import('../../dev/servers');
  } catch (err) {
    if (err instanceof Error && 'code' in err && err.code === 'MODULE_NOT_FOUND' && err.message.includes('dev/servers')) {
      throw new Error('local Redis/PostgreSQL need the development tooling (dev/servers), which this install lacks: set REDIS_URL and DATABASE_URL');
    }
    throw err;
  }
}

/** Fails with a line naming the variable to set when the HTTP port is taken, before anything is started. */
async function assertPortFree(host: string, port: number): Promise<void> {
  if (port === 0) return;
  const probe = net.createServer();
  try {
    await new Promise<void>((resolve, reject) => {
      probe.once('error', reject);
      probe.listen({ host, port, exclusive: true }, resolve);
    });
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    throw new PortTakenError(
      code === 'EADDRINUSE'
        ? `port ${port} on ${host} is in use: set FLEET_HTTP_PORT (and FLEET_HTTP_HOST) to a free one`
        : `cannot listen on ${host}:${port} (${String(code)}): set FLEET_HTTP_HOST/FLEET_HTTP_PORT`,
    );
  } finally {
    await new Promise<void>((resolve) => probe.close(() => resolve()));
  }
}

/** The HTTP port `fleet start` needs is taken (exit code 2, as for any configuration problem). */
export class PortTakenError extends Error {}

export async function runStart(): Promise<void> {
  const config = loadConfig();
  const logger = createLogger(config.logLevel, undefined, { format: config.logFormat });
  await assertPortFree(config.httpHost, config.httpPort);
  let local: DevServers.LocalServices | null = null;
  let endpoints: Endpoints;
  if (config.redisUrl !== null && config.databaseUrl !== null) {
    endpoints = { redisUrl: config.redisUrl, databaseUrl: config.databaseUrl };
  } else {
    const { startLocalServices } = await loadDevServers();
    const dir = path.join(repoRoot(), '.fleet', 'run');
    local = await startLocalServices({
      dir,
      redis: config.redisUrl === null,
      postgres: config.databaseUrl === null,
      fresh: false,
      fast: false,
      log: (msg) => logger.info(msg),
      // a local server that dies is restarted, a few times; past that the fleet stops with one line and exit 1
      supervise: {
        maxRestarts: 3,
        withinMs: 10 * 60_000,
        onGiveUp: (why) => {
          logger.error(`giving up: ${why}`);
          process.exitCode = 1;
          process.kill(process.pid, 'SIGTERM');
        },
      },
    });
    endpoints = {
      redisUrl: config.redisUrl ?? local.redisUrl ?? '',
      databaseUrl: config.databaseUrl ?? local.databaseUrl ?? '',
    };
    fs.writeFileSync(localEndpointsFile(), JSON.stringify({ ...endpoints, pid: process.pid }), { mode: 0o600 });
  }
  try {
    const ds = createDataSource({ url: endpoints.databaseUrl, poolSize: 2, applicationName: 'lifecycle-fleet-migrate', statementTimeoutMs: 0 });
    await ds.initialize();
    try {
      const { ran } = await migrate(ds);
      if (ran.length > 0) logger.info({ migrations: ran }, 'migrated');
    } finally {
      await ds.destroy();
    }
    const fleet = await startFleet(config, endpoints, logger, { worker: true, relay: true, sweep: true, http: true, onStuck: restartMe });
    const url = fleet.httpUrl ?? '';
    // the handlers first: whoever reads the start line may stop the process at once
    const stopped = closeOnSignals(fleet, logger);
    logger.info({ url }, 'lifecycle-fleet is running; Ctrl-C stops it');
    process.stderr.write(
      [
        '',
        'lifecycle-fleet is running',
        `  Bull Board   ${url}/admin/queues`,
        `  live page    ${url}/ui`,
        `  API          ${url}/api/deployments`,
        `  metrics      ${url}/metrics`,
        // never a password on the terminal (it ends up in scrollback and CI logs): the URLs with theirs are in
        // .fleet/run/endpoints.json (mode 0600) while this runs
        `  Redis        ${local?.redisUrl !== undefined ? scrubUrls(endpoints.redisUrl) : 'REDIS_URL'}`,
        `  PostgreSQL   ${local?.databaseUrl !== undefined ? scrubUrls(endpoints.databaseUrl) : 'DATABASE_URL'}`,
        '  in another terminal: npx fleet demo, npx fleet tail, npx fleet status <id>',
        '',
        '',
      ].join('\n'),
    );
    await stopped;
  } finally {
    if (local !== null) {
      fs.rmSync(localEndpointsFile(), { force: true });
      await local.stop();
    }
  }
}
