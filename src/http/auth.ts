/**
 * Who is calling, and what they may do (docs/contract.md, "HTTP", Auth): the `Authorization` header read once per
 * request into an `Access`, the scope each event needs, and a throttle on failed authentications per client
 * address. Schemes (`Bearer`, `Basic`) are matched case-insensitively (RFC 9110, 11.1).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { eventScope, isEventName } from '../events/schemas';
import type { Principal, Scope, TokenStore } from './tokens';

export type Access =
  /** no tokens file: the API is open (loopback only; the config refuses it elsewhere) */
  | { readonly kind: 'open' }
  | { readonly kind: 'token'; readonly principal: Principal }
  /** Bull Board's basic-auth pair (FLEET_BOARD_USER/FLEET_BOARD_PASSWORD): the whole board, no API */
  | { readonly kind: 'board_user' }
  /** no credentials sent */
  | { readonly kind: 'anonymous' }
  /** credentials sent, and wrong */
  | { readonly kind: 'invalid' };

export interface Credentials {
  readonly tokens: TokenStore | null;
  readonly boardUser: string | null;
  readonly boardPassword: string | null;
}

/**
 * Reads the header. A bearer token, or a basic-auth pair: the board's pair, or any user name with a token as the
 * password (so a browser can open the board with a token).
 */
export function readAccess(header: string | undefined, creds: Credentials): Access {
  if (header === undefined || header.trim() === '') return creds.tokens === null ? { kind: 'open' } : { kind: 'anonymous' };
  const match = /^\s*(bearer|basic)\s+(\S+)\s*$/i.exec(header);
  if (match === null) return { kind: 'invalid' };
  const scheme = (match[1] ?? '').toLowerCase();
  const value = match[2] ?? '';
  if (scheme === 'bearer') {
    const principal = creds.tokens?.authenticate(value) ?? null;
    return principal === null ? { kind: 'invalid' } : { kind: 'token', principal };
  }
  const decoded = Buffer.from(value, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return { kind: 'invalid' };
  const user = decoded.slice(0, colon);
  const password = decoded.slice(colon + 1);
  if (creds.boardUser !== null && creds.boardPassword !== null) {
    // evaluate both halves: no early exit that tells which one was wrong
    const userOk = sameSecret(user, creds.boardUser);
    const passwordOk = sameSecret(password, creds.boardPassword);
    if (userOk && passwordOk) return { kind: 'board_user' };
  }
  const principal = creds.tokens?.authenticate(password) ?? null;
  return principal === null ? { kind: 'invalid' } : { kind: 'token', principal };
}

export function hasScope(access: Access, scope: Scope): boolean {
  switch (access.kind) {
    case 'open':
      return true;
    case 'token':
      // events:admin is everything events:write is, and more
      return access.principal.scopes.has(scope) || (scope === 'events:write' && access.principal.scopes.has('events:admin'));
    default:
      return false;
  }
}

/**
 * The scope an event needs at the intake, as its catalog entry says (src/events/catalog.ts); `events:write` for a
 * name that is no event (the intake refuses it as `unknown_event` once the caller may send events at all).
 */
export function scopeForEvent(name: unknown, data: unknown): Scope {
  return isEventName(name) ? eventScope(name, data) : 'events:write';
}

function sameSecret(given: string, expected: string): boolean {
  // compare digests: equal length, constant time, and no length leak
  const a = createHash('sha256').update(given).digest();
  const b = createHash('sha256').update(expected).digest();
  return timingSafeEqual(a, b);
}

/**
 * Failed authentications per client address, in fixed windows: past `maxFailures` in a window, the address gets
 * 429 for the rest of it, whatever it sends (a right token included), so guessing is slow. In memory, per process;
 * the number of addresses tracked is bounded (the oldest window is dropped first).
 */
export class AuthThrottle {
  private readonly windows = new Map<string, { failures: number; endsAt: number }>();

  constructor(
    private readonly maxFailures = 10,
    private readonly windowMs = 60_000,
    private readonly now: () => number = Date.now,
    private readonly maxAddresses = 50_000,
  ) {}

  /** Seconds until the address may try again, or null when it may try now. */
  retryAfterS(address: string): number | null {
    const w = this.windows.get(address);
    if (w === undefined) return null;
    const left = w.endsAt - this.now();
    if (left <= 0) {
      this.windows.delete(address);
      return null;
    }
    return w.failures >= this.maxFailures ? Math.ceil(left / 1000) : null;
  }

  fail(address: string): void {
    const now = this.now();
    const w = this.windows.get(address);
    if (w !== undefined && w.endsAt > now) {
      w.failures++;
      return;
    }
    if (this.windows.size >= this.maxAddresses) {
      const oldest = this.windows.keys().next();
      if (oldest.done !== true) this.windows.delete(oldest.value);
    }
    this.windows.delete(address);
    this.windows.set(address, { failures: 1, endsAt: now + this.windowMs });
  }
}
