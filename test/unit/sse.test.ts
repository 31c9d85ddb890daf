/**
 * Reading an event stream (src/util/sse.ts), as `fleet watch` and the bench's watchers read `GET /api/watch`: the
 * HTML standard's rules, in whatever pieces the bytes arrive.
 */
import { expect } from 'chai';
import { SseParser, type SseBlock, type SseEvent } from '../../src/util/sse';

/** Feeds `text` in pieces of `size` characters; every event. */
function read(text: string, size: number, parser = new SseParser()): SseEvent[] {
  const events: SseEvent[] = [];
  for (let i = 0; i < text.length; i += size) events.push(...parser.push(text.slice(i, i + size)));
  return events;
}

const STREAM =
  '\uFEFFretry: 2000\r\n' +
  ': keep-alive\n' +
  '\n' +
  'id: c1\r\n' +
  'event: transition\r' +
  'data: {"a":1}\r\n' +
  '\r\n' +
  'data:first\n' +
  'data:  second\n' +
  'data\n' +
  '\n' +
  'id: c2\n' +
  '\n' +
  'event: resync\n' +
  'data: {"reason":"trimmed"}\n' +
  '\n';

describe('reading an event stream', () => {
  it('reads the same events whatever the pieces, with CR, LF and CRLF line ends split anywhere', () => {
    const whole = read(STREAM, STREAM.length);
    expect(whole).to.deep.equal([
      { event: 'transition', data: '{"a":1}', lastEventId: 'c1' },
      { event: 'message', data: 'first\n second\n', lastEventId: 'c1' },
      { event: 'resync', data: '{"reason":"trimmed"}', lastEventId: 'c2' },
    ]);
    for (let size = 1; size < 12; size++) expect(read(STREAM, size), `pieces of ${size}`).to.deep.equal(whole);
  });

  it('does not take a CRLF split between two pieces for two line ends', () => {
    const text = 'event: transition\r\ndata: a\r\ndata: b\r\n\r\n';
    for (let size = 1; size < text.length; size++) {
      expect(read(text, size), `pieces of ${size}`).to.deep.equal([{ event: 'transition', data: 'a\nb', lastEventId: null }]);
    }
  });

  it('takes retry: in ms, only digits', () => {
    const parser = new SseParser();
    parser.push('retry: 2000\n\n');
    expect(parser.retryMs).to.equal(2000);
    parser.push('retry: 1e3\n\nretry: -5\n\n');
    expect(parser.retryMs).to.equal(2000);
  });

  it('moves the last event id on a block without data (a keep-alive carrying the cursor), never on an unfinished block', () => {
    const parser = new SseParser('start');
    expect(parser.push(': keep-alive\nid: k1\n\n')).to.deep.equal([]);
    expect(parser.lastEventId).to.equal('k1');
    // the connection drops in the middle of an event: its id is not the position
    parser.push('id: c9\nevent: transition\ndata: {}\n');
    expect(parser.lastEventId).to.equal('k1');
    // an id with a NUL is ignored
    parser.push('\nid: x\u0000y\n\n');
    expect(parser.lastEventId).to.equal('c9');
  });

  it('starts from the id it is given, and dispatches nothing for comments and unknown fields', () => {
    const parser = new SseParser('resumed');
    expect(parser.push(':\n: a comment\nfoo: bar\n\ndata: x\n\n')).to.deep.equal([{ event: 'message', data: 'x', lastEventId: 'resumed' }]);
  });

  it('shows every block as sent to onBlock, those without data too; an unfinished block never', () => {
    const blocks: SseBlock[] = [];
    const parser = new SseParser(null, (block) => blocks.push(block));
    parser.push('retry: 2000\n\n: keep-alive\nid: k1\n\nid: c1\nevent: transition\ndata: a\ndata: b\n\nid: c2\nevent: trans');
    expect(blocks).to.deep.equal([
      { retry: '2000', comments: [] },
      { id: 'k1', comments: ['keep-alive'] },
      { id: 'c1', event: 'transition', data: 'a\nb', comments: [] },
    ]);
  });
});
