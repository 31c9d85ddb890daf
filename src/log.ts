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
  'boardPassword',
  '*.boardPassword',
  'authorization',
  '*.authorization',
  'headers.authorization',
  'req.headers.authorization',
];

export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  const options: pino.LoggerOptions = {
    level,
    base: { service: 'lifecycle-fleet' },
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    timestamp: pino.stdTimeFunctions.isoTime,
  };
  return destination === undefined ? pino(options) : pino(options, destination);
}

/** A logger that writes nothing, for library use without a logger. */
export const silentLogger: Logger = pino({ level: 'silent' });
