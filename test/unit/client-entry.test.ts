/**
 * The SDK installs light (issue 30, item 6): `lifecycle-fleet/client`, required by its package name in a fresh
 * process (a module once loaded stays in require.cache, and the mocha process loads the server), loads none of the
 * server's packages, and gives what a producer or a consumer needs. The package root still gives everything.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { expect } from 'chai';
import { repoRoot } from '../../src/util';

const run = promisify(execFile);

/** The server's packages: the HTTP framework, the ORM, Bull Board, the OpenTelemetry SDK. */
const SERVER_PACKAGES = /[\\/]node_modules[\\/](fastify|@fastify[\\/]|typeorm|@bull-board[\\/]|@opentelemetry[\\/]sdk-)/;

/** Requires `specifier` by the package's name (Node resolves its own name through `exports`) and reports. */
async function load(specifier: string): Promise<{ server: string[]; exports: string[] }> {
  const script = `
    const loaded = require(${JSON.stringify(specifier)});
    const server = [...new Set(Object.keys(require.cache).filter((p) => ${SERVER_PACKAGES}.test(p))
      .map((p) => /.*[\\\\/]node_modules[\\\\/](@[^\\\\/]+[\\\\/][^\\\\/]+|[^\\\\/]+)/.exec(p)[1]))];
    process.stdout.write(JSON.stringify({ server, exports: Object.keys(loaded).sort() }));`;
  const { stdout } = await run(process.execPath, ['-e', script], { cwd: repoRoot(), timeout: 60_000 });
  return JSON.parse(stdout) as { server: string[]; exports: string[] };
}

describe('lifecycle-fleet/client', function () {
  this.timeout(120_000);

  it('loads none of fastify, typeorm, @bull-board or the OpenTelemetry SDK', async () => {
    const client = await load('lifecycle-fleet/client');
    expect(client.server).to.deep.equal([]);
    for (const name of [
      'LifecycleProducer',
      'TransitionConsumer',
      'EVENT_SCHEMAS',
      'parsePayload',
      'validateEvent',
      'ValidationError',
      'EventIdConflictError',
      'DurabilityError',
      'ResyncRequiredError',
    ]) {
      expect(client.exports, name).to.include(name);
    }
  });

  it('is part of the root, which no longer exports what only the fleet wires', async () => {
    const [client, root] = await Promise.all([load('lifecycle-fleet/client'), load('lifecycle-fleet')]);
    expect(root.exports).to.include.members(client.exports);
    expect(root.exports).to.include.members(['startFleet', 'TransitionService', 'LifecycleWorker', 'OutboxRelay']);
    for (const internal of ['Sweeper', 'StampBuffer', 'buildHttpServer']) expect(root.exports).to.not.include(internal);
    expect(root.server, 'the root does load the server').to.not.deep.equal([]);
  });
});
