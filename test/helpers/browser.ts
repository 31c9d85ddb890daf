/**
 * Debian's chromium, driven by playwright-core (no downloaded browser), for the browser tests: Bull Board and
 * Swagger UI.
 */
import * as fs from 'node:fs';
import { chromium, type Browser } from 'playwright-core';
import { CHROMIUM } from '../../dev/servers/binaries';

/** Fails in CI when chromium is missing (`npm test` installs it); elsewhere skips the suite. Call in a `before`. */
export function requireChromium(context: Mocha.Context): void {
  if (fs.existsSync(CHROMIUM)) return;
  if (process.env.CI === 'true') throw new Error(`${CHROMIUM} is missing: \`npm test\` installs Debian's chromium as root`);
  context.skip(); // FLEET_TEST_ALLOW_SKIPS=1 on a machine without chromium: `apt-get install chromium` to run this test
}

/** Headless chromium with nothing of its own going to the network (no updates, sync or background fetches). */
export function launchChromium(): Promise<Browser> {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}
