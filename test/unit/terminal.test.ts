/**
 * Stored text on a terminal (issue 28): `printable()` writes control characters and bidi overrides as visible
 * escapes, and `fleet tail`'s lines and the pretty logger go through it.
 */
import { expect } from 'chai';
import { formatEntry } from '../../src/cli/tail';
import { createLogger } from '../../src/log';
import type { TransitionEntry } from '../../src/streams/consumer';
import { printable } from '../../src/util';

/** Anything a terminal would act on instead of showing. */
// eslint-disable-next-line no-control-regex -- matching control characters is the point
const RAW = /[\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/;
const HOSTILE = 'x\u001b[2J\u001b]0;title\u0007\ry\u0000\u007f\u009b31m\u202eevil\u2066z\u2069\t';

describe('text for a terminal', () => {
  it('escapes C0, DEL, C1 and bidi overrides visibly, and leaves everything else alone', () => {
    expect(printable(HOSTILE)).to.equal('x\\u001b[2J\\u001b]0;title\\u0007\\ry\\u0000\\u007f\\u009b31m\\u202eevil\\u2066z\\u2069\\t');
    expect(printable('line one\nline two')).to.equal('line one\\nline two');
    expect(printable('line one\nline\r two', { keepNewlines: true })).to.equal('line one\nline\\r two');
    const plain = 'attempt_failed é ü 東京 🚀 C:\\path "quoted" \u00a0 \u200b';
    expect(printable(plain)).to.equal(plain);
    let every = '';
    for (let c = 0; c < 0x10000; c++) if (c < 0xd800 || c > 0xdfff) every += String.fromCodePoint(c);
    expect(RAW.test(printable(every))).to.equal(false);
  });

  it('keeps JSON text JSON, reading back to the same value', () => {
    const value = { reason: HOSTILE, nested: [HOSTILE] };
    const out = printable(JSON.stringify(value));
    expect(RAW.test(out)).to.equal(false);
    expect(JSON.parse(out)).to.deep.equal(value);
  });

  it("fleet tail's lines, as text or JSON, carry no raw control character", () => {
    const entry: TransitionEntry = {
      streamId: '1-0',
      type: 'state_transition',
      transitionId: '1',
      deploymentId: '6f1c2a9e-0d4b-4c55-9a55-3f1a0c6d2b11',
      attemptId: '',
      from: 'deploying',
      to: 'failed',
      version: 3,
      reason: `attempt_failed\r\n2026-01-01T00:00:00Z  forged  v9  ready -> ready  ${HOSTILE}`,
      eventId: 'e\u001b[2J',
      at: '2026-01-01T00:00:00.000Z',
      actor: 'x\u009b',
    };
    const text = formatEntry(entry, false);
    expect(RAW.test(text), text).to.equal(false);
    expect(text).to.contain('attempt_failed\\r\\n2026');
    const json = formatEntry(entry, true);
    expect(RAW.test(json), json).to.equal(false);
    expect(JSON.parse(json)).to.deep.equal(entry);
  });

  it('the pretty logger escapes what a record carries; a stack keeps its lines', () => {
    let text = '';
    const logger = createLogger('info', { write: (line: string) => void (text += line) }, { format: 'pretty' });
    logger.warn(
      { reason: HOSTILE, nested: { deep: HOSTILE }, err: new Error(`boom ${HOSTILE}`) },
      `job failed: ${HOSTILE}\n[00:00:00.000] INFO (1): forged`,
    );
    const lines = text.split('\n').filter((l) => l !== '');
    for (const line of lines) expect(RAW.test(line), line).to.equal(false);
    expect(lines[0]).to.match(/^\[\d\d:\d\d:\d\d\.\d{3}\] WARN \(\d+\): job failed: x\\u001b\[2J/);
    expect(lines.filter((l) => l.includes('forged'))).to.have.length(1); // the forged line stays inside the first
    expect(
      lines.some((l) => /^\s+at /.test(l)),
      'the stack, line by line',
    ).to.equal(true);
  });
});
