/**
 * A client of `GET /api/watch` for the tests: one HTTP request, its answer read as server-sent events (the SSE
 * spec's parsing: fields per line, a blank line dispatches; an `id` sets the last event id even without data).
 */
import * as http from 'node:http';

/** One block of the stream, as sent: what its lines set. */
export interface SseBlock {
  readonly id?: string;
  readonly event?: string;
  readonly data?: string;
  readonly retry?: string;
  readonly comments: readonly string[];
}

export interface SseClient {
  readonly status: number;
  readonly headers: http.IncomingHttpHeaders;
  /** every block so far */
  readonly blocks: SseBlock[];
  /** the body of a non-200 answer (the JSON error); for a stream, '' (see `blocks`) */
  text(): string;
  /** the client's Last-Event-ID: the last `id` of a dispatched block */
  lastEventId(): string | null;
  /** the `event: transition` blocks' data, parsed, with their ids */
  transitions(): Array<{ id: string; entry: Record<string, string> }>;
  /** resolves when the server ended the response (or the connection closed) */
  readonly ended: Promise<void>;
  /** drops the connection */
  close(): void;
}

/** Opens a watch; resolves once the answer's headers are in. */
export function openSse(url: string, headers: Record<string, string> = {}): Promise<SseClient> {
  return new Promise((resolve, reject) => {
    const request = http.get(url, { headers: { accept: 'text/event-stream', ...headers } }, (response) => {
      response.setEncoding('utf8');
      const blocks: SseBlock[] = [];
      let body = '';
      const keepBody = response.statusCode !== 200;
      let pending = '';
      let block: { id?: string; event?: string; data?: string[]; retry?: string; comments: string[] } = { comments: [] };
      let last: string | null = null;
      const transitions: Array<{ id: string; entry: Record<string, string> }> = [];
      response.on('data', (chunk: string) => {
        if (keepBody) body += chunk;
        pending += chunk;
        let newline = pending.indexOf('\n');
        while (newline >= 0) {
          const line = pending.slice(0, newline);
          pending = pending.slice(newline + 1);
          newline = pending.indexOf('\n');
          if (line === '') {
            const { data, ...rest } = block;
            const dispatched = { ...rest, ...(data === undefined ? {} : { data: data.join('\n') }) };
            blocks.push(dispatched);
            if (dispatched.event === 'transition') {
              transitions.push({ id: dispatched.id ?? '', entry: JSON.parse(dispatched.data ?? '{}') as Record<string, string> });
            }
            if (block.id !== undefined) last = block.id;
            block = { comments: [] };
          } else if (line.startsWith(':')) {
            block.comments.push(line.slice(1).trim());
          } else {
            const colon = line.indexOf(':');
            const field = colon < 0 ? line : line.slice(0, colon);
            const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
            if (field === 'data') (block.data ??= []).push(value);
            else if (field === 'id' || field === 'event' || field === 'retry') block[field] = value;
          }
        }
      });
      const ended = new Promise<void>((done) => {
        response.on('end', done);
        response.on('close', done);
        response.on('error', () => done());
      });
      resolve({
        status: response.statusCode ?? 0,
        headers: response.headers,
        blocks,
        text: () => body,
        lastEventId: () => last,
        transitions: () => [...transitions],
        ended,
        close: () => request.destroy(),
      });
    });
    request.on('error', reject);
  });
}
