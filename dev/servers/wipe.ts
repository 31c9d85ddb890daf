/**
 * Wiping a services directory for a fresh start (tests): everything in it but the directory itself and our lock,
 * and the external PostgreSQL data directory that belongs to it.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { LOCK_FILE, TAKEOVER_FILE } from './lock';
import { externalBaseFor, recordedPgLocation } from './os-user';

/** Empties `dir` (keeping the directory itself, its mode and our lock) and removes its external PG data dir. */
export function wipe(dir: string): void {
  if (dir === path.parse(dir).root || dir === os.homedir() || fs.existsSync(path.join(dir, '.git'))) {
    throw new Error(`refusing to wipe ${dir}`);
  }
  const external = [recordedPgLocation(dir), ...externalBaseFor(dir).map((b) => path.join(b, 'data'))];
  for (const dataDir of external) {
    if (!dataDir) continue;
    const base = path.dirname(dataDir);
    try {
      if (fs.lstatSync(base).isDirectory()) fs.rmSync(base, { recursive: true, force: true });
    } catch {
      // not there
    }
  }
  for (const entry of fs.readdirSync(dir)) {
    if (entry === LOCK_FILE || entry === TAKEOVER_FILE) continue;
    fs.rmSync(path.join(dir, entry), { recursive: true, force: true });
  }
}
