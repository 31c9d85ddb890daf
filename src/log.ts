import * as os from 'node:os';
import pino from 'pino';
import type { Logger } from 'pino';
import { prettyFactory } from 'pino-pretty';
import { printable } from './util';

export type { Logger };

/** `LOG_FORMAT` (docs/contract.md): `pretty` lines for a person at a terminal, `json` for everything else. */
export const LOG_FORMATS = ['pretty', 'json'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

/** Paths that may carry secrets anywhere in a log record; pino replaces their values. */
export const REDACT_PATHS = [
  'password',
  '*.password',
  'redisUrl',
  '*.redisUrl',
  'databaseUrl',
  '*.databaseUrl',
  'connectionString',
  '*.connectionString',
  'boardPassword',
  '*.boardPassword',
  'authorization',
  '*.authorization',
  'headers.authorization',
  'req.headers.authorization',
];

const CENSOR = '[redacted]';

/** `scheme://user:password@` in any string: the password is replaced. */
const URL_CREDENTIALS = /([a-z][a-z0-9+.-]*:\/\/[^\s:/@]*:)[^\s@/]+@/gi;

/** Replaces the password of every URL in `text` (`redis://u:secret@h` -> `redis://u:[redacted]@h`). */
export function scrubUrls(text: string): string {
  return text.replace(URL_CREDENTIALS, `$1${CENSOR}@`);
}

/**
 * Errors are serialized with pino's standard serializer, then scrubbed: ioredis attaches the failed command to
 * its errors (`command: {name: 'auth', args: [user, password]}` when AUTH fails), and a message or stack may quote
 * a connection URL. Command arguments are dropped (the name is enough to debug), URLs lose their password, and
 * the same applies to the error's causes.
 */
export function serializeError(err: unknown): unknown {
  if (!(err instanceof Error)) return err;
  return scrub(pino.stdSerializers.err(err), 0);
}

function scrub(value: unknown, depth: number): unknown {
  if (typeof value === 'string') return scrubUrls(value);
  if (typeof value !== 'object' || value === null || depth > 6) return value;
  if (Array.isArray(value)) return value.map((v) => scrub(v, depth + 1));
  const out: Record<string, unknown> = {};
  for (const [key, v] of Object.entries(value)) {
    if (key === 'command' && typeof v === 'object' && v !== null && 'args' in v) {
      out[key] = { ...(v as Record<string, unknown>), args: CENSOR };
    } else if (key === 'options' || key === 'connectionOptions') {
      // a client's options (host, port, password, tls keys) never belong in a log line
      out[key] = CENSOR;
    } else {
      out[key] = scrub(v, depth + 1);
    }
  }
  return out;
}

/** How `createLogger` writes. */
export interface LogOutput {
  /** `json` (default): one JSON object per line; `pretty`: pino-pretty's readable lines */
  readonly format?: LogFormat;
  /** pretty only: colour the lines (default: when the destination is stdout and stdout is a terminal) */
  readonly colorize?: boolean;
}

/**
 * A pino logger writing to `destination` (default: stdout). Redaction and scrubbing happen in pino itself, before a
 * record is written, so the pretty lines carry no secret either: pino-pretty only re-formats the redacted JSON.
 */
export function createLogger(level: string, destination?: pino.DestinationStream, output: LogOutput = {}): Logger {
  const options: pino.LoggerOptions = {
    level,
    // which process on which host: with workers on many hosts, a line is worth little without them (pino's own default)
    base: { service: 'lifecycle-fleet', hostname: os.hostname(), pid: process.pid },
    redact: { paths: REDACT_PATHS, censor: CENSOR },
    serializers: { err: serializeError, error: serializeError },
    hooks: {
      // messages are ours, but may quote an error's message or a URL
      logMethod(args, method) {
        const scrubbed = args.map((a: unknown) => (typeof a === 'string' ? scrubUrls(a) : a)) as Parameters<typeof method>;
        return method.apply(this, scrubbed);
      },
    },
    timestamp: pino.stdTimeFunctions.isoTime,
  };
  if (output.format === 'pretty') {
    const colorize = output.colorize ?? (destination === undefined && process.stdout.isTTY === true);
    // synchronous stdout: a person reads these lines, and a line written at once is never lost at exit
    return pino(options, prettyLines(destination ?? pino.destination({ dest: 1, sync: true }), colorize));
  }
  // asynchronous stdout: a line goes out at once when nothing is being written, and lines logged meanwhile go out
  // together in the next write (one syscall per line was a measurable share of a busy worker's CPU); pino flushes
  // what is left synchronously when the process exits
  return pino(options, destination ?? pino.destination({ dest: 1, sync: false }));
}

/**
 * pino-pretty in this process, as a plain formatting function in front of `out`: not its transport (a worker thread
 * whose lines still in flight are lost when the process exits) and not its stream (piped, so asynchronous). Each
 * record is formatted and written before the log call returns.
 *
 * Records quote what producers sent (a reason, a job's data) and pino-pretty writes strings as they are: every
 * string of the record is made `printable` first, so nothing in it drives the terminal or forges a line. A stack
 * keeps its line breaks (pino-pretty indents each line under the record).
 */
function prettyLines(out: pino.DestinationStream, colorize: boolean): pino.DestinationStream {
  const format = prettyFactory({
    colorize,
    singleLine: true,
    translateTime: 'SYS:HH:MM:ss.l',
    // the service name and host are for collected logs; a person at a terminal knows them
    ignore: 'service,hostname',
  });
  return { write: (line: string) => void out.write(format(printableRecord(JSON.parse(line) as unknown, '', 0))) };
}

/** `value` with every string in it `printable` (a `stack` keeping its line breaks). */
function printableRecord(value: unknown, key: string, depth: number): unknown {
  if (typeof value === 'string') return printable(value, { keepNewlines: key === 'stack' });
  if (typeof value !== 'object' || value === null || depth > 20) return value;
  if (Array.isArray(value)) return value.map((v) => printableRecord(v, '', depth + 1));
  return Object.fromEntries(Object.entries(value).map(([k, v]) => [printable(k), printableRecord(v, k, depth + 1)]));
}

/** A logger that writes nothing, for library use without a logger. */
export const silentLogger: Logger = pino({ level: 'silent' });
