/**
 * Bull Board behind the fleet's auth: who may look, who may act (BOARD_WRITES), what it may add (only what the intake
 * takes, through the intake), and no framing by other sites.
 */
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { FastifyAdapter } from '@bull-board/fastify';
import type { Queue } from 'bullmq';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { LIFECYCLE_QUEUE } from '../queues/names';
import type { Gate } from './access';
import { HttpError } from './http-error';

export const BOARD_PATH = '/admin/queues';

/** The job states BullMQ's clean accepts. */
const CLEANABLE: ReadonlySet<string> = new Set(['completed', 'failed', 'delayed', 'wait', 'waiting', 'active', 'paused', 'prioritized']);

export type BoardWrite = 'board' | 'event' | 'refused';

/**
 * What each of Bull Board's routes that changes something needs (docs/contract.md, "HTTP", Bull Board), by method
 * and route under BOARD_PATH. A write route not listed (a later Bull Board's) is refused.
 * - `board`: moves, reschedules or removes jobs that are there already; their data stays what was validated when
 *   they were enqueued (a retried job is the same event, and the worker validates it again).
 * - `event`: puts new job data in a queue. The lifecycle queue's goes through the intake (`acceptEvent`) with the
 *   caller's scopes: `board` to reach it, and the event's own scope; the actor is the caller, and it spends the
 *   caller's event budget (FLEET_EVENTS_RATE_LIMIT) with POST /api/events. Other queues refuse it.
 * - `refused`: replaces a job's data, which would skip the intake: send a new event instead.
 */
export const BOARD_WRITES = {
  'PUT /api/queues/pause': 'board',
  'PUT /api/queues/resume': 'board',
  'POST /api/queues/:queueName/add': 'event',
  'PUT /api/queues/:queueName/retry/:queueStatus': 'board',
  'PUT /api/queues/:queueName/promote': 'board',
  'PUT /api/queues/:queueName/clean/:queueStatus': 'board',
  'PUT /api/queues/:queueName/pause': 'board',
  'PUT /api/queues/:queueName/resume': 'board',
  'PUT /api/queues/:queueName/concurrency': 'board',
  'PUT /api/queues/:queueName/rate-limit': 'board',
  'PUT /api/queues/:queueName/rate-limit/release': 'board',
  'PUT /api/queues/:queueName/empty': 'board',
  'PUT /api/queues/:queueName/obliterate': 'board',
  'PUT /api/queues/:queueName/job-schedulers/:schedulerId/remove': 'board',
  // the schedule only: Bull Board keeps the name, data and options the fleet registered, whatever the body carries
  // (test/integration/board-writes.test.ts holds a later Bull Board to that)
  'PATCH /api/queues/:queueName/job-schedulers/:schedulerId': 'board',
  // a run now of the template the fleet registered
  'PUT /api/queues/:queueName/job-schedulers/:schedulerId/run': 'board',
  'PUT /api/queues/:queueName/:jobId/retry': 'board',
  'PUT /api/queues/:queueName/:jobId/clean': 'board',
  'PUT /api/queues/:queueName/:jobId/promote': 'board',
  'PATCH /api/queues/:queueName/:jobId/update-data': 'refused',
  'PATCH /api/queues/:queueName/:jobId/delay': 'board',
  'PATCH /api/queues/:queueName/:jobId/priority': 'board',
  'PUT /api/queues/:queueName/:jobId/remove-unprocessed-children': 'board',
} as const satisfies Record<string, BoardWrite>;

/** A write route's entry in BOARD_WRITES, if it has one. */
function writeOf(request: FastifyRequest): BoardWrite | undefined {
  const key = `${request.method} ${(request.routeOptions.url ?? '').slice(BOARD_PATH.length)}`;
  return key in BOARD_WRITES ? BOARD_WRITES[key as keyof typeof BOARD_WRITES] : undefined;
}

/** Why the board refuses a write route: BOARD_WRITES says so, or it is not listed; null when it is not refused. */
function refusalOf(request: FastifyRequest): string | null {
  const write = writeOf(request);
  const route = `${request.method} ${request.routeOptions.url ?? request.url}`;
  if (write === undefined) return `the board does not allow ${route} (docs/contract.md, "Bull Board")`;
  if (write === 'refused')
    return `the board does not replace job data (${route}): a job's data is the event as validated when it was enqueued; send a new event (POST /api/events)`;
  const queue = (request.params as { queueName?: string } | undefined)?.queueName;
  if (write === 'event' && queue !== LIFECYCLE_QUEUE) {
    return `the "${String(queue).slice(0, 60)}" queue takes no jobs from the board: only the "${LIFECYCLE_QUEUE}" queue does, as events that pass the intake (POST /api/events)`;
  }
  return null;
}

/**
 * The board's add body as the intake takes it, `{name, data}`: its `options` (which the board's modal sends) must be
 * absent or `{}`, since the fleet sets an event's job options (its job id is the eventId).
 */
function withoutJobOptions(body: unknown): unknown {
  if (typeof body !== 'object' || body === null || Array.isArray(body) || !('options' in body)) return body; // the intake says what is wrong
  const { options, ...event } = body as { options?: unknown };
  if (typeof options === 'object' && options !== null && !Array.isArray(options) && Object.keys(options).length === 0) return event;
  const rule = 'must be absent or {}: the fleet sets the job options of an event (its job id is the eventId)';
  throw new HttpError(400, 'invalid_body', `options: ${rule}`, [{ field: 'options', rule }]);
}

export interface BoardDeps {
  /** queues shown */
  readonly queues: readonly Queue[];
  /** the server's access: the credentials, and the admission of a request for a scope (access.ts) */
  readonly gate: Gate;
  /**
   * the intake as POST /api/events runs it (routes/events.ts: the token's event budget, then intake.ts): takes the
   * event `{name, data}` from the request's caller and answers
   */
  readonly acceptEvent: (request: FastifyRequest, body: unknown, reply: FastifyReply) => Promise<FastifyReply>;
}

/**
 * Bull Board at BOARD_PATH. Without any credentials configured (loopback only) the board is read-only for
 * everyone: nobody may retry, clean or remove jobs anonymously. Otherwise it asks for the basic-auth pair or a
 * token: `board` (or the pair) may act as BOARD_WRITES says, `read` may look. Errors in the board's routes are
 * answered by the server's error handler, like everywhere else.
 */
export async function registerBoard(app: FastifyInstance, deps: BoardDeps): Promise<void> {
  const { gate } = deps;
  const open = gate.creds.tokens === null && gate.creds.boardUser === null;
  const serverAdapter = new FastifyAdapter();
  serverAdapter.setBasePath(BOARD_PATH);
  createBullBoard({
    queues: deps.queues.map((q) => new BullMQAdapter(q, { readOnlyMode: open })),
    serverAdapter,
    options: { uiConfig: { boardTitle: 'lifecycle-fleet' } },
  });
  // Bull Board answers every error of its routes with a 500-or-status of its own; rethrown, they reach the server's
  // error handler (Fastify hands an error handler's error to the parent's), which answers in the API's codes
  serverAdapter.setErrorHandler((error) => {
    throw error;
  });
  const readOnly = new WeakSet<FastifyRequest>();
  const reading = (method: string) => method === 'GET' || method === 'HEAD';

  await app.register(async (board) => {
    // the board's routes are not the API: they stay out of /openapi.json (Bull Board marks them so itself today;
    // this keeps them out whatever a later version does)
    board.addHook('onRoute', (options) => {
      options.schema = { ...options.schema, hide: true };
    });
    board.addHook('onRequest', async (request: FastifyRequest, reply: FastifyReply) => {
      if (open) {
        if (reading(request.method)) return undefined;
        return reply
          .status(403)
          .send({ error: { code: 'forbidden', message: 'Bull Board is read-only without FLEET_BOARD_USER/FLEET_BOARD_PASSWORD or API tokens' } });
      }
      if (!gate.admit(request, reply, reading(request.method) ? 'read' : 'board', 'Basic')) return reply;
      // Bull Board answers a clean of a state that does not exist with 200 {}: refuse it, naming the states
      const clean = /\/api\/queues\/[^/]+\/clean\/([^/?]+)/.exec(request.url)?.[1];
      if (clean !== undefined && !CLEANABLE.has(decodeURIComponent(clean))) {
        return reply.status(400).send({
          error: { code: 'invalid_status', message: `queueStatus: must be one of ${[...CLEANABLE].join(', ')}, got "${clean.slice(0, 40)}"` },
        });
      }
      const refusal = reading(request.method) ? null : refusalOf(request);
      if (refusal !== null) return reply.status(403).send({ error: { code: 'forbidden', message: refusal } });
      const access = gate.accessOf(request);
      if (access?.kind === 'token' && !access.principal.scopes.has('board')) readOnly.add(request);
      return undefined;
    });
    // A job added to the lifecycle queue is an event: the intake takes and answers it, with the caller's scopes and
    // as its actor; Bull Board's own add never runs.
    board.addHook('preHandler', async (request: FastifyRequest, reply: FastifyReply) => {
      if (reading(request.method) || writeOf(request) !== 'event') return undefined;
      return deps.acceptEvent(request, withoutJobOptions(request.body), reply);
    });
    board.addHook('onSend', async (request, reply, payload) => {
      // the board may not be framed by another site (clickjacking its retry/clean/remove buttons)
      void reply.header('x-frame-options', 'DENY').header('content-security-policy', "frame-ancestors 'none'");
      // a `read` token sees the board as read-only: the UI hides the actions the server would refuse anyway
      if (readOnly.has(request) && typeof payload === 'string' && (request.url.split('?')[0] ?? '').endsWith('/api/queues')) {
        try {
          const body = JSON.parse(payload) as { queues?: Array<{ readOnlyMode?: boolean }> };
          for (const q of body.queues ?? []) q.readOnlyMode = true;
          return JSON.stringify(body);
        } catch {
          return payload;
        }
      }
      return payload;
    });
    await board.register(serverAdapter.registerPlugin(), { prefix: BOARD_PATH });
  });
}
