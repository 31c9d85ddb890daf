/**
 * Bull Board in a real browser (Debian's chromium driven by playwright-core; no downloaded browser): it loads
 * behind basic auth, lists both queues, and shows a completed lifecycle job. The screenshot is kept under
 * test-artifacts/.
 */
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'chai';
import type { Browser } from 'playwright-core';
import { startFleet, type Fleet } from '../../src/app';
import { loadConfig } from '../../src/config';
import { silentLogger } from '../../src/log';
import { launchChromium, requireChromium } from '../helpers/browser';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';
import { repoRoot } from '../../src/util';

const ARTIFACTS = path.join(repoRoot(), 'test-artifacts');

describe('Bull Board in a real browser', function () {
  this.timeout(90_000);
  let db: TestDatabase;
  let fleet: Fleet;
  let browser: Browser | null = null;
  const prefix = uniquePrefix();

  before(async function () {
    requireChromium(this);
    db = await openTestDatabase(8);
    const config = loadConfig({
      FLEET_PREFIX: prefix,
      FLEET_HTTP_PORT: '0',
      FLEET_BOARD_USER: 'ops',
      FLEET_BOARD_PASSWORD: 'board-secret',
      FLEET_CONCURRENCY: '4',
    });
    fleet = await startFleet(config, { redisUrl: testEnv().redisUrl, databaseUrl: db.url }, silentLogger, {
      worker: true,
      relay: true,
      sweep: true,
      http: true,
    });
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    await fleet?.close(5000);
    await db?.close();
    await dropPrefix(prefix);
  });

  it('loads behind basic auth, lists both queues, and shows a completed lifecycle job', async () => {
    if (browser === null) throw new Error('no browser');
    const deploymentId = randomUUID();
    const { jobId } = await fleet.producer.createDeployment({ deploymentId, name: 'board-demo' });
    await waitFor('the job to complete', async () => ((await fleet.producer.queue.getJobState(jobId)) === 'completed' ? true : undefined));
    const base = fleet.httpUrl ?? '';

    const anonymous = await browser.newContext();
    const denied = await anonymous.request.get(`${base}/admin/queues`);
    expect(denied.status()).to.equal(401);
    expect(denied.headers()['www-authenticate']).to.match(/^Basic /);
    await anonymous.close();

    const context = await browser.newContext({ httpCredentials: { username: 'ops', password: 'board-secret' } });
    const page = await context.newPage();
    const res = await page.goto(`${base}/admin/queues`);
    expect(res?.status()).to.equal(200);
    await page.getByText('lifecycle', { exact: true }).first().waitFor({ timeout: 20_000 });
    await page.getByText('maintenance', { exact: true }).first().waitFor({ timeout: 20_000 });

    await page.goto(`${base}/admin/queues/queue/lifecycle?status=completed`);
    await page.getByText(jobId).first().waitFor({ timeout: 20_000 });
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    const shot = path.join(ARTIFACTS, 'bull-board.png');
    await page.screenshot({ path: shot, fullPage: true });
    expect(fs.statSync(shot).size).to.be.greaterThan(10_000);

    const schedulers = await page.request.get(`${base}/admin/queues/api/job-schedulers`);
    expect(schedulers.status()).to.equal(200);
    expect(JSON.stringify(await schedulers.json())).to.contain('sweep');
    await context.close();
  });
});
