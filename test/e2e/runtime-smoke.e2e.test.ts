/**
 * The smoke test each supported Node runs in CI (dev/runtimes.ts): `fleet start` on the Node running this test, one
 * event in through the producer SDK, its transition out on the stream, and a clean stop on SIGTERM.
 */
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { LifecycleProducer } from '../../src/client';
import { createDatabase } from '../helpers/db';
import { FleetProcess } from '../helpers/fleet-process';
import { testEnv } from '../helpers/env';
import { freePort } from '../helpers/net';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

describe('runtime smoke: fleet start on this Node', function () {
  this.timeout(120_000);

  it('starts on the Node that runs the test, applies an event and publishes its transition', async () => {
    const db = await createDatabase();
    const prefix = uniquePrefix();
    const port = await freePort();
    const env: NodeJS.ProcessEnv = {
      PATH: process.env.PATH,
      REDIS_URL: testEnv().redisUrl,
      DATABASE_URL: db.url,
      FLEET_PREFIX: prefix,
      FLEET_HTTP_PORT: String(port),
      LOG_LEVEL: 'warn',
    };
    const fleet = new FleetProcess(['start'], env);
    const { child, exited } = fleet;
    const api = `http://127.0.0.1:${port}`;
    const producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    const redis = testRedis();
    let code: number | null = null;
    try {
      await waitFor('the fleet to serve', async () => ((await fetch(`${api}/readyz`).catch(() => null))?.status === 200 ? true : undefined), 60_000);
      // the fleet's own report of its runtime: the same Node as this test's, not whatever `node` PATH finds
      const metrics = await (await fetch(`${api}/metrics`)).text();
      expect(metrics, fleet.log).to.match(new RegExp(`^fleet_nodejs_version_info\\{version="${process.version.replace(/\./g, '\\.')}"`, 'm'));

      const deploymentId = randomUUID();
      await producer.createDeployment({ deploymentId, name: 'smoke' });
      const entry = await waitFor(
        'the transition on the stream',
        async () => {
          const entries = await redis.xrange(`${prefix}:transitions`, '-', '+');
          return entries
            .map(([, f]) => Object.fromEntries(f.flatMap((v, i, a) => (i % 2 === 0 ? [[v, a[i + 1]]] : []))) as Record<string, string>)
            .find((f) => f.deploymentId === deploymentId);
        },
        30_000,
      );
      expect(entry).to.deep.include({ version: '1', to: 'pending', reason: 'created' });
    } finally {
      if (child.exitCode === null) child.kill('SIGTERM');
      await producer.close();
      redis.disconnect();
      code = await exited;
      await db.drop();
      await dropPrefix(prefix);
    }
    expect(code, fleet.log.slice(-2000)).to.equal(0);
  });
});
