/**
 * API tokens (`FLEET_API_TOKENS_FILE`): bearer tokens with scopes. Only the SHA-256 of each token is on disk:
 *
 *   [{"name": "ci-deployer", "sha256": "<64 hex>", "scopes": ["read", "events:write"]}]
 *
 * A token's name is recorded as the `actor` of every transition its events cause, so names are unique and may not
 * take the actors the fleet itself records (`sweep`, `producer`, `anonymous`). The file is read at start and again
 * on SIGHUP; a file that does not parse on reload leaves the tokens as they were (and says why).
 *
 * Its permissions are checked as ssh checks a key's: a file anyone but its owner can write is refused (they could
 * give themselves any scope), and one others can read is loaded with a warning (the hashes do not give the tokens
 * away, but the file names every token and its scopes: it should be private).
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
      if (unknown.length > 0)
        problems.push(`${at}.scopes: unknown scope(s) ${unknown.map((s) => JSON.stringify(s)).join(', ')} (known: ${SCOPES.join(', ')})`);
    }
    if (problems.length > before) return;
    names.add(name as string);
    hashes.add((sha256 as string).toLowerCase());
    entries.push({ name: name as string, sha256: (sha256 as string).toLowerCase(), scopes: [...new Set(scopes as Scope[])] });
  });
  if (problems.length > 0) throw new TokenFileError(file, problems);
  return entries;
}

export interface TokenStoreOptions {
  /** told at every load of a file that its group or others can read (default: nobody) */
  readonly warn?: (message: string, fields: { readonly file: string; readonly mode: string }) => void;
}

/** The tokens in force; `authenticate` compares in constant time against every entry. */
export class TokenStore {
  private entries: ReadonlyArray<{ readonly digest: Buffer; readonly principal: Principal }> = [];

  constructor(
    readonly file: string,
    private readonly options: TokenStoreOptions = {},
  ) {
    this.reload();
  }

  /**
   * Reads the file again. Throws `TokenFileError` (or the read error) and keeps the old tokens if it is bad, or
   * writable by anyone but its owner.
   */
  reload(): number {
    let text: string;
    let mode: number;
    try {
      // the permissions of the file that is read (opened once: not a file swapped in between a check and the read)
      const fd = fs.openSync(this.file, 'r');
      try {
        mode = fs.fstatSync(fd).mode & 0o777;
        text = fs.readFileSync(fd, 'utf8');
      } finally {
        fs.closeSync(fd);
      }
    } catch (err) {
      throw new TokenFileError(this.file, [`cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`]);
    }
    const octal = `0${mode.toString(8).padStart(3, '0')}`;
    if ((mode & 0o022) !== 0) {
      throw new TokenFileError(this.file, [
        `is writable by ${(mode & 0o020) !== 0 ? 'its group' : 'others'} (mode ${octal}): anyone who can write it can give themselves any scope; chmod go-w ${this.file}`,
      ]);
    }
    if ((mode & 0o044) !== 0) {
      this.options.warn?.(
        `API tokens file ${this.file} is readable by ${(mode & 0o004) !== 0 ? 'others' : 'its group'} (mode ${octal}): make it private (chmod 600 ${this.file})`,
        { file: this.file, mode: octal },
      );
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
