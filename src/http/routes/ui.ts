/**
 * The live page at UI_PATH (docs/contract.md, "HTTP"): a page, its script and its style, as written under
 * src/http/ui/ (no build step; read once when the server is built), needing `read` like the API. The gate asks a
 * browser for basic auth as well as a bearer token (the `Bearer or Basic` challenge of GET /api/watch): a browser
 * gives the token as the password, any user name, and then sends the same credentials to /api/summary and
 * /api/watch on this origin. Open, as the API, on loopback without a tokens file. Its CSP allows nothing but its own
 * files and connections to its own origin.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { FastifyPluginAsync } from 'fastify';
import { repoRoot } from '../../util';

export const UI_PATH = '/ui';

/** Stricter than /docs: no inline style or script, no framing, no form or base URL of its own. */
export const UI_CSP =
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/** The page's files, by the path each is served at, and their media types. */
const FILES = {
  [UI_PATH]: { file: 'index.html', type: 'text/html; charset=utf-8' },
  [`${UI_PATH}/page.js`]: { file: 'page.js', type: 'text/javascript; charset=utf-8' },
  [`${UI_PATH}/page.css`]: { file: 'page.css', type: 'text/css; charset=utf-8' },
} as const;

/** Where the files are: the package's src/http/ui/, read from `src/` and `dist/src/` alike (tsc copies no files). */
export const UI_DIR = path.join(repoRoot(), 'src', 'http', 'ui');

/** What every route of the page needs: `read`, from a browser too (a 401 asks for basic auth as well). */
const GUARD = { scope: 'read', challenge: 'Bearer or Basic' } as const;

export const uiRoutes: FastifyPluginAsync = async (app) => {
  for (const [url, { file, type }] of Object.entries(FILES)) {
    const body = fs.readFileSync(path.join(UI_DIR, file));
    app.get(url, { config: GUARD, schema: { hide: true } }, async (_request, reply) =>
      reply
        .type(type)
        .header('content-security-policy', UI_CSP)
        .header('x-content-type-options', 'nosniff')
        .header('x-frame-options', 'DENY')
        .header('referrer-policy', 'no-referrer')
        .header('cache-control', 'no-cache')
        .send(body),
    );
  }
  app.get(`${UI_PATH}/`, { config: GUARD, schema: { hide: true } }, async (_request, reply) => reply.redirect(UI_PATH, 308));
};
