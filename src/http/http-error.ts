/**
 * The API's error answers (docs/contract.md, "Status codes and errors"): `HttpError`, which a route or hook throws to
 * answer `{error: {code, message, issues?}}`, and the API's code for what the framework refuses by itself, so that no
 * framework code (`FST_ERR_*`) reaches a client.
 */
import { STATUS_CODES } from 'node:http';

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
  return (STATUS_CODES[status] ?? 'error').toLowerCase().replace(/[^a-z]+/g, '_').replace(/^_|_$/g, '');
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
    message: (r) => `content-type: must be application/json, got ${r.contentType === undefined ? 'none' : JSON.stringify(r.contentType.slice(0, 80))}`,
  },
  FST_ERR_CTP_EMPTY_JSON_BODY: { code: 'invalid_body', message: () => 'body: must not be empty with content-type application/json' },
  FST_ERR_CTP_INVALID_JSON_BODY: { code: 'invalid_body', message: () => 'body: must be valid JSON, without `__proto__` or `constructor.prototype` keys' },
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
export function clientErrorOf(err: { readonly code?: string; readonly message?: string; readonly statusCode: number }, request: Refused): { code: string; message: string } {
  const known = err.code !== undefined && Object.hasOwn(FRAMEWORK_CODES, err.code) ? FRAMEWORK_CODES[err.code] : undefined;
  if (known !== undefined) return { code: known.code, message: known.message(request) };
  const message = err.message ?? STATUS_CODES[err.statusCode] ?? 'bad request';
  return { code: err.code !== undefined && API_CODE.test(err.code) ? err.code : codeOf(err.statusCode), message };
}
