/**
 * The HTTP API's own schemas (docs/contract.md, "HTTP"): the error body, path and query parameters, the intake's body
 * and the bodies built in server.ts. The routes validate their parameters with these, and /openapi.json is generated
 * from them and from the bodies' schemas where those are built (the read model, dispatch, the producer): nothing is
 * typed twice. A schema with an `id` becomes a named component of the document, referenced wherever it is used.
 */
import { z } from 'zod';
import { EVENT_NAMES, payloadSchemaWithoutActor, UUID_PATTERN } from '../events/schemas';
import { DEPLOYMENT_STATES } from '../machine';
import { attemptViewSchema, transitionViewSchema } from '../services/read-model/views';
import { decodeCursor, isStreamId } from '../streams/stream-follower';
import { WATCH_CURSOR_EXPECTED } from '../streams/watch-hub';

/** Every error answer, whatever its status (`POST /api/events` adds the fields its failures need). */
export const apiErrorSchema = z
  .object({
    error: z.object({
      code: z.string().describe('stable, for programs: invalid_id, invalid_query, not_found, unauthorized, forbidden, ...'),
      message: z.string().describe('for people: names the field and the rule, or what to do'),
      issues: z
        .array(z.object({ field: z.string(), rule: z.string() }))
        .optional()
        .describe('400 at POST /api/events: every offending field and the rule it broke'),
      existing: z
        .object({ name: z.string(), state: z.string() })
        .optional()
        .describe('409 event_id_conflict: the event name and BullMQ state of the job that holds the eventId'),
      eventId: z.string().optional().describe('503 at POST /api/events: retry with this eventId (it is applied at most once)'),
      replicas: z.number().int().optional().describe('503 not_durable: the replicas asked for'),
      acknowledged: z.number().int().optional().describe('503 not_durable: the replicas that had the job in time'),
    }),
  })
  .meta({ id: 'ApiError', description: 'An error: `{error: {code, message}}`, every status included' });

/** `:id` of the deployment routes; a bad one is `400 invalid_id`. */
export const deploymentIdParamsSchema = z.object({
  id: z
    .string()
    .regex(UUID_PATTERN, { error: (issue) => `must be a UUID, got "${String(issue.input).slice(0, 60)}"` })
    .describe('the deployment id'),
});

/** A whole number in a query string: digits only, in range; absent or empty means `fallback`. */
function wholeNumber(min: number, max: number, fallback: number) {
  const rule = `must be a whole number from ${min} to ${max}`;
  return z
    .string({ error: rule })
    .regex(/^\d*$/, { error: rule })
    .refine((v) => v === '' || (Number(v) >= min && Number(v) <= max), { error: rule })
    .describe(`a whole number from ${min} to ${max}; default ${fallback}`)
    .optional()
    .transform((v) => (v === undefined || v === '' ? fallback : Number(v)));
}

/** Query of `GET /api/deployments`; a bad one is `400 invalid_query`, naming the first offending field. */
export const deploymentListQuerySchema = z.object({
  state: z
    .enum(['', ...DEPLOYMENT_STATES], { error: `must be one of ${DEPLOYMENT_STATES.join(', ')}` })
    .describe('only deployments in this state; empty or absent: every state')
    .optional()
    .transform((v) => (v === '' ? undefined : v)),
  limit: wholeNumber(1, 500, 50),
  cursor: z
    .union([z.literal(''), z.string().regex(UUID_PATTERN)], { error: 'must be a cursor from a previous page' })
    .describe("the previous page's `nextCursor`; empty or absent: the first page")
    .optional()
    .transform((v) => (v === '' ? undefined : v)),
});

/** Query of `GET /api/deployments/:id/transitions`. */
export const transitionQuerySchema = z.object({
  afterVersion: wholeNumber(0, 2_147_483_647, 0),
  limit: wholeNumber(1, 1000, 100),
});

/**
 * A list in a query string: the parameter repeated, comma-separated, or both (empty items left out, repeats
 * dropped); absent or empty: undefined. Each item must pass `valid` (else `rule, got "<item>"`), at most `max`.
 */
function queryList(rule: string, valid: (item: string) => boolean, max: number, description: string) {
  return z
    .union([z.string(), z.array(z.string())], { error: rule })
    .optional()
    .transform((value, ctx) => {
      const given = value === undefined ? [] : Array.isArray(value) ? value : [value];
      const items = [...new Set(given.flatMap((v) => v.split(',')).map((v) => v.trim()))].filter((v) => v !== '');
      const bad = items.find((item) => !valid(item));
      if (bad !== undefined) ctx.addIssue({ code: 'custom', message: `${rule}, got "${bad.slice(0, 60)}"` });
      else if (items.length > max) ctx.addIssue({ code: 'custom', message: `at most ${max} values, got ${items.length}` });
      return items.length === 0 ? undefined : items;
    })
    .describe(description);
}

/** As many deployments as one watch may name (`fleet watch --deployment` checks it before it asks). */
export const MAX_WATCH_DEPLOYMENTS = 100;

/** Query of `GET /api/watch`; a bad one is `400 invalid_query`, naming the field and the rule. */
export const watchQuerySchema = z.object({
  deploymentId: queryList(
    'must be a UUID',
    (v) => UUID_PATTERN.test(v),
    MAX_WATCH_DEPLOYMENTS,
    `only these deployments: repeated or comma-separated, at most ${MAX_WATCH_DEPLOYMENTS}`,
  ).transform((ids) => ids?.map((id) => id.toLowerCase())),
  state: queryList(
    `must be one of ${DEPLOYMENT_STATES.join(', ')}`,
    (v) => (DEPLOYMENT_STATES as readonly string[]).includes(v),
    DEPLOYMENT_STATES.length,
    'only transitions to these states (`to`): repeated or comma-separated',
  ),
  after: z
    .string()
    .refine(
      (v) => {
        if (isStreamId(v)) return true;
        try {
          decodeCursor(v);
          return true;
        } catch {
          return false;
        }
      },
      { error: (issue) => `must be ${WATCH_CURSOR_EXPECTED}, got "${String(issue.input).slice(0, 60)}"` },
    )
    .optional()
    .describe("resume after this cursor (an event's `id`); the `Last-Event-ID` header wins when both are given. Absent or `$`: from now"),
});

/**
 * The body of `POST /api/events`, as the document describes it: one `{name, data}` per event, `data` being the
 * event's payload schema without `actor` (set from the caller over HTTP). The intake validates the body itself,
 * after authentication and the rate limit, with the same payload schemas (`parsePayload`).
 */
export const eventBodySchema = z
  .union(
    EVENT_NAMES.map((name) =>
      z.strictObject({
        name: z.literal(name),
        data: payloadSchemaWithoutActor(name),
      }),
    ),
  )
  .meta({ id: 'EventBody', description: 'a lifecycle event: its name and its payload (docs/contract.md, "Queues and jobs")' });

/** `GET /api/deployments/:id/attempts`: every attempt, newest first. */
export const attemptListSchema = z.object({ items: z.array(attemptViewSchema) });

/** `GET /api/deployments/:id/transitions`: history after `afterVersion`, in version order. */
export const transitionPageSchema = z.object({
  items: z.array(transitionViewSchema),
  nextAfterVersion: z.number().int().nullable().describe('pass as `afterVersion` for the next page; null when this page was not full'),
});

/** `GET /metrics`. */
export const metricsTextSchema = z.string().describe('the Prometheus text exposition format');

/** `GET /healthz`: the process answers. */
export const healthSchema = z.object({ status: z.literal('ok') });

const checkResult = z.enum(['ok', 'failing']);

/** `GET /readyz`: 200 when every check is ok, else 503 with the same body. */
export const readinessSchema = z
  .object({
    status: z.enum(['ok', 'unavailable']),
    checks: z.object({ redis: checkResult, postgres: checkResult, migrations: checkResult }),
  })
  .meta({ id: 'Readiness' });
