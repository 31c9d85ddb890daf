/**
 * The live page at /ui in a real browser (Debian's chromium driven by playwright-core), over real `fleet http` and
 * `fleet worker` processes, real Redis and PostgreSQL (issue 31, "Must show"): the page loads with a token given to
 * the browser's basic-auth prompt, shows a deployment going pending -> deploying -> ready as it happens (no reload),
 * survives its HTTP process being killed and started again on the same port (EventSource resumes with
 * Last-Event-ID: what happened meanwhile shows, once each), starts over when the stream was trimmed past it (resync),
 * opens the stream again when the browser gave up on it, and is usable with a keyboard and on a 375 px wide window.
 * Waits are for DOM conditions, never for time (where the page waits, the test moves the page's clock). Each test
 * reads the counts it starts from: it runs alone as well as after the others.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import { createServer } from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import type { Browser, BrowserContext, Page } from 'playwright-core';
import { UI_PATH } from '../../src/http/server';
import { DEPLOYMENT_STATES, type DeploymentState } from '../../src/machine';
import { createToken } from '../../src/http/tokens';
import { LifecycleProducer } from '../../src/queues/producer';
import { transitionStreamKey } from '../../src/streams/outbox-relay';
import { repoRoot } from '../../src/util';
import { launchChromium, requireChromium } from '../helpers/browser';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { freePort } from '../helpers/net';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

const FLEET = path.join(repoRoot(), 'bin', 'fleet.js');
/** a DOM condition may take the fleet a moment on a busy machine; it is a bound, not a wait */
const SHOWS = { timeout: 30_000 };

type Counts = Record<DeploymentState, number>;

interface FleetChild {
  readonly child: ChildProcess;
  readonly exited: Promise<number | null>;
  log(): string;
}

function startFleetChild(command: 'http' | 'worker', env: NodeJS.ProcessEnv): FleetChild {
  const child = spawn(process.execPath, [FLEET, command], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  child.stdout?.on('data', (c: Buffer) => (log += c.toString()));
  child.stderr?.on('data', (c: Buffer) => (log += c.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return { child, exited, log: () => log };
}

async function stop(process: FleetChild | null, signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
  if (process === null) return null;
  if (process.child.exitCode === null && process.child.signalCode === null) process.child.kill(signal);
  return process.exited;
}

describe('the live page (/ui) in a real browser, over fleet http and fleet worker processes', function () {
  this.timeout(180_000);
  let db: TestDatabase;
  let dir: string;
  let env: NodeJS.ProcessEnv;
  let base: string;
  let worker: FleetChild | null = null;
  let http: FleetChild | null = null;
  let producer: LifecycleProducer;
  let browser: Browser | null = null;
  let context: BrowserContext;
  const prefix = uniquePrefix();
  const reader = createToken('dashboard', ['read']);
  /** what the page asked for, and the errors it logged (a CSP violation, a script error) */
  const requested: string[] = [];
  const errors: string[] = [];

  async function startHttp(): Promise<void> {
    http = startFleetChild('http', env);
    const started = http;
    await waitFor(
      'fleet http to serve',
      async () => ((await fetch(`${base}/readyz`).catch(() => null))?.status === 200 ? true : undefined),
      60_000,
    ).catch((err: unknown) => {
      throw new Error(`${String(err)}\n${started.log().slice(-2000)}`);
    });
  }

  async function openPage(viewport = { width: 1024, height: 900 }, from: BrowserContext = context): Promise<Page> {
    const page = await from.newPage();
    await page.setViewportSize(viewport);
    page.on('request', (r) => requested.push(r.url()));
    // a resource that did not load is the network's business here (the server killed on purpose, no favicon)
    page.on('console', (m) => (m.type() === 'error' && !m.text().startsWith('Failed to load resource') ? errors.push(m.text()) : undefined));
    page.on('pageerror', (e) => errors.push(e.message));
    const res = await page.goto(`${base}${UI_PATH}`);
    expect(res?.status()).to.equal(200);
    await page.locator('#connection[data-state="live"]').waitFor(SHOWS);
    await page.locator('#summary-note', { hasText: 'Counted at' }).waitFor(SHOWS);
    return page;
  }

  /** The deployment's rows in the list, newest first, as `from>to@version`. */
  async function rowsOf(page: Page, deploymentId: string): Promise<string[]> {
    const rows = page.locator(`#transitions li[data-deployment-id="${deploymentId}"]`);
    const out: string[] = [];
    for (let i = 0; i < (await rows.count()); i++) {
      const row = rows.nth(i);
      out.push(`${await row.getAttribute('data-to')}@${await row.getAttribute('data-version')}`);
    }
    return out;
  }

  /**
   * The counts the page shows. Read once a transition's row is there, they are what that transition left: the page
   * counts a transition before it lists it, in the same handler.
   */
  async function countsOf(page: Page): Promise<Counts> {
    const counts = { pending: 0, deploying: 0, ready: 0, failed: 0, unknown: 0 };
    for (const state of DEPLOYMENT_STATES) counts[state] = Number(await page.locator(`#count-${state}`).textContent());
    return counts;
  }
  /** The counts a test started from, moved by what it did. */
  const plus = (start: Counts, moved: Partial<Counts>): Counts => {
    const counts = { ...start };
    for (const state of DEPLOYMENT_STATES) counts[state] += moved[state] ?? 0;
    return counts;
  };
  const row = (page: Page, deploymentId: string, to: string, version: number) =>
    page.locator(`#transitions li[data-deployment-id="${deploymentId}"][data-to="${to}"][data-version="${version}"]`).waitFor(SHOWS);

  /** A deployment's first entry on the stream (published by the relay): for what happens while the page cannot see. */
  async function onStream(deploymentId: string): Promise<void> {
    const redis = testRedis();
    try {
      const stream = transitionStreamKey(prefix);
      await waitFor(`${deploymentId}'s entry on the stream`, async () =>
        (await redis.xrevrange(stream, '+', '-', 'COUNT', 10)).some(([, fields]) => fields.includes(deploymentId)) ? true : undefined,
      );
    } finally {
      redis.disconnect();
    }
  }

  /** The state in PostgreSQL: for what happens while the page cannot see. */
  const stateIn = async (deploymentId: string, state: string) =>
    waitFor(`${deploymentId} ${state}`, async () => {
      const rows = await db.dataSource.query<Array<{ state: string }>>('SELECT state FROM deployments WHERE id = $1', [deploymentId]);
      return rows[0]?.state === state ? true : undefined;
    });

  before(async function () {
    requireChromium(this);
    db = await openTestDatabase(2);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ui-e2e-'));
    const tokensFile = path.join(dir, 'tokens.json');
    fs.writeFileSync(tokensFile, JSON.stringify([reader.entry]), { mode: 0o600 });
    const port = await freePort();
    base = `http://127.0.0.1:${port}`;
    env = {
      PATH: process.env.PATH,
      REDIS_URL: testEnv().redisUrl,
      DATABASE_URL: db.url,
      FLEET_PREFIX: prefix,
      FLEET_HTTP_HOST: '127.0.0.1',
      FLEET_HTTP_PORT: String(port),
      FLEET_API_TOKENS_FILE: tokensFile,
      FLEET_CONCURRENCY: '4',
      LOG_LEVEL: 'info',
    };
    worker = startFleetChild('worker', { ...env, FLEET_API_TOKENS_FILE: '' });
    const started = worker;
    await waitFor('fleet worker to start', () => (started.log().includes('worker started') ? true : undefined), 60_000);
    await startHttp();
    producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    browser = await launchChromium();
    // the token is what a person types into the browser's basic-auth prompt (any user name)
    context = await browser.newContext({ httpCredentials: { username: 'me', password: reader.token } });
  });

  beforeEach(() => {
    requested.length = 0;
    errors.length = 0;
  });

  after(async () => {
    await browser?.close();
    await producer?.close();
    await stop(http);
    await stop(worker);
    await db?.close();
    await dropPrefix(prefix);
    if (dir !== undefined) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('asks a browser without the token for basic auth', async () => {
    if (browser === null) throw new Error('no browser');
    const anonymous = await browser.newContext();
    try {
      const res = await anonymous.request.get(`${base}${UI_PATH}`);
      expect(res.status()).to.equal(401);
      expect(
        res
          .headersArray()
          .filter((h) => h.name.toLowerCase() === 'www-authenticate')
          .map((h) => h.value),
      ).to.include('Basic realm="lifecycle-fleet", charset="UTF-8"');
    } finally {
      await anonymous.close();
    }
  });

  it('shows a deployment going pending -> deploying -> ready as it happens, and survives fleet http restarting: nothing missed', async () => {
    const page = await openPage();
    let loads = 0;
    page.on('load', () => loads++);
    const start = await countsOf(page);

    const a = { deploymentId: randomUUID(), attemptId: randomUUID() };
    await producer.createDeployment({ deploymentId: a.deploymentId, name: 'web-a' });
    await row(page, a.deploymentId, 'pending', 1);
    expect(await countsOf(page)).to.deep.equal(plus(start, { pending: 1 }));
    await producer.createAttempt(a);
    await row(page, a.deploymentId, 'pending', 2);
    expect(await countsOf(page)).to.deep.equal(plus(start, { pending: 1 }));
    await producer.startAttempt(a);
    await row(page, a.deploymentId, 'deploying', 3);
    expect(await countsOf(page)).to.deep.equal(plus(start, { deploying: 1 }));
    await producer.endAttempt({ ...a, outcome: 'succeeded' });
    await row(page, a.deploymentId, 'ready', 4);
    expect(await countsOf(page)).to.deep.equal(plus(start, { ready: 1 }));
    expect(await rowsOf(page, a.deploymentId)).to.deep.equal(['ready@4', 'deploying@3', 'pending@2', 'pending@1']);

    // the HTTP process dies; a deployment goes its whole way meanwhile, seen by nobody but PostgreSQL and the stream
    await stop(http, 'SIGKILL');
    await page.locator('#connection[data-state="reconnecting"]').waitFor(SHOWS);
    const b = { deploymentId: randomUUID(), attemptId: randomUUID() };
    await producer.createDeployment({ deploymentId: b.deploymentId, name: 'web-b' });
    await stateIn(b.deploymentId, 'pending');
    await producer.createAttempt(b);
    await producer.startAttempt(b);
    await stateIn(b.deploymentId, 'deploying');
    await producer.endAttempt({ ...b, outcome: 'failed' });
    await stateIn(b.deploymentId, 'failed');
    expect(await rowsOf(page, b.deploymentId)).to.deep.equal([]);

    await startHttp();
    await page.locator('#connection[data-state="live"]').waitFor(SHOWS);
    await row(page, b.deploymentId, 'failed', 4);
    expect(await rowsOf(page, b.deploymentId), 'each once, in order').to.deep.equal(['failed@4', 'deploying@3', 'pending@2', 'pending@1']);
    expect(await countsOf(page)).to.deep.equal(plus(start, { ready: 1, failed: 1 }));
    await page.locator(`#attention li[data-deployment-id="${b.deploymentId}"][data-state="failed"]`).waitFor(SHOWS);

    // and after the restart, as it happens again
    const c = randomUUID();
    await producer.createDeployment({ deploymentId: c, name: 'web-c' });
    await row(page, c, 'pending', 1);
    expect(await countsOf(page)).to.deep.equal(plus(start, { pending: 1, ready: 1, failed: 1 }));
    expect(await rowsOf(page, a.deploymentId), 'nothing repeated').to.have.length(4);
    expect(loads, 'the page was never reloaded').to.equal(0);
    expect(errors).to.deep.equal([]);
    expect(requested.filter((url) => !url.startsWith(`${base}/`))).to.deep.equal([]);
    await page.close();
  });

  it('starts over when the stream was trimmed past it: reads the counts again and says transitions may be missing', async () => {
    const page = await openPage();
    const start = await countsOf(page);
    const d = randomUUID();
    await producer.createDeployment({ deploymentId: d, name: 'web-d' });
    await row(page, d, 'pending', 1);
    expect(await countsOf(page)).to.deep.equal(plus(start, { pending: 1 }));

    await stop(http, 'SIGKILL');
    const e = randomUUID();
    await producer.createDeployment({ deploymentId: e, name: 'web-e' });
    await stateIn(e, 'pending');
    // the relay published web-e's creation; then the stream loses everything up to it
    await onStream(e);
    const redis = testRedis();
    try {
      await redis.xtrim(transitionStreamKey(prefix), 'MAXLEN', 0);
    } finally {
      redis.disconnect();
    }
    await startHttp();
    await page.locator('#transitions li.gap').waitFor(SHOWS);
    await page.locator('#connection[data-state="live"]').waitFor(SHOWS);
    // web-e reached the page as no transition of its own: the counts read again hold it
    await page.locator('#count-pending', { hasText: new RegExp(`^${start.pending + 2}$`) }).waitFor(SHOWS);
    const f = randomUUID();
    await producer.createDeployment({ deploymentId: f, name: 'web-f' });
    await row(page, f, 'pending', 1);
    // what the relay sent again after the trim (the stream lost entries it had published) came before web-f, and
    // moved no count: the counts already held it
    expect(await countsOf(page)).to.deep.equal(plus(start, { pending: 3 }));
    expect(errors).to.deep.equal([]);
    await page.close();
  });

  it('opens the stream again after the browser gave up on it (an answer that was not the stream), and reads the counts again', async () => {
    if (browser === null) throw new Error('no browser');
    // a context of its own, whose clock the test moves: the page waits REOPEN_MS (5 s) before it opens the stream again
    const own = await browser.newContext({ httpCredentials: { username: 'me', password: reader.token } });
    try {
      await own.clock.install();
      const page = await openPage(undefined, own);
      // from here the page's timers fire only when the test says: its reading of the counts every 30 s cannot put
      // right what the reopening did not
      await page.clock.pauseAt(Date.now() + 1000);
      const start = await countsOf(page);
      const summaryReads = () => requested.filter((url) => url === `${base}/api/summary`).length;
      const watches = () => requested.filter((url) => url.startsWith(`${base}/api/watch`));

      /**
       * The HTTP process dies and a stand-in answers 503 on its port, as a proxy does while the fleet restarts: the
       * browser gives up on the stream (EventSource closed). Meanwhile `deploymentId` is created and published. Then
       * the fleet is back and the page's wait for reopening passes.
       */
      const outage = async (deploymentId: string): Promise<{ summaryReads: number; watches: number }> => {
        await stop(http, 'SIGKILL');
        const standIn = createServer((_req, res) => {
          res.writeHead(503, { 'content-type': 'application/json', 'retry-after': '1' });
          res.end(JSON.stringify({ error: { code: 'unavailable', message: 'the fleet is restarting' } }));
        });
        await new Promise<void>((resolve) => standIn.listen(Number(new URL(base).port), '127.0.0.1', resolve));
        try {
          await page.locator('#connection[data-state="offline"]').waitFor(SHOWS);
          await producer.createDeployment({ deploymentId, name: `web-${deploymentId.slice(0, 4)}` });
          await onStream(deploymentId);
        } finally {
          standIn.closeAllConnections();
          await new Promise((resolve) => standIn.close(resolve));
        }
        await startHttp();
        const before = { summaryReads: summaryReads(), watches: watches().length };
        await page.clock.runFor(5000);
        await page.locator('#connection[data-state="live"]').waitFor(SHOWS);
        return before;
      };

      // no transition yet, so no cursor: the page starts over from now, says that transitions may be missing, and
      // reads the counts again, which hold what it did not see
      const x = randomUUID();
      const first = await outage(x);
      expect(watches().slice(first.watches), 'the stream opened again, from now').to.deep.equal([`${base}/api/watch`]);
      await page.locator('#count-pending', { hasText: new RegExp(`^${start.pending + 1}$`) }).waitFor(SHOWS);
      expect(summaryReads()).to.equal(first.summaryReads + 1);
      await page.locator('#transitions li.gap').waitFor(SHOWS);
      expect(await rowsOf(page, x)).to.deep.equal([]);
      const y = randomUUID();
      await producer.createDeployment({ deploymentId: y, name: 'web-y' });
      await row(page, y, 'pending', 1);
      expect(await countsOf(page)).to.deep.equal(plus(start, { pending: 2 }));

      // with a cursor (y's): the page follows on from it, so what happened meanwhile shows, once, with no gap
      const z = randomUUID();
      const second = await outage(z);
      expect(watches().slice(second.watches), 'the stream opened again, after the last cursor').to.have.length(1);
      expect(watches()[second.watches]).to.match(/\/api\/watch\?after=[A-Za-z0-9_-]+$/);
      await row(page, z, 'pending', 1);
      expect(await rowsOf(page, z)).to.deep.equal(['pending@1']);
      expect(await page.locator('#transitions li.gap').count(), 'no second gap').to.equal(1);
      await waitFor('the counts read again', () => (summaryReads() === second.summaryReads + 1 ? true : undefined));
      await page.locator('#summary-note', { hasText: 'Counted at' }).waitFor(SHOWS);
      expect(await countsOf(page)).to.deep.equal(plus(start, { pending: 3 }));
      expect(
        errors.filter((e) => !e.startsWith("EventSource's response")),
        'errors but the stand-in refusing the stream',
      ).to.deep.equal([]);
      await page.close();
    } finally {
      await own.close();
    }
  });

  it('is usable with a keyboard: a skip link to the transitions, focus visible, the tab order reaching the list', async () => {
    const page = await openPage();
    const g = randomUUID();
    await producer.createDeployment({ deploymentId: g, name: 'web-g' });
    await row(page, g, 'pending', 1);

    await page.keyboard.press('Tab');
    expect(await page.locator('a.skip:focus').count(), 'the skip link comes first').to.equal(1);
    expect(await page.evaluate('getComputedStyle(document.activeElement).outlineStyle'), 'focus is visible').to.not.equal('none');
    await page.keyboard.press('Enter');
    expect(await page.locator('#transitions-heading:focus').count()).to.equal(1);
    await page.keyboard.press('Tab');
    expect(await page.locator('#transitions li a:focus').count(), 'then the newest transition').to.equal(1);

    // without the skip link, the tab order still gets there: past the links of the attention list
    await page.reload();
    await page.locator('#connection[data-state="live"]').waitFor(SHOWS);
    const h = randomUUID();
    await producer.createDeployment({ deploymentId: h, name: 'web-h' });
    await row(page, h, 'pending', 1);
    let presses = 0;
    while ((await page.locator('#transitions li a:focus').count()) === 0) {
      expect(++presses, 'Tab presses to reach the transitions').to.be.below(30);
      await page.keyboard.press('Tab');
    }
    await page.close();
  });

  it('fits a 375 px wide window: no horizontal scroll, whole ids and all', async () => {
    const page = await openPage({ width: 375, height: 740 });
    const k = randomUUID();
    await producer.createDeployment({ deploymentId: k, name: 'web-k' });
    await row(page, k, 'pending', 1);
    await page.locator('#attention li').first().waitFor(SHOWS);
    expect(await page.evaluate('document.querySelector(\'meta[name="viewport"]\').content')).to.equal('width=device-width, initial-scale=1');
    const overflow = await page.evaluate('document.documentElement.scrollWidth - document.documentElement.clientWidth');
    expect(overflow, 'pixels of horizontal scroll').to.equal(0);
    await page.close();
  });
});
