/**
 * Who may call what over HTTP (docs/contract.md, "HTTP", Auth): every route declares the scope it needs
 * (`config.scope`), and the gate lets a request in with it or answers it: 429 while its address is throttled, 401
 * without or with wrong credentials, 403 without the scope. The credentials' own rules (the header, the scopes, the
 * throttle) are in auth.ts.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { FleetConfig } from '../config';
import type { Logger } from '../log';
import { AuthThrottle, hasScope, readAccess, type Access, type Credentials } from './auth';
import { TokenStore, type Scope } from './tokens';

declare module 'fastify' {
  interface FastifyContextConfig {
    /** what a route needs: a scope, or null for an open route. Every route of ours says; see `scopeOf`. */
    scope?: Scope | null;
    /** how a caller of the route may authenticate (default `Bearer`) */
    challenge?: Challenge;
  }
}

/**
 * How a caller proves who it is: a bearer token (the API), basic auth (Bull Board, which a browser opens), or either
 * (`GET /api/watch`, which a browser's EventSource opens with the page's basic-auth credentials: a token as the
 * password). Basic with a token as the password is a token wherever it is sent (auth.ts); what differs is the 401's
 * challenge, and that the board takes its own pair.
 */
export type Challenge = 'Bearer' | 'Basic' | 'Bearer or Basic';

const CHALLENGES: Record<Challenge, string[]> = {
  Bearer: ['Bearer realm="lifecycle-fleet"'],
  Basic: ['Basic realm="lifecycle-fleet", charset="UTF-8"'],
  // two header lines: a browser answers the Basic one with the credentials it holds for the realm
  'Bearer or Basic': ['Bearer realm="lifecycle-fleet"', 'Basic realm="lifecycle-fleet", charset="UTF-8"'],
};

export interface Gate {
  readonly creds: Credentials;
  /** Lets the request in with `scope`, or answers it (429, 401, 403). Returns whether it may go on. */
  admit(request: FastifyRequest, reply: FastifyReply, scope: Scope, challenge: Challenge): boolean;
  /** What an admitted request was let in as (read by the handlers and the rate limiter). */
  accessOf(request: FastifyRequest): Access | undefined;
}

/** The credentials the server checks: the given tokens, else FLEET_API_TOKENS_FILE's (null: the API is open). */
export function credentialsOf(config: FleetConfig, tokens: TokenStore | null | undefined, logger: Logger): Credentials {
  return {
    tokens:
      tokens !== undefined
        ? tokens
        : config.apiTokensFile === null
          ? null
          : new TokenStore(config.apiTokensFile, { warn: (message, fields) => logger.warn(fields, message) }),
    boardUser: config.boardUser,
    boardPassword: config.boardPassword,
  };
}

export function createGate(creds: Credentials, throttle: AuthThrottle = new AuthThrottle()): Gate {
  const accesses = new WeakMap<FastifyRequest, Access>();
  const refuse = (reply: FastifyReply, status: number, code: string, message: string): false => {
    void reply.status(status).send({ error: { code, message } });
    return false;
  };
  const admit = (request: FastifyRequest, reply: FastifyReply, scope: Scope, challenge: Challenge): boolean => {
    const header = request.headers.authorization;
    const access: Access =
      challenge !== 'Basic' && creds.tokens === null
        ? { kind: 'open' } // no tokens file: the API is open, whatever the request sends
        : challenge === 'Basic' && header === undefined
          ? { kind: 'anonymous' }
          : readAccess(header, creds);
    // An address past its failures is refused whatever it sends, so guessing the board password gets nowhere; but
    // a valid token (256 random bits: not guessable), as a bearer token or as the board's basic-auth password, on the
    // API and on the board, always gets through, so that callers sharing an address (a proxy, a NAT) cannot be
    // locked out by someone else's wrong guesses.
    const wait = access.kind === 'token' ? null : throttle.retryAfterS(request.ip);
    if (wait !== null) {
      void reply.header('retry-after', String(wait));
      return refuse(reply, 429, 'too_many_failed_authentications', `too many failed authentications from this address; retry in ${wait} s`);
    }
    accesses.set(request, access);
    if (access.kind === 'invalid' || access.kind === 'anonymous') {
      if (access.kind === 'invalid') throttle.fail(request.ip);
      const challenges = CHALLENGES[challenge];
      void reply.header('www-authenticate', challenges.length === 1 ? challenges[0] : challenges);
      const message =
        access.kind === 'invalid'
          ? 'the credentials are not valid'
          : challenge === 'Bearer or Basic'
            ? 'send Authorization: Bearer <token>, or basic auth with the token as the password (see `fleet token create`)'
            : 'send Authorization: Bearer <token> (see `fleet token create`)';
      return refuse(reply, 401, 'unauthorized', message);
    }
    // on the board, its basic-auth pair and the `board` scope may do everything, reading included
    const boardWide = challenge === 'Basic' && (access.kind === 'board_user' || (access.kind === 'token' && access.principal.scopes.has('board')));
    if (!hasScope(access, scope) && !boardWide) return refuse(reply, 403, 'forbidden', `this token lacks the "${scope}" scope`);
    return true;
  };
  return { creds, admit, accessOf: (request) => accesses.get(request) };
}

/**
 * The scope a request needs: its route's `config.scope`. A request that matched none of our routes (a 404) still
 * needs `read` when its path, decoded, is under /api/: routes cannot be probed without a token.
 */
function scopeOf(request: FastifyRequest): Scope | null {
  const configured = (request.routeOptions.config as { scope?: Scope | null } | undefined)?.scope;
  if (configured !== undefined) return configured;
  if (request.routeOptions.url !== undefined) return null; // a route of a plugin (Bull Board guards its own)
  let path: string;
  try {
    path = decodeURIComponent(new URL(request.url, 'http://localhost').pathname);
  } catch {
    path = request.url;
  }
  return /^\/*api(\/|$)/i.test(path) ? 'read' : null;
}

/**
 * Every request passes the gate for its route's scope. The scope comes from the route that matched, never from the
 * URL's text: the router decodes and normalises paths (`/%61pi/events`, absolute-form targets) that a prefix test on
 * `request.url` would miss.
 */
export function guardRoutes(app: FastifyInstance, gate: Gate): void {
  app.addHook('onRequest', async (request, reply) => {
    const scope = scopeOf(request);
    if (scope === null) return undefined;
    const challenge = (request.routeOptions.config as { challenge?: Challenge } | undefined)?.challenge ?? 'Bearer';
    if (!gate.admit(request, reply, scope, challenge)) return reply;
    return undefined;
  });
}
