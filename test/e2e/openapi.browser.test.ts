/**
 * Swagger UI at /docs in a real browser (Debian's chromium driven by playwright-core; no downloaded browser), with
 * no screenshot: behind a tokens file it refuses an anonymous browser, renders every operation of /openapi.json
 * (method and path) for a `read` token, loads nothing from anywhere but the fleet, and calls the API with the
 * bearer token given to its Authorize dialog.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import type { Browser, BrowserContext } from 'playwright-core';
import { startFleet, type Fleet } from '../../src/app';
import { loadConfig } from '../../src/config';
import { DOCS_PATH, OPENAPI_PATH } from '../../src/http/server';
import { createToken } from '../../src/http/tokens';
import { silentLogger } from '../../src/log';
import { launchChromium, requireChromium } from '../helpers/browser';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, uniquePrefix } from '../helpers/redis';

describe('Swagger UI (/docs) in a real browser', function () {
  this.timeout(90_000);
  let db: TestDatabase;
  let fleet: Fleet;
  let browser: Browser | null = null;
  let dir: string;
  const prefix = uniquePrefix();
  const reader = createToken('reader', ['read']);

  before(async function () {
    requireChromium(this);
    db = await openTestDatabase(4);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'docs-browser-'));
    const tokensFile = path.join(dir, 'tokens.json');
    fs.writeFileSync(tokensFile, JSON.stringify([reader.entry]), { mode: 0o600 });
    const config = loadConfig({ FLEET_PREFIX: prefix, FLEET_HTTP_PORT: '0', FLEET_API_TOKENS_FILE: tokensFile });
    fleet = await startFleet(config, { redisUrl: testEnv().redisUrl, databaseUrl: db.url }, silentLogger, { http: true });
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    await fleet?.close(5000);
    await db?.close();
    await dropPrefix(prefix);
    if (dir !== undefined) fs.rmSync(dir, { recursive: true, force: true });
  });

  /**
   * A context that sends the token to the UI's own routes only (its page, assets and document), as a browser that
   * was let in would; the API's routes get it only from the UI. Whatever is not the fleet is refused and recorded.
   */
  async function uiContext(base: string, outside: string[]): Promise<BrowserContext> {
    if (browser === null) throw new Error('no browser');
    const context = await browser.newContext();
    await context.route('**/*', async (route) => {
      const url = new URL(route.request().url());
      if (url.origin !== base) {
        outside.push(url.href);
        return route.abort();
      }
      const ui = url.pathname === DOCS_PATH || url.pathname.startsWith(`${DOCS_PATH}/`);
      return route.continue(ui ? { headers: { ...route.request().headers(), authorization: `Bearer ${reader.token}` } } : {});
    });
    return context;
  }

  it('refuses an anonymous browser', async () => {
    if (browser === null) throw new Error('no browser');
    const anonymous = await browser.newContext();
    try {
      const res = await anonymous.request.get(`${fleet.httpUrl ?? ''}${DOCS_PATH}`);
      expect(res.status()).to.equal(401);
    } finally {
      await anonymous.close();
    }
  });

  it('renders every operation of the document, loads nothing from elsewhere, and calls the API with the bearer token', async () => {
    const base = fleet.httpUrl ?? '';
    const outside: string[] = [];
    const context = await uiContext(base, outside);
    try {
      const document = (await (
        await context.request.get(`${base}${OPENAPI_PATH}`, { headers: { authorization: `Bearer ${reader.token}` } })
      ).json()) as {
        paths: Record<string, Record<string, unknown>>;
      };
      const operations = Object.entries(document.paths)
        .flatMap(([p, item]) => Object.keys(item).map((method) => `${method.toUpperCase()} ${p}`))
        .sort();
      expect(operations).to.include.members(['GET /api/deployments/{id}', 'POST /api/events', 'GET /readyz']);

      const page = await context.newPage();
      const problems: string[] = [];
      page.on('console', (message) => {
        if (message.type() === 'error') problems.push(message.text());
      });
      page.on('pageerror', (err) => problems.push(err.message));
      const res = await page.goto(`${base}${DOCS_PATH}`);
      expect(res?.status()).to.equal(200);

      // every operation is listed, method and path, as the UI rendered it
      const summaries = page.locator('.opblock-summary');
      await summaries.nth(operations.length - 1).waitFor({ timeout: 20_000 });
      const rendered = await Promise.all(
        (await summaries.all()).map(
          async (summary) =>
            `${(await summary.locator('.opblock-summary-method').textContent()) ?? '?'} ${(await summary.locator('.opblock-summary-path').getAttribute('data-path')) ?? '?'}`,
        ),
      );
      expect(rendered.sort()).to.deep.equal(operations);

      // the UI calls the API with the token given to its Authorize dialog (the bearer scheme of the document)
      await page.locator('.auth-wrapper button.authorize').click();
      await page.locator('.modal-ux input').first().fill(reader.token);
      await page.locator('.modal-ux .auth-btn-wrapper button.authorize').click();
      await page.locator('.modal-ux button.btn-done').click();
      const list = page.locator('.opblock-get', { has: page.locator('.opblock-summary-path[data-path="/api/deployments"]') });
      await list.locator('.opblock-summary').click();
      await list.locator('button.try-out__btn').click();
      await list.locator('button.execute').click();
      const status = list.locator('.live-responses-table tbody .response-col_status').first();
      await status.waitFor({ timeout: 20_000 });
      expect((await status.textContent())?.trim()).to.equal('200');

      expect(outside, 'requests to anywhere but the fleet').to.deep.equal([]);
      expect(problems, 'errors in the page (a refused asset, a CSP violation)').to.deep.equal([]);
    } finally {
      await context.close();
    }
  });
});
