/**
 * The API's error answers (docs/contract.md, "Status codes and errors"): `HttpError`, which a route or hook throws to
 * answer `{error: {code, message, issues?}}`, the API's code for what the framework refuses by itself, so that no
 * framework code (`FST_ERR_*`) reaches a client, and the server's handlers that give every error answer that shape.
 */
import { STATUS_CODES } from 'node:http';
import type { Duplex } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import { isTransient } from '../errors';
import type { Logger } from '../log';

export class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly issues?: ReadonlyArray<{ field: string; rule: string }>,
  ) {
    super(message);
  }
}

/** The reason phrase of a status, as an error code: 408 -> request_timeout. */
export function codeOf(status: number): string {
  return (STATUS_CODES[status] ?? 'error')
    .toLowerCase()
    .replace(/[^a-z]+/g, '_')
    .replace(/^_|_$/g, '');
}

/** What a framework refusal's message may say about the request. */
interface Refused {
  readonly contentType: string | undefined;
  readonly bodyLimit: number | undefined;
}

/** Fastify's refusals of a request, by code: the API's code, and a message that names the part and the rule. */
const FRAMEWORK_CODES: Readonly<Record<string, { readonly code: string; readonly message: (r: Refused) => string }>> = {
  FST_ERR_CTP_INVALID_MEDIA_TYPE: {
    code: 'unsupported_media_type',
    message: (r) =>
      `content-type: must be application/json, got ${r.contentType === undefined ? 'none' : JSON.stringify(r.contentType.slice(0, 80))}`,
  },
  FST_ERR_CTP_EMPTY_JSON_BODY: { code: 'invalid_body', message: () => 'body: must not be empty with content-type application/json' },
  FST_ERR_CTP_INVALID_JSON_BODY: {
    code: 'invalid_body',
    message: () => 'body: must be valid JSON, without `__proto__` or `constructor.prototype` keys',
  },
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: { code: 'invalid_body', message: () => 'body: its length must match the content-length header' },
  FST_ERR_CTP_BODY_TOO_LARGE: { code: 'payload_too_large', message: (r) => `body: must be at most ${r.bodyLimit ?? 'the limit of'} bytes` },
  FST_ERR_NOT_FOUND: { code: 'not_found', message: () => 'no such route' },
};

/** An API code: lower-case words joined by `_` (a framework's `FST_ERR_*` is not one). */
const API_CODE = /^[a-z][a-z0-9_]*$/;

/**
 * A client error (4xx) the framework or a plugin raised, in the API's words: our own codes (a plugin configured to
 * use them) as they are, Fastify's by FRAMEWORK_CODES, and any other by its status (`FST_ERR_VALIDATION` -> 400
 * `bad_request`), keeping its message.
 */
export function clientErrorOf(
  err: { readonly code?: string; readonly message?: string; readonly statusCode: number },
  request: Refused,
): { code: string; message: string } {
  const known = err.code !== undefined && Object.hasOwn(FRAMEWORK_CODES, err.code) ? FRAMEWORK_CODES[err.code] : undefined;
  if (known !== undefined) return { code: known.code, message: known.message(request) };
  const message = err.message ?? STATUS_CODES[err.statusCode] ?? 'bad request';
  return { code: err.code !== undefined && API_CODE.test(err.code) ? err.code : codeOf(err.statusCode), message };
}

/**
 * An error body another part wrote (Fastify, a plugin, Bull Board), in the API's shape; null when it is ours already,
 * or a body of its own (/readyz's checks), which is left alone.
 */
function inOneShape(status: number, payload: string): string | null {
  let body: unknown;
  try {
    body = JSON.parse(payload);
  } catch {
    body = undefined;
  }
  const b = (typeof body === 'object' && body !== null ? body : {}) as { error?: unknown; message?: unknown; statusCode?: unknown };
  const inner = typeof b.error === 'object' && b.error !== null ? (b.error as { code?: unknown; key?: unknown }) : null;
  if (inner !== null && typeof inner.code === 'string') return null;
  const foreign =
    typeof b.error === 'string' || inner !== null || typeof b.message === 'string' || typeof b.statusCode === 'number' || body === undefined;
  if (!foreign) return null;
  // Bull Board names its errors by a translation key (`ERRORS.JOB_NOT_FOUND` -> "job not found")
  const message =
    typeof inner?.key === 'string'
      ? inner.key
          .replace(/^ERRORS\./, '')
          .replace(/_/g, ' ')
          .toLowerCase()
      : b.message;
  return JSON.stringify({ error: { code: codeOf(status), message: typeof message === 'string' ? message : (STATUS_CODES[status] ?? 'error') } });
}

/**
 * Every error answer in one shape, `{error: {code, message}}`, whoever produced it (Fastify, a plugin, Bull Board):
 * the server's error and not-found handlers, and the bodies of errors answered elsewhere reshaped on their way out.
 */
export function answerErrorsInOneShape(app: FastifyInstance, logger: Logger): void {
  app.addHook('onSend', async (_request, reply, payload) => {
    if (reply.statusCode < 400 || typeof payload !== 'string') return payload;
    const reshaped = inOneShape(reply.statusCode, payload);
    if (reshaped === null) return payload;
    void reply.header('content-type', 'application/json; charset=utf-8');
    return reshaped;
  });

  app.setErrorHandler((err: unknown, request, reply) => {
    if (err instanceof HttpError) {
      return reply.status(err.status).send({ error: { code: err.code, message: err.message, ...(err.issues ? { issues: err.issues } : {}) } });
    }
    const e = err as { statusCode?: number; code?: string; message?: string };
    if (typeof e.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) {
      const contentType = request.headers['content-type'];
      const refused = clientErrorOf(
        { code: e.code, message: e.message, statusCode: e.statusCode },
        { contentType, bodyLimit: request.routeOptions.bodyLimit },
      );
      return reply.status(e.statusCode).send({ error: refused });
    }
    if (isTransient(err)) {
      // a server (PostgreSQL, Redis) that is away is not the request's fault: the caller may try again
      logger.warn(
        { url: request.url, code: (err as { code?: unknown }).code, reason: (err as Error).message },
        'http request: a server did not answer',
      );
      return reply
        .status(503)
        .header('retry-after', '5')
        .send({ error: { code: 'unavailable', message: 'a server the fleet needs did not answer; try again shortly' } });
    }
    logger.error({ err, url: request.url }, 'http request failed');
    return reply.status(500).send({ error: { code: 'internal', message: 'internal error' } });
  });
  app.setNotFoundHandler((request, reply) =>
    reply.status(404).send({ error: { code: 'not_found', message: `no route ${request.method} ${request.url.split('?')[0] ?? ''}` } }),
  );
}

/**
 * Answers a request Node's HTTP parser refused before Fastify saw it (a malformed request, headers too large, a body
 * shorter than its Content-Length that timed out) in the API's error shape, then closes the connection.
 */
export function clientErrorResponse(err: NodeJS.ErrnoException & { code?: string }, socket: Duplex): void {
  if (!socket.writable) {
    socket.destroy();
    return;
  }
  const status =
    err.code === 'HPE_HEADER_OVERFLOW' ? 431 : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : err.code === 'HPE_URI_TOO_LONG' ? 414 : 400;
  const body = JSON.stringify({
    error: { code: codeOf(status), message: `${STATUS_CODES[status] ?? 'Bad Request'}: the request could not be read` },
  });
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
  );
}
