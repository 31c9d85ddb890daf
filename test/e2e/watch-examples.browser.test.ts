/**
 * The browser examples of examples/watch in Debian's chromium (playwright-core), against a real fleet (issue 31):
 * the pages served from one origin with the fleet's API behind it, as a reverse proxy would serve them.
 * `eventsource.html` authenticates with the Basic credentials the browser holds for the origin (the token as the
 * password); `fetch-bearer.html` sends the token as a bearer header.
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import type { Browser, Page } from 'playwright-core';
import { startFleet, type Fleet } from '../../src/app';
import { loadConfig } from '../../src/config';
import { createToken } from '../../src/http/tokens';
import { silentLogger } from '../../src/log';
import { repoRoot } from '../../src/util';
import { launchChromium, requireChromium } from '../helpers/browser';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

const EXAMPLES = path.join(repoRoot(), 'examples', 'watch');

describe('the browser examples of examples/watch, in a real browser', function () {
  this.timeout(90_000);
  let db: TestDatabase;
  let fleet: Fleet;
  let browser: Browser | null = null;
  let origin: http.Server;
  let originUrl: string;
  let token: string;
  let tokensDir: string;
  const prefix = uniquePrefix();

  before(async function () {
    requireChromium(this);
    db = await openTestDatabase(8);
    tokensDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-watch-examples-'));
    const created = createToken('page', ['read']);
    token = created.token;
    fs.writeFileSync(path.join(tokensDir, 'tokens.json'), JSON.stringify([created.entry]));
    const config = loadConfig({
      FLEET_PREFIX: prefix,
      FLEET_HTTP_PORT: '0',
      FLEET_API_TOKENS_FILE: path.join(tokensDir, 'tokens.json'),
      FLEET_CONCURRENCY: '4',
    });
    fleet = await startFleet(config, { redisUrl: testEnv().redisUrl, databaseUrl: db.url }, silentLogger, {
      worker: true,
      relay: true,
      sweep: false,
      http: true,
    });
    const fleetUrl = fleet.httpUrl;
    if (fleetUrl === null) throw new Error('the fleet serves no HTTP');
    origin = http.createServer((req, res) => serve(fleetUrl, req, res));
    await new Promise<void>((resolve) => origin.listen(0, '127.0.0.1', resolve));
    originUrl = `http://127.0.0.1:${(origin.address() as AddressInfo).port}`;
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    origin?.closeAllConnections();
    await new Promise<void>((resolve) => (origin ? origin.close(() => resolve()) : resolve()));
    await fleet?.close(5000);
    await db?.close();
    await dropPrefix(prefix);
    fs.rmSync(tokensDir, { recursive: true, force: true });
  });

  /** Creates deployments until the page lists one, then one more, which it must list too (it is live by then). */
  async function showsTransitions(page: Page): Promise<void> {
    const items = page.locator('#transitions li');
    await waitFor(
      'the page to list a transition',
      async () => {
        if ((await items.count()) > 0) return true;
        await fleet.producer.createDeployment({ deploymentId: randomUUID(), name: 'example' });
        return undefined;
      },
      30_000,
    );
    const deploymentId = randomUUID();
    await fleet.producer.createDeployment({ deploymentId, name: 'example' });
    await waitFor(
      'the new deployment on the page',
      async () => ((await items.first().textContent())?.includes(deploymentId) ? true : undefined),
      30_000,
    );
    expect(await items.first().textContent()).to.match(new RegExp(`  ${deploymentId}  v1  \\(new\\) -> pending  created$`));
  }

  it('eventsource.html, served from the fleet API origin, follows transitions with the Basic credentials of the origin', async () => {
    if (browser === null) throw new Error('no browser');
    const context = await browser.newContext({ httpCredentials: { username: 'ops', password: token } });
    try {
      const page = await context.newPage();
      await page.goto(`${originUrl}/eventsource.html`);
      await waitFor('the EventSource to open', async () => ((await page.locator('#status').textContent()) === 'live' ? true : undefined));
      await showsTransitions(page);
    } finally {
      await context.close();
    }
  });

  it('fetch-bearer.html follows transitions with the token as a bearer header', async () => {
    if (browser === null) throw new Error('no browser');
    const context = await browser.newContext();
    try {
      const page = await context.newPage();
      await page.goto(`${originUrl}/fetch-bearer.html`);
      await page.fill('input[name=url]', originUrl);
      await page.fill('input[name=token]', token);
      await page.click('button');
      await waitFor('the watch to open', async () => ((await page.locator('#status').textContent()) === 'live' ? true : undefined));
      await showsTransitions(page);
      // a wrong token: the page says the fleet refused it
      await page.fill('input[name=token]', 'lft_wrong');
      await page.click('button');
      await waitFor('the refusal', async () => ((await page.locator('#status').textContent())?.startsWith('refused (401)') ? true : undefined));
    } finally {
      await context.close();
    }
  });
});

/** The origin: the two pages, and /api/ passed on to the fleet as a reverse proxy would, streaming both ways. */
function serve(fleetUrl: string, req: http.IncomingMessage, res: http.ServerResponse): void {
  const url = req.url ?? '/';
  if (url.startsWith('/api/')) {
    const upstream = http.request(new URL(url, fleetUrl), { method: req.method, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      answer.pipe(res);
    });
    upstream.on('error', () => res.destroy());
    res.on('close', () => upstream.destroy());
    req.pipe(upstream);
    return;
  }
  const page = /^\/(eventsource|fetch-bearer)\.html(\?|$)/.exec(url)?.[1];
  if (page === undefined) {
    res.writeHead(404).end();
    return;
  }
  // the EventSource page behind the fleet's own Basic challenge (as /ui is): the browser then holds the credentials
  // and sends them with the page's requests under the same origin, /api/watch's included (the fleet checks them there)
  if (page === 'eventsource' && req.headers.authorization === undefined) {
    res.writeHead(401, { 'www-authenticate': 'Basic realm="lifecycle-fleet", charset="UTF-8"' }).end();
    return;
  }
  res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(fs.readFileSync(path.join(EXAMPLES, `${page}.html`)));
}
