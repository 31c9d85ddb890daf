/**
 * `fleet watch`: transitions as they happen, from a fleet's `GET /api/watch` (server-sent events) over HTTP with a
 * token, for operators without Redis access; printed as `fleet tail` prints them. A dropped connection is made again
 * with the last cursor as `Last-Event-ID` (waiting the stream's `retry:`, then longer), so nothing is missed or
 * printed twice; the watch ends on a stop (with the cursor to resume from), on `event: resync` (the cursor was trimmed
 * away: backfill from the history API), on `event: overflow` (it fell behind), and when the fleet refuses it.
 */
import { TextDecoder } from 'node:util';
import { parseEntry } from '../streams/consumer';
import { partitionOf } from '../streams/partitions';
import { sleep } from '../util';
import { SseParser, type SseEvent } from '../util/sse';
import { UnreachableError } from './reach';
import { decodeCursor } from '../streams/stream-follower';
import { formatEntry } from './tail';

export interface WatchOptions {
  /** the fleet's HTTP API (`FLEET_URL`, `--url`), e.g. `http://127.0.0.1:3000` */
  readonly url: string;
  /** a bearer token with the `read` scope (`FLEET_TOKEN`); null: no Authorization header */
  readonly token: string | null;
  /** only these deployments (none: every one) */
  readonly deploymentIds: readonly string[];
  /** only transitions to these states (none: every one) */
  readonly states: readonly string[];
  /** start after this cursor (what a watch or a tail printed when it stopped); null: from now */
  readonly from: string | null;
  readonly json: boolean;
  readonly write: (line: string) => void;
  /** resolves when the watch should stop: it returns at once, with its cursor */
  readonly stop: Promise<void>;
  /** where "lost the fleet at ..., reconnecting" and "... is back" go */
  readonly report: (message: string) => void;
  /** how long a connection may take to answer (default 5000 ms); at the start, longer is "unreachable" (exit 4) */
  readonly connectTimeoutMs?: number;
  /** a connection that brings nothing for this long (the fleet sends a keep-alive every 15 s) is made again (default 45000 ms) */
  readonly idleTimeoutMs?: number;
  /** the longest wait between two reconnections (default 30000 ms; the first waits the stream's `retry:`) */
  readonly maxRetryMs?: number;
}

/**
 * How `fleet watch` ended: decisions as data, which the command turns into lines and exit codes (how the server ends
 * one watch is the hub's `WatchEnd`).
 */
export type WatchOutcome =
  | { readonly kind: 'stopped'; readonly cursor: string | null }
  /** the cursor's position is gone (`reason`: trimmed, repartitioned, bad_cursor): backfill, then watch again */
  | { readonly kind: 'resync'; readonly reason: string; readonly message: string; readonly backfill: string }
  /** the watch fell behind its buffer on the fleet and was closed: resume from `cursor` */
  | { readonly kind: 'overflow'; readonly message: string; readonly cursor: string | null }
  /** the fleet refused the watch (400 a filter or the cursor, 401 the token, 403 its scopes, 404 no such route, 500 its own error...) */
  | { readonly kind: 'refused'; readonly status: number; readonly message: string };

/** One connection's outcome: the watch's end, or a connection lost (or never made) that is made again. */
type Attempt =
  | { readonly kind: 'end'; readonly end: WatchOutcome }
  | { readonly kind: 'lost'; readonly why: string; readonly opened: boolean; readonly retryAfterMs?: number };

/**
 * The statuses worth asking again: a server the fleet needs is away (its 503, with Retry-After), or a proxy has no
 * fleet behind it for now (502, 503, 504: a restart). Not a 500: the fleet answers one for an error of its own,
 * logged there, which asking again does not mend (and "unreachable" would misname: the fleet answered). Not a 429:
 * the fleet's comes only to a request without a valid token (a valid token always gets through), so asking again
 * ends at a 401.
 */
const TRANSIENT_STATUSES = new Set([502, 503, 504]);
/** The stream's reconnection time when it has not said (`retry:`): the fleet says 2000. */
const DEFAULT_RETRY_MS = 2000;

/** The fleet's URL as a line names it: origin and path (no credentials: the configuration refuses them). */
export function describeFleet(url: string): string {
  const u = new URL(url);
  return `the fleet at ${u.origin}${u.pathname.replace(/\/+$/, '')}`;
}

/** `GET /api/watch` under the fleet's URL, with the filters as repeated parameters. */
export function watchUrl(options: Pick<WatchOptions, 'url' | 'deploymentIds' | 'states'>): URL {
  const url = new URL('api/watch', options.url.endsWith('/') ? options.url : `${options.url}/`);
  for (const id of options.deploymentIds) url.searchParams.append('deploymentId', id);
  for (const state of options.states) url.searchParams.append('state', state);
  return url;
}

/** Why a fetch failed, in a few words: the socket's error code when there is one. */
function failure(err: unknown): string {
  const cause = (err as { cause?: unknown }).cause;
  const code = (cause as { code?: unknown } | undefined)?.code ?? (err as { code?: unknown }).code;
  if (typeof code === 'string') return code;
  if (cause instanceof Error) return cause.message;
  return err instanceof Error ? err.message : String(err);
}

/**
 * The stream entry's id, from the cursor after it: the position of the deployment's partition (P = 1: the only
 * one). The cursor is opaque to other clients; this one is the fleet's own CLI, and prints what `fleet tail` prints.
 */
function streamIdOf(cursor: string | null, deploymentId: string): string {
  if (cursor === null) return '';
  try {
    const { p, ids } = decodeCursor(cursor);
    return ids[partitionOf(deploymentId, p)] ?? '';
  } catch {
    return '';
  }
}

/** A JSON object's members, or null. */
function objectOf(data: string): Record<string, unknown> | null {
  try {
    const value: unknown = JSON.parse(data);
    return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

const text = (value: unknown, fallback = ''): string => (typeof value === 'string' ? value : fallback);

export class HttpWatch {
  private cursor: string | null;
  private retryMs = DEFAULT_RETRY_MS;
  private stopped = false;
  private connection: AbortController | null = null;
  private readonly stopping: Promise<void>;
  private readonly fleet: string;
  private readonly url: URL;
  /** a reconnection was reported and its success is not yet */
  private lost = false;

  constructor(private readonly options: WatchOptions) {
    this.cursor = options.from;
    this.fleet = describeFleet(options.url);
    this.url = watchUrl(options);
    this.stopping = options.stop.then(() => {
      this.stopped = true;
      this.connection?.abort();
    });
  }

  /** Follows the watch until it ends; throws UnreachableError when the fleet cannot be reached at the start. */
  async run(): Promise<WatchOutcome> {
    let failures = 0;
    let opened = false;
    while (!this.stopped) {
      const attempt = await this.connect();
      if (attempt.kind === 'end') return attempt.end;
      if (this.stopped) break;
      opened ||= attempt.opened;
      if (!opened) throw new UnreachableError(`${this.fleet} is unreachable (${attempt.why})`);
      failures = attempt.opened ? 1 : failures + 1;
      if (!this.lost) this.options.report(`lost ${this.fleet} (${attempt.why}), reconnecting`);
      this.lost = true;
      const backoff = Math.min(this.options.maxRetryMs ?? 30_000, this.retryMs * 2 ** (failures - 1));
      // a little spread after the first wait, so that many watchers of a restarted fleet do not come back at once
      const waitMs = Math.max(attempt.retryAfterMs ?? 0, failures === 1 ? this.retryMs : backoff * (1 + Math.random() / 4));
      await Promise.race([sleep(waitMs), this.stopping]);
    }
    return { kind: 'stopped', cursor: this.cursor };
  }

  private headers(): Record<string, string> {
    return {
      accept: 'text/event-stream',
      'cache-control': 'no-cache',
      // compression makes proxies and decoders hold events back until a block fills
      'accept-encoding': 'identity',
      ...(this.options.token !== null ? { authorization: `Bearer ${this.options.token}` } : {}),
      ...(this.cursor !== null && this.cursor !== '' ? { 'last-event-id': this.cursor } : {}),
    };
  }

  /** One connection: opens it, prints what it brings until it ends, and says how. */
  private async connect(): Promise<Attempt> {
    const controller = new AbortController();
    this.connection = controller;
    if (this.stopped) return { kind: 'end', end: { kind: 'stopped', cursor: this.cursor } };
    let timedOut: string | null = null;
    const abortAfter = (ms: number, why: string): NodeJS.Timeout =>
      setTimeout(() => {
        timedOut = why;
        controller.abort();
      }, ms);
    let timer = abortAfter(this.options.connectTimeoutMs ?? 5000, 'no answer in time');
    let response: Response;
    try {
      response = await fetch(this.url, { headers: this.headers(), signal: controller.signal });
    } catch (err) {
      clearTimeout(timer);
      if (this.stopped) return { kind: 'end', end: { kind: 'stopped', cursor: this.cursor } };
      return { kind: 'lost', why: timedOut ?? failure(err), opened: false };
    }
    // the connect timer also bounds reading a refusal's body
    const refused = await this.refusal(response);
    clearTimeout(timer);
    if (refused !== null) {
      controller.abort();
      return refused;
    }
    if (this.lost) this.options.report(`${this.fleet} is back`);
    this.lost = false;
    const idleMs = this.options.idleTimeoutMs ?? 45_000;
    const reader = (response.body as ReadableStream<Uint8Array>).getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser(this.cursor);
    try {
      for (;;) {
        timer = abortAfter(idleMs, `nothing came for ${idleMs} ms`);
        const { done, value } = await reader.read();
        clearTimeout(timer);
        if (done) return { kind: 'lost', why: 'the fleet ended the stream', opened: true };
        for (const event of parser.push(decoder.decode(value, { stream: true }))) {
          const end = this.handle(event);
          if (end !== null) {
            controller.abort();
            return { kind: 'end', end };
          }
        }
        // an `id:` without data (a filtered watch's keep-alive) moves the cursor too
        if (parser.lastEventId !== null && parser.lastEventId !== '') this.cursor = parser.lastEventId;
        this.retryMs = parser.retryMs ?? this.retryMs;
      }
    } catch (err) {
      if (this.stopped) return { kind: 'end', end: { kind: 'stopped', cursor: this.cursor } };
      return { kind: 'lost', why: timedOut ?? failure(err), opened: true };
    } finally {
      clearTimeout(timer);
    }
  }

  /** What a response other than an event stream means: the watch's end, or a connection to make again. */
  private async refusal(response: Response): Promise<Attempt | null> {
    const type = response.headers.get('content-type') ?? '';
    if (response.status === 200 && /^text\/event-stream\b/i.test(type)) return null;
    const body = objectOf(await response.text().catch(() => ''));
    const error = body?.['error'] as { code?: unknown; message?: unknown } | undefined;
    const said = error !== undefined ? `${text(error.code, String(response.status))}: ${text(error.message)}` : `${response.status}`;
    if (TRANSIENT_STATUSES.has(response.status)) {
      const retryAfter = Number(response.headers.get('retry-after'));
      return {
        kind: 'lost',
        why: `it answered ${said}`,
        opened: false,
        ...(Number.isFinite(retryAfter) && retryAfter > 0 ? { retryAfterMs: retryAfter * 1000 } : {}),
      };
    }
    const status = response.status;
    const hint =
      status === 401
        ? this.options.token === null
          ? ': set FLEET_TOKEN to a token with the read scope (`fleet token create`)'
          : ': FLEET_TOKEN is not a token this fleet knows'
        : status === 403
          ? ': FLEET_TOKEN needs the read scope'
          : status === 404
            ? ': no /api/watch there (a fleet older than `fleet watch`, or a URL that is not the fleet API)'
            : status === 200
              ? `: answered ${type || 'no content type'}, not an event stream (a URL that is not the fleet API?)`
              : status >= 500
                ? ": an error of the fleet's own (its log says more)"
                : '';
    return { kind: 'end', end: { kind: 'refused', status, message: `${this.fleet} refused the watch (${said})${hint}` } };
  }

  /** Prints a transition; the watch's end on a resync or an overflow; null for anything else. */
  private handle(event: SseEvent): WatchOutcome | null {
    const data = objectOf(event.data);
    if (event.event === 'transition') {
      if (data === null) {
        this.options.report(`skipped an event the fleet sent that is not a JSON object: ${event.data.slice(0, 80)}`);
        return null;
      }
      const cursor = event.lastEventId === '' ? null : event.lastEventId;
      const fields = Object.entries(data).flatMap(([k, v]) => [k, typeof v === 'string' ? v : JSON.stringify(v)]);
      const entry = parseEntry(streamIdOf(cursor, text(data['deploymentId'])), fields);
      this.options.write(formatEntry(entry, this.options.json));
      this.cursor = cursor ?? this.cursor;
      return null;
    }
    if (event.event === 'resync') {
      return {
        kind: 'resync',
        reason: text(data?.['reason'], 'unknown'),
        message: text(data?.['message'], event.data),
        backfill: text(data?.['backfill'], 'GET /api/deployments/{id}/transitions?afterVersion={last version you have}'),
      };
    }
    if (event.event === 'overflow') {
      const cursor = text(data?.['cursor']);
      return { kind: 'overflow', message: text(data?.['message'], event.data), cursor: cursor !== '' ? cursor : this.cursor };
    }
    return null; // an event this client does not know (the stream may gain kinds): not ours to print
  }
}

export function watch(options: WatchOptions): Promise<WatchOutcome> {
  return new HttpWatch(options).run();
}
