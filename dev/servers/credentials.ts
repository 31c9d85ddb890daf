/**
 * Secrets: the Redis and PostgreSQL passwords of a services directory (credentials.json, mode 0600), atomic
 * private-file writes, and the SCRAM-SHA-256 verifier PostgreSQL stores for a password. PostgreSQL has two roles:
 * `fleet_admin`, the superuser that manages the server, and `fleet`, the fleet's own login (see postgres.ts).
 */
import { createHash, createHmac, pbkdf2Sync, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { RunAs } from './os-user';

export interface Credentials {
  redisPassword: string;
  /** the fleet's role, `fleet` (DATABASE_URL) */
  postgresPassword: string;
  /** the superuser, `fleet_admin`: never in DATABASE_URL */
  postgresAdminPassword: string;
}

export const CREDENTIALS_FILE = 'credentials.json';

export function newPassword(): string {
  return randomBytes(24).toString('hex');
}

/** Writes `file` with mode 0600 (owned by `owner` when given), atomically. */
export function writePrivateFile(file: string, text: string, owner?: RunAs): void {
  const tmp = `${file}.${process.pid}.tmp`;
  fs.rmSync(tmp, { force: true });
  fs.writeFileSync(tmp, text, { mode: 0o600, flag: 'wx' });
  try {
    if (owner) fs.chownSync(tmp, owner.uid, owner.gid);
    fs.renameSync(tmp, file);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw err;
  }
}

/**
 * The passwords of `dir` from credentials.json (mode 0600), created or completed as needed. `created` lists
 * the passwords made up just now (none existed before).
 */
export function loadCredentials(dir: string): { creds: Credentials; created: Set<keyof Credentials> } {
  const file = path.join(dir, CREDENTIALS_FILE);
  let stored: Partial<Record<keyof Credentials, unknown>> = {};
  const st = fs.lstatSync(file, { throwIfNoEntry: false });
  if (st) {
    if (!st.isFile()) throw new Error(`${file} is not a regular file`);
    if ((st.mode & 0o077) !== 0) fs.chmodSync(file, 0o600);
    try {
      stored = JSON.parse(fs.readFileSync(file, 'utf8')) as typeof stored;
    } catch {
      stored = {};
    }
  }
  const created = new Set<keyof Credentials>();
  const pick = (key: keyof Credentials): string => {
    const v = stored[key];
    if (typeof v === 'string' && v !== '' && !/[\s"'\\]/.test(v)) return v;
    created.add(key);
    return newPassword();
  };
  const creds: Credentials = {
    redisPassword: pick('redisPassword'),
    postgresPassword: pick('postgresPassword'),
    postgresAdminPassword: pick('postgresAdminPassword'),
  };
  if (created.size > 0) writePrivateFile(file, `${JSON.stringify(creds, null, 2)}\n`);
  return { creds, created };
}

/** A SCRAM-SHA-256 verifier for `password`, as PostgreSQL stores it (so the password itself never reaches it). */
export function scramVerifier(password: string): string {
  const salt = randomBytes(16);
  const iterations = 4096;
  const salted = pbkdf2Sync(password, salt, iterations, 32, 'sha256');
  const clientKey = createHmac('sha256', salted).update('Client Key').digest();
  const storedKey = createHash('sha256').update(clientKey).digest();
  const serverKey = createHmac('sha256', salted).update('Server Key').digest();
  const b64 = (b: Buffer): string => b.toString('base64');
  return `SCRAM-SHA-256$${iterations}:${b64(salt)}$${b64(storedKey)}:${b64(serverKey)}`;
}
