/**
 * A client of `GET /api/watch` for the tests: one HTTP request, its answer read as server-sent events by the parser
 * `fleet watch` uses (src/util/sse.ts), every block kept as sent (comments and blocks without data too).
 */
import * as http from 'node:http';
import { SseParser, type SseBlock } from '../../src/util/sse';

export type { SseBlock } from '../../src/util/sse';

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
      const transitions: Array<{ id: string; entry: Record<string, string> }> = [];
      const parser = new SseParser(null, (block) => {
        blocks.push(block);
        if (block.event === 'transition') {
          transitions.push({ id: block.id ?? '', entry: JSON.parse(block.data ?? '{}') as Record<string, string> });
        }
      });
      response.on('data', (chunk: string) => {
        if (keepBody) body += chunk;
        parser.push(chunk);
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
        lastEventId: () => parser.lastEventId,
        transitions: () => [...transitions],
        ended,
        close: () => request.destroy(),
      });
    });
    request.on('error', reject);
  });
}
