/**
 * JSON request bodies, one parser for every route (the API's and Bull Board's): Fastify's own (which refuses
 * `__proto__` and `constructor.prototype` keys as the server is configured to), after a look at how deep the text
 * nests. A value nested thousands deep parses, but overflows the stack of whatever walks it recursively later
 * (`JSON.stringify` when BullMQ stores a job: a 500), so it is refused before it is parsed.
 */
import type { FastifyInstance } from 'fastify';
import { HttpError } from './http-error';

/** How deep arrays and objects may nest in a body; the deepest body the API takes nests 3 deep. */
export const MAX_JSON_DEPTH = 64;

/** Whether JSON text nests arrays and objects deeper than `limit` (brackets inside strings do not count). */
export function nestsDeeperThan(text: string, limit: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c)
        i++; // a backslash: the next character is escaped
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) {
      inString = true;
    } else if (c === 0x7b || c === 0x5b) {
      if (++depth > limit) return true;
    } else if (c === 0x7d || c === 0x5d) {
      depth--;
    }
  }
  return false;
}

/** Replaces the server's JSON parser with the depth-checked one. Call before any route is added. */
export function parseJsonBodies(app: FastifyInstance): void {
  const { onProtoPoisoning = 'error', onConstructorPoisoning = 'error' } = app.initialConfig;
  const parse = app.getDefaultJsonParser(onProtoPoisoning, onConstructorPoisoning);
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (request, body, done) => {
    const text = typeof body === 'string' ? body : body.toString('utf8'); // a string: parseAs says so
    if (nestsDeeperThan(text, MAX_JSON_DEPTH)) {
      const rule = `nests deeper than ${MAX_JSON_DEPTH} levels`;
      done(new HttpError(400, 'invalid_body', `body: ${rule}`, [{ field: '(root)', rule }]), undefined);
      return;
    }
    void parse(request, text, done); // it answers through `done`
  });
}
