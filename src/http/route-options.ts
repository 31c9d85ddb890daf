/**
 * How a route of the API is declared: who may call it (`config.scope`, which the gate enforces: access.ts) and its
 * zod schemas, which validate its parameters and query and from which /openapi.json is generated (routes/docs.ts).
 */
import type { FastifySchemaCompiler } from 'fastify';
import type { z } from 'zod';
import { apiErrorSchema } from './api-schemas';
import { HttpError } from './http-error';
import type { Scope } from './tokens';

/** An answer of the document: a JSON body and what it means on this route. */
export function answer<S extends z.ZodType>(description: string, schema: S) {
  return { description, content: { 'application/json': { schema } } };
}

/** An error answer of the document: the one error body (`ApiError`), with what the status means on this route. */
export const failure = (description: string) => answer(description, apiErrorSchema);

export const UNAVAILABLE = failure('unavailable: PostgreSQL or Redis did not answer; try again (see Retry-After)');
export const NOT_FOUND = failure('not_found: no such deployment');
export const BAD_ID = failure('invalid_id: `id` is not a UUID');

/** What every guarded route may answer besides its own: its scope's refusals. */
const refusals = (scope: Scope) => ({
  401: failure('unauthorized: no token, or a wrong one (with a tokens file; on loopback without one the API is open)'),
  403: failure(`forbidden: the token lacks the "${scope}" scope`),
  429: failure('too_many_failed_authentications: this address failed to authenticate too often; see Retry-After'),
});

/**
 * A route's options: who may call it (`config.scope`, which the gate enforces) and its schema, which the route
 * validates with and /openapi.json is generated from. The document gets the scope as `x-scope` and in the
 * description, no security for an open route, and the refusals and the 500 that every route may answer.
 */
export function route<S extends { description: string; response: object }>(scope: Scope | null, schema: S) {
  return {
    config: { scope },
    schema: {
      ...schema,
      description: `${schema.description}\n\n${scope === null ? 'Open: no token needed.' : `Scope: \`${scope}\`.`}`,
      ...(scope === null ? { security: [] } : { 'x-scope': scope }),
      response: {
        ...(scope === null ? {} : refusals(scope)),
        500: failure('internal: a fault of the server (logged)'),
        ...schema.response,
      },
    },
  };
}

/**
 * Validates a route's params and query with their zod schemas, after authentication (a request without the scope
 * learns nothing about the parameters): the first offending field, in the API's words, as `400 invalid_id` (the path's
 * `:id`) or `400 invalid_query`. Bodies are left to their route: the intake checks its own after the rate limit.
 */
export const validatorCompiler: FastifySchemaCompiler<z.ZodType> = ({ schema, httpPart }) => {
  if (httpPart !== 'params' && httpPart !== 'querystring') return () => true;
  return (data) => {
    const result = schema.safeParse(data);
    if (result.success) return { value: result.data };
    const issue = result.error.issues[0];
    const message = issue === undefined ? 'is not valid' : `${issue.path.map(String).join('.') || '(root)'}: ${issue.message}`;
    return { error: new HttpError(400, httpPart === 'params' ? 'invalid_id' : 'invalid_query', message) };
  };
};
