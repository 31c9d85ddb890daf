import * as fs from 'node:fs';
import * as path from 'node:path';

/**
 * The package's root folder: the nearest folder above this file with a package.json. Works from `src/` (tsx) and
 * from `dist/` alike, whatever folder the caller was moved to.
 */
export function repoRoot(from: string = __dirname): string {
  for (let dir = from; ; dir = path.dirname(dir)) {
    if (fs.existsSync(path.join(dir, 'package.json'))) return dir;
    if (path.dirname(dir) === dir) throw new Error(`no package.json above ${from}`);
  }
}
