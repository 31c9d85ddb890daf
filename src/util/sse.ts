/**
 * Reading a `text/event-stream` (the HTML standard's "Server-sent events", 9.2.6 "Interpreting an event stream"):
 * what `fleet watch` and the bench's watchers read from `GET /api/watch`. Only the parsing: the connection, the
 * reconnection and what the events mean are the caller's.
 */

/** One dispatched event. */
export interface SseEvent {
  /** the `event:` field, `message` when none was given */
  readonly event: string;
  /** the `data:` lines, joined by line feeds */
  readonly data: string;
  /** the last event id as of this event (the `id:` of this event or of an earlier one; null when none yet) */
  readonly lastEventId: string | null;
}

/** One block of the stream as sent (up to its blank line): what its lines set, comments included. For tests of the wire format. */
export interface SseBlock {
  readonly id?: string;
  readonly event?: string;
  /** the `data:` lines, joined by line feeds */
  readonly data?: string;
  readonly retry?: string;
  readonly comments: readonly string[];
}

interface OpenBlock {
  id?: string;
  event?: string;
  data?: string[];
  retry?: string;
  comments: string[];
}

/** Reads an event stream's text in whatever pieces it arrives, and returns the events each piece completes. */
export class SseParser {
  /**
   * The last event id of the last dispatched block, the position to resume from (`Last-Event-ID`). An `id:` in a
   * block without data (a keep-alive) moves it too, as the standard says; an `id:` in a block that never completed
   * does not.
   */
  lastEventId: string | null = null;
  /** the last `retry:` field (ms), null when none came */
  retryMs: number | null = null;
  private pending = '';
  private idBuffer: string | null = null;
  private eventType = '';
  private data: string[] = [];
  private started = false;
  private block: OpenBlock = { comments: [] };

  /** `onBlock` sees every block as sent, those that dispatch no event too (a keep-alive, `retry:`). */
  constructor(
    lastEventId: string | null = null,
    private readonly onBlock?: (block: SseBlock) => void,
  ) {
    this.lastEventId = lastEventId;
    this.idBuffer = lastEventId;
  }

  /** Feeds decoded text (a UTF-8 decoder with `stream: true` keeps characters whole across pieces). */
  push(text: string): SseEvent[] {
    let input = this.pending + text;
    if (!this.started && input !== '') {
      this.started = true;
      if (input.startsWith('\uFEFF')) input = input.slice(1);
    }
    const events: SseEvent[] = [];
    let start = 0;
    for (let i = 0; i < input.length; i++) {
      const c = input[i];
      if (c !== '\n' && c !== '\r') continue;
      // a CR at the end of the piece may be the first half of a CRLF: wait for the next piece
      if (c === '\r' && i === input.length - 1) break;
      const event = this.line(input.slice(start, i));
      if (event !== null) events.push(event);
      if (c === '\r' && input[i + 1] === '\n') i++;
      start = i + 1;
    }
    this.pending = input.slice(start);
    return events;
  }

  private line(line: string): SseEvent | null {
    if (line === '') return this.dispatch();
    if (line.startsWith(':')) {
      // a comment (keep-alive)
      if (this.onBlock !== undefined) this.block.comments.push(line.slice(1).trim());
      return null;
    }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (this.onBlock !== undefined) {
      if (field === 'data') (this.block.data ??= []).push(value);
      else if (field === 'id' || field === 'event' || field === 'retry') this.block[field] = value;
    }
    if (field === 'data') this.data.push(value);
    else if (field === 'event') this.eventType = value;
    else if (field === 'id' && !value.includes('\u0000')) this.idBuffer = value;
    else if (field === 'retry' && /^\d+$/.test(value)) this.retryMs = Number(value);
    return null;
  }

  private dispatch(): SseEvent | null {
    if (this.onBlock !== undefined) {
      const { data, ...rest } = this.block;
      this.block = { comments: [] };
      this.onBlock({ ...rest, ...(data === undefined ? {} : { data: data.join('\n') }) });
    }
    this.lastEventId = this.idBuffer;
    const data = this.data;
    const event = this.eventType;
    this.data = [];
    this.eventType = '';
    if (data.length === 0) return null;
    return { event: event === '' ? 'message' : event, data: data.join('\n'), lastEventId: this.lastEventId };
  }
}
