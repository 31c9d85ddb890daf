/** Bull Board behind the fleet's auth: who may look, who may act, and no framing by other sites. */
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { FastifyAdapter } from '@bull-board/fastify';
import type { Queue } from 'bullmq';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Access, Credentials } from './auth';
import type { Scope } from './tokens';

export const BOARD_PATH = '/admin/queues';

/** The job states BullMQ's clean accepts. */
const CLEANABLE: ReadonlySet<string> = new Set(['completed', 'failed', 'delayed', 'wait', 'waiting', 'active', 'paused', 'prioritized']);

export interface BoardDeps {
  /** queues shown */
  readonly queues: readonly Queue[];
  readonly creds: Credentials;
  /** the server's admission: authenticates the request for `scope`, or answers it (401/403/429) and returns false */
  readonly admit: (request: FastifyRequest, reply: FastifyReply, scope: Scope, challenge: 'Bearer' | 'Basic') => boolean;
  /** who each admitted request is */
  readonly accessOf: WeakMap<FastifyRequest, Access>;
}

/**
 * Bull Board at BOARD_PATH. Without any credentials configured (loopback only) the board is read-only for
 * everyone: nobody may retry, clean or remove jobs anonymously. Otherwise it asks for the basic-auth pair or a
 * token: `board` (or the pair) may do everything, `read` may look.
 */
export async function registerBoard(app: FastifyInstance, deps: BoardDeps): Promise<void> {
  const { creds, admit, accessOf } = deps;
  const open = creds.tokens === null && creds.boardUser === null;
  const serverAdapter = new FastifyAdapter();
  serverAdapter.setBasePath(BOARD_PATH);
  createBullBoard({
    queues: deps.queues.map((q) => new BullMQAdapter(q, { readOnlyMode: open })),
    serverAdapter,
    options: { uiConfig: { boardTitle: 'lifecycle-fleet' } },
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
      if (!admit(request, reply, reading(request.method) ? 'read' : 'board', 'Basic')) return reply;
      // Bull Board answers a clean of a state that does not exist with 200 {}: refuse it, naming the states
      const clean = /\/api\/queues\/[^/]+\/clean\/([^/?]+)/.exec(request.url)?.[1];
      if (clean !== undefined && !CLEANABLE.has(decodeURIComponent(clean))) {
        return reply.status(400).send({
          error: { code: 'invalid_status', message: `queueStatus: must be one of ${[...CLEANABLE].join(', ')}, got "${clean.slice(0, 40)}"` },
        });
      }
      const access = accessOf.get(request);
      if (access?.kind === 'token' && !access.principal.scopes.has('board')) readOnly.add(request);
      return undefined;
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
