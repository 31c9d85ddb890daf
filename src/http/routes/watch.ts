/**
 * `GET /api/watch` (docs/contract.md, "HTTP", Watch): transitions as server-sent events, from the process's one
 * reader of the stream (src/streams/watch-hub.ts). Each watch is bounded: a client that does not read falls behind
 * its bound of unsent bytes and is closed with `event: overflow`. A comment line keeps idle streams open through
 * proxies; every watch ends when the server closes (clients reconnect with `Last-Event-ID` to another process).
 */
import type { ServerResponse } from 'node:http';
import type { FastifyPluginAsync } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { z } from 'zod';
import type { FleetMetrics } from '../../metrics';
import type { WatchEnd, WatchEntry, WatchHub, WatchSubscriber, WatchSubscription } from '../../streams/watch-hub';
import { watchQuerySchema } from '../api-schemas';
import { failure, route } from '../route-options';

export interface WatchRouteOptions {
  /** the process's one reader; the route closes it when the server closes */
  readonly hub: WatchHub;
  readonly metrics: Pick<FleetMetrics, 'watching' | 'watchOverflowed'>;
  /** a comment line this often, so that proxies keep an idle stream open (default 15 s) */
  readonly keepAliveMs?: number;
  /** bytes a watch may leave unsent (its client reads too slowly) before it is closed with `event: overflow` (default 1 MiB) */
  readonly maxUnsentBytes?: number;
  /** how long an ended watch's last bytes may take to leave before its connection is dropped (default 5 s) */
  readonly endGraceMs?: number;
}

const SSE_HEADERS = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache, no-transform',
  // nginx and others buffer responses unless told not to
  'x-accel-buffering': 'no',
  connection: 'keep-alive',
  'x-content-type-options': 'nosniff',
};

/** Where a client that resyncs reads what it missed. */
const BACKFILL = 'GET /api/deployments/{id}/transitions?afterVersion={last version you have}';

const watchStreamSchema = z
  .string()
  .describe(
    [
      'Server-sent events (text/event-stream). First `retry: 2000`; a watch without a cursor then gets `id: <cursor>` alone once it is live (its start position).',
      '`event: transition`, `id: <cursor>` (opaque: every partition\'s position after this event), `data:` the stream entry\'s fields as one line of JSON (docs/contract.md, "The transition stream"; all values strings).',
      '`: keep-alive` every 15 s, with `id: <cursor>` when the position moved without an event (a filtered watch).',
      '`event: resync`, `data: {reason: "trimmed"|"repartitioned"|"bad_cursor", message, positions: {<partition key>: <first id still there>}, backfill}`, then the stream ends: read what you missed from the transitions API, then watch without a cursor.',
      '`event: overflow`, `data: {message, cursor}`, then the stream ends: the client read too slowly; resume from `cursor`.',
    ].join(' '),
  );

export const watchRoutes: FastifyPluginAsync<WatchRouteOptions> = async (app, options) => {
  const api = app.withTypeProvider<ZodTypeProvider>();
  // every watch ends before the server waits for its connections to close
  app.addHook('preClose', () => options.hub.close());

  const { config, schema } = route('read', {
    summary: 'Transitions as they happen (server-sent events)',
    description:
      'Every transition as it is applied, from the stream, per deployment in version order; filters by deployment and by the state it went to. Resume with the `Last-Event-ID` header (an EventSource sends it) or `after`: nothing missed, nothing repeated. Also takes the token as a basic-auth password (any user), for a browser.',
    querystring: watchQuerySchema,
    headers: z.object({
      'last-event-id': z
        .string()
        .optional()
        .describe('resume after this cursor (an EventSource sends the last id it had when it reconnects); wins over `after`'),
    }),
    response: {
      200: {
        description: 'the stream of events, until a resync, an overflow or the server stopping',
        content: { 'text/event-stream': { schema: watchStreamSchema } },
      },
      400: failure('invalid_query: names the offending parameter and its rule'),
    },
  });
  api.get('/api/watch', { config: { ...config, challenge: 'Bearer or Basic' }, schema }, (request, reply) => {
    // Fastify answers HEAD with this handler too (after the same auth and checks): the GET's headers and no body, so
    // nothing to follow, and the connection is free for its next request (raw: Fastify would add a Content-Length: 0
    // that the GET does not have)
    if (request.method === 'HEAD') {
      reply.hijack();
      reply.raw.writeHead(200, SSE_HEADERS).end();
      return;
    }
    const header = request.headers['last-event-id'];
    const lastEventId = typeof header === 'string' && header.trim() !== '' ? header.trim() : undefined;
    const { deploymentId, state, after } = request.query;
    reply.hijack();
    new WatchStream(reply.raw, options).start({
      ...(lastEventId !== undefined ? { after: lastEventId, afterName: 'Last-Event-ID' } : after !== undefined ? { after, afterName: 'after' } : {}),
      filter: {
        ...(deploymentId !== undefined ? { deploymentIds: new Set(deploymentId) } : {}),
        ...(state !== undefined ? { states: new Set(state) } : {}),
      },
    });
  });
};

/**
 * An entry's block: built once per entry and cursor, not once per watcher (the watchers on the live feed get the same
 * entry with the same cursor one after the other).
 */
let lastBlock: { entry: WatchEntry; cursor: string; bytes: Buffer } | null = null;
function transitionBlock(entry: WatchEntry, cursor: string): Buffer {
  if (lastBlock?.entry !== entry || lastBlock.cursor !== cursor) {
    lastBlock = { entry, cursor, bytes: Buffer.from(`id: ${cursor}\nevent: transition\ndata: ${entry.data}\n\n`) };
  }
  return lastBlock.bytes;
}

/**
 * The event loop's turn, counted (one timer however many watches ask): a watch judges its bound once per turn, on
 * the first write of the turn.
 */
let turn = 0;
let turnCounting = false;
function currentTurn(): number {
  if (!turnCounting) {
    turnCounting = true;
    setImmediate(() => {
      turn++;
      turnCounting = false;
    });
  }
  return turn;
}

/**
 * One watch: its response, its subscription to the hub, its keep-alive and its bound. The bound is judged when more
 * comes (the first write of an event-loop turn: a read of the stream, a keep-alive) on what the client left unsent
 * of what it had before, not on what one read brings at once, which the client had no turn to take yet: a client
 * that reads is never closed for a burst, one that does not is closed at the next read after it fell a bound behind.
 * Unsent bytes stay below the bound plus one read's entries.
 */
class WatchStream {
  private subscription: WatchSubscription | null = null;
  /** the last `id:` sent: what the client's Last-Event-ID is once it read everything sent */
  private lastId: string | null = null;
  private keepAlive: NodeJS.Timeout | undefined;
  private dropAfterEnd: NodeJS.Timeout | undefined;
  private ended = false;
  private judgedTurn = -1;
  /** blocks queued this turn, written together at its end (as bytes: an entry's block is encoded once for every watcher) */
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private readonly maxUnsent: number;

  constructor(
    private readonly raw: ServerResponse,
    private readonly options: WatchRouteOptions,
  ) {
    this.maxUnsent = options.maxUnsentBytes ?? 1024 * 1024;
  }

  start(spec: Pick<WatchSubscriber, 'after' | 'afterName' | 'filter'>): void {
    const { raw, options } = this;
    raw.writeHead(200, SSE_HEADERS);
    raw.write('retry: 2000\n\n');
    options.metrics.watching(1);
    raw.once('close', () => {
      this.stop();
      clearTimeout(this.dropAfterEnd);
    });
    this.lastId = spec.after ?? null;
    this.subscription = options.hub.subscribe({
      ...spec,
      onEntry: (entry, cursor) => this.send(transitionBlock(entry, cursor), cursor),
      onPositioned: (cursor) => void this.send(`id: ${cursor}\n\n`, cursor),
      onEnd: (end) => this.onEnd(end),
      drained: () => this.drained(),
    });
    this.keepAlive = setInterval(() => this.ping(), options.keepAliveMs ?? 15_000);
  }

  /**
   * Queues one block; false when the client should be left to read before more (a catch-up waits). The blocks a
   * watch gets in one turn leave in one write at its end: one chunk and one system call for a whole read of the
   * stream, not one per entry.
   */
  private send(block: Buffer | string, cursor: string | null): boolean {
    if (this.ended) return true;
    const now = currentTurn();
    if (this.judgedTurn !== now) {
      this.judgedTurn = now;
      if (this.raw.writableLength > this.maxUnsent) {
        this.overflow();
        return true;
      }
    }
    const bytes = typeof block === 'string' ? Buffer.from(block) : block;
    if (this.pending.length === 0) process.nextTick(() => this.flush());
    this.pending.push(bytes);
    this.pendingBytes += bytes.length;
    if (cursor !== null) this.lastId = cursor;
    return this.raw.writableLength + this.pendingBytes < this.raw.writableHighWaterMark;
  }

  /** Takes what this turn queued, as one block of bytes. */
  private takePending(): Buffer | null {
    const { pending, pendingBytes } = this;
    if (pending.length === 0) return null;
    this.pending = [];
    this.pendingBytes = 0;
    return pending.length === 1 ? (pending[0] ?? null) : Buffer.concat(pending, pendingBytes);
  }

  /** Writes what this turn queued. */
  private flush(): void {
    const bytes = this.takePending();
    if (bytes !== null && !this.ended) this.raw.write(bytes);
  }

  private ping(): void {
    const cursor = this.subscription?.cursor() ?? null;
    const moved = cursor !== null && cursor !== this.lastId;
    this.send(`: keep-alive\n${moved ? `id: ${cursor}\n` : ''}\n`, moved ? cursor : null);
  }

  private overflow(): void {
    this.options.metrics.watchOverflowed();
    const message = `this watch left more than ${this.maxUnsent} bytes unsent: the client reads too slowly; resume from the cursor`;
    this.finish(`event: overflow\ndata: ${JSON.stringify({ message, cursor: this.lastId ?? this.subscription?.cursor() ?? null })}\n\n`);
  }

  private onEnd(end: WatchEnd): void {
    if (end.reason !== 'resync') return this.finish(''); // closing, interrupted: the client reconnects with its last cursor
    const { resync: reason, message, positions } = end;
    this.finish(`event: resync\ndata: ${JSON.stringify({ reason, message, positions, backfill: BACKFILL })}\n\n`);
  }

  /** Ends the response with its last words; a client that does not take them loses its connection after the grace. */
  private finish(last: string): void {
    if (this.ended) return;
    const queued = this.takePending();
    this.stop();
    this.raw.end(queued === null ? last : Buffer.concat([queued, Buffer.from(last)]));
    this.dropAfterEnd = setTimeout(() => this.raw.destroy(), this.options.endGraceMs ?? 5000);
    this.dropAfterEnd.unref();
  }

  /** The watch ends (its last bytes may still be on their way): it counts no more. */
  private stop(): void {
    if (this.ended) return;
    this.options.metrics.watching(-1);
    this.ended = true;
    this.subscription?.close();
    clearInterval(this.keepAlive);
  }

  private drained(): Promise<void> {
    const raw = this.raw;
    this.flush();
    if (this.ended || !raw.writableNeedDrain) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        raw.off('drain', done).off('close', done);
        resolve();
      };
      raw.on('drain', done).on('close', done);
    });
  }
}
