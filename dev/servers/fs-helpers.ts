/** Small file-system and environment helpers shared by the dev/servers modules (no state of their own). */
import * as fs from 'node:fs';
import * as path from 'node:path';

export function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

export function errCode(err: unknown): string | undefined {
  return err instanceof Error && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

export function isExecutableFile(p: string): boolean {
  try {
    fs.accessSync(p, fs.constants.X_OK);
    return fs.statSync(p).isFile();
  } catch {
    return false;
  }
}

/** First executable `name` on PATH, then in `extraDirs`. Symlinks are NOT resolved. */
export function which(name: string, extraDirs: string[] = []): string | undefined {
  const dirs = [...(process.env['PATH'] ?? '').split(path.delimiter).filter(Boolean), ...extraDirs];
  for (const d of dirs) {
    const p = path.resolve(d, name);
    if (isExecutableFile(p)) return p;
  }
  return undefined;
}

export function readText(file: string): string | undefined {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

export function realpathOrSelf(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return path.resolve(p);
  }
}

/** Last `bytes` of `file` from `from` on (to explain a failed start). */
export function logTail(file: string, from = 0, bytes = 2000): string {
  try {
    const text = fs.readFileSync(file, 'utf8').slice(from);
    return text.length > bytes ? `...${text.slice(-bytes)}` : text;
  } catch {
    return '';
  }
}

export function fileSize(file: string): number {
  try {
    return fs.statSync(file).size;
  } catch {
    return 0;
  }
}

/** Keep one previous log per service so logs in a persistent dir do not grow forever. */
export function rotateLog(file: string): void {
  try {
    fs.renameSync(file, `${file}.1`);
  } catch {
    // no previous log
  }
}

export function readPid(file: string): number | undefined {
  const first = readText(file)?.split('\n')[0]?.trim();
  const pid = first ? Number(first) : NaN;
  return Number.isInteger(pid) && pid > 0 ? pid : undefined;
}
