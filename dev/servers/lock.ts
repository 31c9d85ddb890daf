/**
 * Ownership of a services directory: one starter at a time. `owner.lock` is created with O_EXCL and taken over
 * (under `owner.lock.takeover`) only when its process is dead; the `owner.json` of older versions is honoured.
 * `claimed` holds the directories this process is starting or running services in.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { sleep } from '../../src/util';
import { errCode, readPid } from './fs-helpers';
import { isProcessAlive, procStartTime } from './process';

export interface LockRecord {
  pid: number;
  /** process start time (Linux), tells a reused pid apart */
  start: string | null;
  /** tells this lock apart from any other lock of the same process */
  token: string;
}

export const LOCK_FILE = 'owner.lock';
/** held (created with O_EXCL) only for the few synchronous steps that remove a stale lock */
export const TAKEOVER_FILE = 'owner.lock.takeover';
/** written by versions before owner.lock; honoured so that an old, still running owner is not trampled */
const LEGACY_OWNER_FILE = 'owner.json';

/** dirs this process is starting or running services in */
export const claimed = new Set<string>();

interface LockState {
  raw: string;
  ino: number;
  mtimeMs: number;
  /** undefined: empty or unparsable (being written right now, or garbage) */
  rec?: LockRecord;
}

function readLock(file: string): LockState | undefined {
  let st: fs.Stats;
  let raw: string;
  try {
    st = fs.statSync(file);
    raw = fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
  let rec: LockRecord | undefined;
  try {
    const v = JSON.parse(raw) as Partial<LockRecord>;
    if (typeof v.pid === 'number' && typeof v.token === 'string') rec = { pid: v.pid, start: v.start ?? null, token: v.token };
  } catch {
    rec = undefined;
  }
  return { raw, ino: st.ino, mtimeMs: st.mtimeMs, rec };
}

/** Is the process that wrote `rec` still running (and not another process that got its pid)? */
function holderAlive(rec: { pid: number; start?: string | null }): boolean {
  // our own pid: a lock a previous instance in this process failed to remove (`claimed` rules out a live one)
  if (rec.pid === process.pid || !isProcessAlive(rec.pid)) return false;
  const start = procStartTime(rec.pid);
  return rec.start === undefined || rec.start === null || start === null || start === rec.start;
}

function inUse(dir: string, pid: number): Error {
  return new Error(`local services in ${dir} are in use by process ${pid}; stop it first or use another directory`);
}

/** Runs `fn` (synchronous, short) holding the takeover file of `dir`. */
async function underTakeoverLock(dir: string, fn: () => void): Promise<void> {
  const file = path.join(dir, TAKEOVER_FILE);
  for (let attempt = 1; ; attempt++) {
    try {
      fs.writeFileSync(file, `${process.pid}\n`, { flag: 'wx' });
      break;
    } catch (err) {
      if (errCode(err) !== 'EEXIST') throw err;
    }
    // it is held for a few synchronous file operations: one that stays belongs to a process killed meanwhile
    const holder = readPid(file);
    const age = Date.now() - (fs.statSync(file, { throwIfNoEntry: false })?.mtimeMs ?? Date.now());
    if ((holder !== undefined && holder !== process.pid && !isProcessAlive(holder)) || age > 10_000) {
      fs.rmSync(file, { force: true });
    } else if (attempt > 1000) {
      throw new Error(`${file} stays in the way; remove it if no other process is starting services in ${dir}`);
    } else {
      await sleep(10);
    }
  }
  try {
    fn();
  } finally {
    fs.rmSync(file, { force: true });
  }
}

/**
 * Makes this process the owner of `dir`: creates `owner.lock` with O_EXCL. A lock whose process is dead is
 * removed, under the takeover file and only if it is still the very file found stale, then creation is tried
 * again; so of any number of concurrent starters exactly one wins, and the others fail with "in use by N".
 */
export async function acquireLock(dir: string): Promise<LockRecord> {
  const file = path.join(dir, LOCK_FILE);
  const mine: LockRecord = { pid: process.pid, start: procStartTime(process.pid), token: randomBytes(12).toString('hex') };
  for (let attempt = 1; attempt <= 1000; attempt++) {
    try {
      const fd = fs.openSync(file, 'wx', 0o644);
      try {
        fs.writeSync(fd, `${JSON.stringify(mine)}\n`);
      } finally {
        fs.closeSync(fd);
      }
      if (readLock(file)?.rec?.token === mine.token) return mine; // re-check after writing
      continue;
    } catch (err) {
      if (errCode(err) !== 'EEXIST') throw err;
    }
    const held = readLock(file);
    if (held === undefined) continue; // released meanwhile
    if (held.rec === undefined) {
      // created but not written yet (a writer is between open and write): give it a moment
      if (Date.now() - held.mtimeMs < 5000) {
        await sleep(10);
        continue;
      }
    } else if (holderAlive(held.rec)) {
      throw inUse(dir, held.rec.pid);
    }
    await underTakeoverLock(dir, () => {
      const now = readLock(file);
      if (now?.ino === held.ino && now.raw === held.raw) fs.rmSync(file, { force: true });
    });
  }
  throw new Error(`could not take ${file}`);
}

/** Removes our lock (synchronous: also used on process exit). */
export function releaseLock(dir: string, token: string): void {
  const file = path.join(dir, LOCK_FILE);
  if (readLock(file)?.rec?.token === token) fs.rmSync(file, { force: true });
}

/** Throws if an older version of this module, still running, owns `dir`; else removes its record. */
export function checkLegacyOwner(dir: string): void {
  const file = path.join(dir, LEGACY_OWNER_FILE);
  let rec: { pid?: unknown; start?: unknown };
  try {
    rec = JSON.parse(fs.readFileSync(file, 'utf8')) as { pid?: unknown; start?: unknown };
  } catch {
    fs.rmSync(file, { force: true });
    return;
  }
  if (typeof rec.pid === 'number' && holderAlive({ pid: rec.pid, start: typeof rec.start === 'string' ? rec.start : null })) {
    throw inUse(dir, rec.pid);
  }
  fs.rmSync(file, { force: true });
}
