/**
 * `npm start` as a newcomer meets it: `fleet start` with REDIS_URL and DATABASE_URL unset brings up its own Redis
 * and PostgreSQL under .fleet/run, migrates, serves; `fleet demo` then reaches every state and sees the dispatch
 * fallback; SIGTERM stops everything cleanly.
 */
import { execFile } from 'node:child_process';
import { FleetProcess } from '../helpers/fleet-process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'chai';
import { freePort } from '../helpers/net';
import { waitFor } from '../helpers/wait';
import { repoRoot } from '../../src/util';

const ROOT = repoRoot();
const FLEET = path.join(ROOT, 'bin', 'fleet.js');

function localFleetRunning(): boolean {
  try {
    const { pid } = JSON.parse(fs.readFileSync(path.join(ROOT, '.fleet', 'run', 'endpoints.json'), 'utf8')) as { pid: number };
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('fleet start + fleet demo, from nothing', function () {
  this.timeout(180_000);

  it('starts its own services, reaches every state with the demo, and stops cleanly on SIGTERM', async function () {
    if (localFleetRunning()) this.skip(); // a developer's `npm start` is running in this checkout
    const port = await freePort();
    const env: NodeJS.ProcessEnv = {
      PATH: process.env.PATH,
      HOME: process.env.HOME,
      FLEET_HTTP_PORT: String(port),
      FLEET_PREFIX: 'demo',
      // a fast world: the demo waits for orphan detection and the dispatch fallback
      FLEET_SWEEP_EVERY_S: '1',
      FLEET_ORPHAN_AFTER_S: '3',
      FLEET_READY_WINDOW_S: '4',
      FLEET_PUBLIC_ENDPOINT_URL: 'https://public.example.com',
      LOG_LEVEL: 'warn',
    };
    const fleet = new FleetProcess(['start'], env);
    const { child: start, exited } = fleet;
    try {
      await waitFor(
        'fleet start to serve',
        async () => ((await fetch(`http://127.0.0.1:${port}/readyz`).catch(() => null))?.status === 200 ? true : undefined),
        90_000,
      );
      expect(fleet.log).to.contain(`Bull Board   http://127.0.0.1:${port}/admin/queues`);

      const demo = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
        execFile(process.execPath, [FLEET, 'demo'], { env, timeout: 120_000 }, (err, stdout, stderr) =>
          resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, stdout, stderr }),
        );
      });
      expect(demo.code, demo.stderr).to.equal(0);
      expect(JSON.parse(demo.stdout)).to.deep.equal({
        statesReached: ['pending', 'deploying', 'ready', 'failed', 'unknown'],
        fallbackSeen: true,
        ok: true,
      });
      expect(demo.stderr).to.contain('refused: unknown_state');
    } finally {
      if (start.exitCode === null) start.kill('SIGTERM');
    }
    expect(await exited, fleet.log).to.equal(0);
    expect(fs.existsSync(path.join(ROOT, '.fleet', 'run', 'endpoints.json'))).to.equal(false);
  });
});
