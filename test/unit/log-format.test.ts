/**
 * LOG_FORMAT=pretty: pino-pretty's lines, formatted in the process before the log call returns, coloured only when
 * asked (or on a terminal), and redacted exactly like the JSON lines.
 */
import { expect } from 'chai';
import { createLogger } from '../../src/log';

function capture(): { write(line: string): void; text(): string } {
  let text = '';
  return { write: (line) => void (text += line), text: () => text };
}

describe('log format', () => {
  const secret = 's3cret-pw-4711';
  const record = (format: 'pretty' | 'json', colorize?: boolean): string => {
    const out = capture();
    const logger = createLogger('info', out, { format, ...(colorize === undefined ? {} : { colorize }) });
    logger.info({ redisUrl: `redis://:${secret}@127.0.0.1:6379`, nested: { password: secret }, prefix: 'fleet' }, 'worker started');
    logger.warn(`could not reach postgres://fleet:${secret}@db:5432/fleet`);
    logger.error({ err: new Error(`connect to redis://u:${secret}@h:1 failed`) }, 'start failed');
    // written before the call returned: nothing is buffered in a stream or a thread
    return out.text();
  };

  it('pretty: readable lines, not JSON, written at once, with every secret redacted', () => {
    const text = record('pretty');
    const lines = text.split('\n').filter((l) => l !== '');
    expect(lines[0]).to.match(/^\[\d\d:\d\d:\d\d\.\d{3}\] INFO \(\d+\): worker started /);
    expect(text).to.contain('WARN').and.to.contain('ERROR').and.to.contain('prefix');
    expect(text).to.not.contain('{"level"');
    expect(text).to.not.contain('"service"'); // for collected logs, not for a person
    expect(text).to.not.contain(secret);
    expect(text).to.contain('[redacted]');
    expect(text).to.not.contain('\x1b['); // not coloured unless asked (or on a terminal)
  });

  it('pretty: coloured when asked', () => {
    expect(record('pretty', true)).to.contain('\x1b[').and.to.not.contain(secret);
  });

  it('json: one object per line, as before', () => {
    const lines = record('json')
      .split('\n')
      .filter((l) => l !== '');
    const parsed = lines.map((l) => JSON.parse(l) as { level: number; msg: string; service: string });
    expect(parsed.map((p) => p.msg)).to.deep.equal(['worker started', 'could not reach postgres://fleet:[redacted]@db:5432/fleet', 'start failed']);
    expect(parsed[0]?.service).to.equal('lifecycle-fleet');
    expect(lines.join('\n')).to.not.contain(secret);
  });
});
