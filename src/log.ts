import * as os from 'node:os';
import pino from 'pino';
import type { Logger } from 'pino';

export type { Logger };

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

export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
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
  // asynchronous stdout: a line goes out at once when nothing is being written, and lines logged meanwhile go out
  // together in the next write (one syscall per line was a measurable share of a busy worker's CPU); pino flushes
  // what is left synchronously when the process exits
  return pino(options, destination ?? pino.destination({ dest: 1, sync: false }));
}

/** A logger that writes nothing, for library use without a logger. */
export const silentLogger: Logger = pino({ level: 'silent' });
