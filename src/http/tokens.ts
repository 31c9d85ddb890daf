/**
 * API tokens (`FLEET_API_TOKENS_FILE`): bearer tokens with scopes. Only the SHA-256 of each token is on disk:
 *
 *   [{"name": "ci-deployer", "sha256": "<64 hex>", "scopes": ["read", "events:write"]}]
 *
 * A token's name is recorded as the `actor` of every transition its events cause, so names are unique and may not
 * take the actors the fleet itself records (`sweep`, `producer`, `anonymous`). The file is read at start and again
 * on SIGHUP; a file that does not parse on reload leaves the tokens as they were (and says why).
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import * as fs from 'node:fs';
import { ACTOR_PATTERN, RESERVED_ACTORS } from '../events/schemas';

/**
 * - `read`: every GET of the API (and a read-only Bull Board);
 * - `events:write`: POST /api/events for ordinary lifecycle events;
 * - `events:admin`: besides those, forced teardown, `deployment.resolve`, `attempt.orphaned` and `attempt.expired`;
 * - `board`: Bull Board, including its write actions (retry, clean, pause, ...).
 */
export const SCOPES = ['read', 'events:write', 'events:admin', 'board'] as const;
export type Scope = (typeof SCOPES)[number];

export interface TokenEntry {
  readonly name: string;
  /** hex SHA-256 of the token */
  readonly sha256: string;
  readonly scopes: readonly Scope[];
}

export interface Principal {
  /** the token's name: the actor of the transitions its events cause */
  readonly name: string;
  readonly scopes: ReadonlySet<Scope>;
}

export class TokenFileError extends Error {
  readonly code = 'invalid_tokens_file';
  constructor(
    readonly file: string,
    readonly problems: readonly string[],
  ) {
    super(`${file}: ${problems.join('; ')}`);
    this.name = 'TokenFileError';
  }
}

/** Parses the file's text; throws `TokenFileError` naming every offending entry and field. */
export function parseTokenFile(text: string, file = 'FLEET_API_TOKENS_FILE'): TokenEntry[] {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new TokenFileError(file, [`must be JSON (${(err as Error).message})`]);
  }
  if (!Array.isArray(data)) throw new TokenFileError(file, ['must be a JSON array of {"name", "sha256", "scopes"}']);
  const problems: string[] = [];
  const entries: TokenEntry[] = [];
  const names = new Set<string>();
  const hashes = new Set<string>();
  data.forEach((item: unknown, i) => {
    const at = `[${i}]`;
    if (typeof item !== 'object' || item === null || Array.isArray(item)) {
      problems.push(`${at}: must be an object {"name", "sha256", "scopes"}`);
      return;
    }
    const { name, sha256, scopes, ...rest } = item as Record<string, unknown>;
    const before = problems.length;
    const extra = Object.keys(rest);
    if (extra.length > 0) problems.push(`${at}: unknown field(s): ${extra.map((k) => k.slice(0, 40)).join(', ')}`);
    if (typeof name !== 'string' || !ACTOR_PATTERN.test(name)) {
      problems.push(`${at}.name: must be 1-100 characters of A-Za-z0-9._:@-`);
    } else if (RESERVED_ACTORS.includes(name)) {
      problems.push(`${at}.name: "${name}" is reserved for the fleet's own actors (${RESERVED_ACTORS.join(', ')})`);
    } else if (names.has(name)) {
      problems.push(`${at}.name: "${name}" is used by another entry (names must be unique: they are recorded as actors)`);
    }
    if (typeof sha256 !== 'string' || !/^[0-9a-fA-F]{64}$/.test(sha256)) {
      problems.push(`${at}.sha256: must be the hex SHA-256 of the token (64 hex digits)`);
    } else if (hashes.has(sha256.toLowerCase())) {
      problems.push(`${at}.sha256: the same token is listed twice`);
    }
    if (!Array.isArray(scopes) || scopes.length === 0) {
      problems.push(`${at}.scopes: must be a non-empty array of ${SCOPES.join(', ')}`);
    } else {
      const unknown = scopes.filter((s) => !(SCOPES as readonly unknown[]).includes(s));
      if (unknown.length > 0) problems.push(`${at}.scopes: unknown scope(s) ${unknown.map((s) => JSON.stringify(s)).join(', ')} (known: ${SCOPES.join(', ')})`);
    }
    if (problems.length > before) return;
    names.add(name as string);
    hashes.add((sha256 as string).toLowerCase());
    entries.push({ name: name as string, sha256: (sha256 as string).toLowerCase(), scopes: [...new Set(scopes as Scope[])] });
  });
  if (problems.length > 0) throw new TokenFileError(file, problems);
  return entries;
}

/** The tokens in force; `authenticate` compares in constant time against every entry. */
export class TokenStore {
  private entries: ReadonlyArray<{ readonly digest: Buffer; readonly principal: Principal }> = [];

  constructor(readonly file: string) {
    this.reload();
  }

  /** Reads the file again. Throws `TokenFileError` (or the read error) and keeps the old tokens if it is bad. */
  reload(): number {
    let text: string;
    try {
      text = fs.readFileSync(this.file, 'utf8');
    } catch (err) {
      throw new TokenFileError(this.file, [`cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`]);
    }
    const parsed = parseTokenFile(text, this.file);
    this.entries = parsed.map((e) => ({
      digest: Buffer.from(e.sha256, 'hex'),
      principal: { name: e.name, scopes: new Set(e.scopes) },
    }));
    return this.entries.length;
  }

  get size(): number {
    return this.entries.length;
  }

  /** The token's principal, or null. Every entry is compared (no early exit), each in constant time. */
  authenticate(token: string): Principal | null {
    const digest = sha256(token);
    let found: Principal | null = null;
    for (const entry of this.entries) {
      if (timingSafeEqual(digest, entry.digest)) found = entry.principal;
    }
    return found;
  }
}

function sha256(value: string): Buffer {
  return createHash('sha256').update(value, 'utf8').digest();
}

/** A new random token (256 bits) and its file entry. The token is shown once; only its hash is kept. */
export function createToken(name: string, scopes: readonly string[]): { token: string; entry: TokenEntry } {
  const token = `lft_${randomBytes(32).toString('base64url')}`;
  const entry = { name, sha256: sha256(token).toString('hex'), scopes };
  // validate the entry exactly as the file will be validated
  const [checked] = parseTokenFile(JSON.stringify([entry]), '--name/--scopes');
  if (checked === undefined) throw new Error('token entry did not validate');
  return { token, entry: checked };
}
