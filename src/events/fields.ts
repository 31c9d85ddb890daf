/**
 * The fields lifecycle payloads are made of (docs/contract.md, "Queues and jobs"): ids, the actor, the endpoint, and
 * the text rule every string of a payload follows. The event catalog (catalog.ts) puts them together, one payload
 * schema per event.
 */
import { z } from 'zod';
import { ENDPOINT_URL_MAX_LENGTH, ENDPOINT_URL_PATTERN, endpointUrlProblem, normalizeEndpointUrl } from './endpoint-url';

export const EVENT_ID_PATTERN = /^[A-Za-z0-9._-]{1,200}$/;
export const DEPLOYMENT_NAME_PATTERN = /^[a-z0-9-]{1,63}$/;
/** Who caused a transition: a token name, `sweep`, or a producer's own `actor` (docs/contract.md). */
export const ACTOR_PATTERN = /^[A-Za-z0-9._:@-]{1,100}$/;
/** The actor recorded when a producer gives none. */
export const DEFAULT_ACTOR = 'producer';
/** The sweep's actor (orphans, deadlines). */
export const SWEEP_ACTOR = 'sweep';
/** The actor of HTTP intake while the API is open (loopback, no tokens file). */
export const ANONYMOUS_ACTOR = 'anonymous';
/** Actors the fleet records itself: no API token may be named after one. */
export const RESERVED_ACTORS: readonly string[] = [DEFAULT_ACTOR, SWEEP_ACTOR, ANONYMOUS_ACTOR];
export { UUID_PATTERN } from '../util/ids';

// `.meta()` carries what the JSON Schemas in docs/schemas/ say beyond the checks (`npm run schemas` writes them).
export const eventId = z
  .string()
  .regex(EVENT_ID_PATTERN, { error: 'must be 1-200 characters of A-Za-z0-9._-' })
  .meta({ description: 'the BullMQ jobId and the deduplication key; default: derived (attempt events) or random' });
/**
 * An id's one spelling: ids are normalised to lower case, so that a derived eventId, the database and whatever keys
 * on an id before the schemas run (the coalescer) never see two spellings of one id.
 */
export function canonicalId(id: string): string {
  return id.toLowerCase();
}
export const uuid = z.uuid({ error: 'must be a UUID' }).transform(canonicalId);
export const reason = z.string().max(500, { error: 'must be at most 500 characters' });
export const actor = z
  .string()
  .regex(ACTOR_PATTERN, { error: 'must be 1-100 characters of A-Za-z0-9._:@-' })
  .meta({ description: `recorded on the transition (default "${DEFAULT_ACTOR}")` });
export const endpoint = z.strictObject({
  url: z
    .string({ error: 'must be an http or https URL' })
    .check((ctx) => {
      const problem = endpointUrlProblem(ctx.value);
      if (problem !== null) ctx.issues.push({ code: 'custom', message: problem, input: ctx.value });
    })
    .meta({
      // the checks' own grammar (endpoint-url.ts); the JSON Schema of a check is empty otherwise
      pattern: ENDPOINT_URL_PATTERN,
      maxLength: ENDPOINT_URL_MAX_LENGTH,
      description:
        'http or https, a host (a name, an IPv4 address or a bracketed IPv6 address), an optional port and path; no credentials, query or fragment; ' +
        'printable ASCII without a backslash. Stored as WHATWG URL normalises it. Its host must be one FLEET_ENDPOINT_ALLOW allows',
    })
    .transform(normalizeEndpointUrl),
  kind: z.enum(['node_port', 'cluster_dns'], { error: 'must be "node_port" or "cluster_dns"' }),
});

/**
 * Text PostgreSQL can store, as a JSON Schema pattern: no NUL (PostgreSQL refuses it in text and in jsonb:
 * `invalid byte sequence for encoding "UTF8": 0x00`) and no lone UTF-16 surrogate (not UTF-8 at all: the driver
 * would store U+FFFD instead, and jsonb refuses it). A pair of surrogates, one character outside the Basic
 * Multilingual Plane, is one code point to this pattern (JSON Schema's `u`-mode regular expressions, Python's `re`).
 */
export const STORABLE_TEXT_PATTERN = '^[^\\u0000\\uD800-\\uDFFF]*$';
const STORABLE_TEXT = new RegExp(STORABLE_TEXT_PATTERN, 'u');
const UNSTORABLE_TEXT = 'must not contain NUL (\\u0000) or an unpaired UTF-16 surrogate: PostgreSQL cannot store them';

/**
 * The text rule, once for every string of a payload, nested ones included (so a field added later has it too).
 * It runs even when other fields failed (`when`), so that every offending field is named at once, and leaves out
 * what already failed its own checks (a hostile value may nest thousands deep: it is never walked).
 */
function storableText(value: unknown, ctx: z.RefinementCtx): void {
  // a payload that is no object at all failed already; an issue of the whole payload (unknown fields) prunes nothing
  if (typeof value !== 'object' || value === null) return;
  const failed = ctx.issues.map((issue) => issue.path ?? []).filter((path) => path.length > 0);
  const alreadyFailed = (path: ReadonlyArray<PropertyKey>) => failed.some((f) => f.length <= path.length && f.every((key, i) => key === path[i]));
  const pending: Array<{ readonly v: unknown; readonly path: ReadonlyArray<string | number> }> = Object.entries(value as Record<string, unknown>).map(
    ([key, v]) => ({ v, path: [key] }),
  );
  // breadth first, in the payload's order (so the issues come in it); the list grows as objects are opened
  for (let i = 0; i < pending.length; i++) {
    const { v, path } = pending[i] ?? { v: undefined, path: [] };
    if (alreadyFailed(path)) continue;
    if (typeof v === 'string') {
      if (!STORABLE_TEXT.test(v)) ctx.addIssue({ code: 'custom', message: UNSTORABLE_TEXT, path: [...path], input: v });
    } else if (Array.isArray(v)) {
      v.forEach((item: unknown, i) => pending.push({ v: item, path: [...path, i] }));
    } else if (typeof v === 'object' && v !== null) {
      for (const [key, item] of Object.entries(v as Record<string, unknown>)) pending.push({ v: item, path: [...path, key] });
    }
  }
}

/** One event's payload schema: its fields, nothing else, and text PostgreSQL can store. */
export function payloadSchema<Shape extends z.core.$ZodLooseShape>(shape: Shape) {
  return z.strictObject(shape).superRefine(storableText, { when: () => true });
}
