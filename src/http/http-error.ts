/**
 * The API's error answers (docs/contract.md, "Status codes and errors"): `HttpError`, which a route or hook throws to
 * answer `{error: {code, message, issues?}}`.
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
