/**
 * The live page at UI_PATH (docs/contract.md, "HTTP"): a page, its script and its style, as written under
 * src/http/ui/ (no build step; read once when the server is built), needing `read` like the API. A browser gives
 * the token as Bull Board takes one: the basic-auth password, any user name; it then sends the same credentials to
 * /api/summary and /api/watch on this origin, which take them as the API does. Open, as the API, on loopback
 * without a tokens file. Its CSP allows nothing but its own files and connections to its own origin.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify';
import { repoRoot } from '../../util';
import type { Gate } from '../access';
import { hasScope } from '../auth';

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

/** Where the files are: beside this module's source, from `src/` and `dist/src/` alike. */
export const UI_DIR = path.join(repoRoot(), 'src', 'http', 'ui');

export interface UiOptions {
  /** the server's access (access.ts) */
  readonly gate: Gate;
}

export const uiRoutes: FastifyPluginAsync<UiOptions> = async (app, { gate }) => {
  // every route below passes this gate, not the API's: a browser is asked for basic auth, which it can answer
  app.addHook('onRequest', async (request: FastifyRequest, reply: FastifyReply) => {
    if (gate.creds.tokens === null) return undefined; // the API is open (loopback without a tokens file)
    if (!gate.admit(request, reply, 'read', 'Basic')) return reply;
    // the gate lets the board's own pair and `board` tokens onto the board's pages; this page shows the API's data
    const access = gate.accessOf(request);
    if (access !== undefined && hasScope(access, 'read')) return undefined;
    return reply.status(403).send({
      error: { code: 'forbidden', message: 'this page needs an API token with the "read" scope (as the basic-auth password, any user name)' },
    });
  });

  for (const [url, { file, type }] of Object.entries(FILES)) {
    const body = fs.readFileSync(path.join(UI_DIR, file));
    app.get(url, { config: { scope: null }, schema: { hide: true } }, async (_request, reply) =>
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
  app.get(`${UI_PATH}/`, { config: { scope: null }, schema: { hide: true } }, async (_request, reply) => reply.redirect(UI_PATH, 308));
};
