/**
 * The previous release of a mixed-version chaos run (`--previous REF`): the project's source at REF, with the
 * dependencies its own lockfile names, built, under `<repo>/.fleet/releases/<commit>` (kept: the next run with the
 * same REF reuses it). Its `bin/fleet.js`, its consumer member and its producer run beside the current build's.
 */
import { execFile, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { repoRoot } from '../src/util';

export interface Release {
  /** what the run was given (a tag such as v0.1.0, or any commit) */
  readonly ref: string;
  readonly commit: string;
  /** package.json's version at that commit */
  readonly version: string;
  /** the built tree */
  readonly dir: string;
}

/** The current checkout as a release (its version and commit; `dir` is the repository). */
export function currentRelease(): Release {
  const dir = repoRoot();
  // a checkout with uncommitted changes says so: the run is of the working tree, not of the commit
  const dirty = git(['status', '--porcelain', '--untracked-files=no']) !== '';
  const commit = `${git(['rev-parse', 'HEAD'])}${dirty ? '+dirty' : ''}`;
  return { ref: 'HEAD', commit, version: packageVersion(dir), dir };
}

function git(args: readonly string[]): string {
  return execFileSync('git', ['-C', repoRoot(), ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
}

function packageVersion(dir: string): string {
  return (JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { version: string }).version;
}

/** Marks a finished build; its content is the commit built. */
const BUILT = '.fleet-release-built';

/**
 * Extracts REF's tree (git archive: no worktree registered, nothing in the repository changes), installs its locked
 * dependencies (the current node_modules when the lockfiles are the same file, else `npm ci` from the registry) and
 * builds it with its own TypeScript. Throws with a clear message when REF names no commit here.
 */
export function preparePrevious(ref: string, log: (line: string) => void): Release {
  let commit: string;
  try {
    commit = git(['rev-parse', '--verify', '--quiet', `${ref}^{commit}`]);
  } catch {
    throw new Error(`--previous: ${ref} names no commit in this repository (for a tag: git fetch --tags)`);
  }
  const dir = path.join(repoRoot(), '.fleet', 'releases', commit);
  const marker = path.join(dir, BUILT);
  if (fs.existsSync(marker) && fs.readFileSync(marker, 'utf8') === commit) {
    log(`previous release ${ref} (${commit.slice(0, 7)}): built already under ${path.relative(repoRoot(), dir)}`);
    return { ref, commit, version: packageVersion(dir), dir };
  }
  log(`previous release ${ref} (${commit.slice(0, 7)}): extracting, installing and building under ${path.relative(repoRoot(), dir)}`);
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  // every child's output to stderr: stdout is the report's
  const quiet = { stdio: ['ignore', 2, 2] as ['ignore', number, number] };
  execFileSync('sh', ['-c', 'git -C "$1" archive --format=tar "$2" | tar -x -C "$3"', 'sh', repoRoot(), commit, dir], quiet);
  const sameLock =
    fs.readFileSync(path.join(dir, 'package-lock.json'), 'utf8') === fs.readFileSync(path.join(repoRoot(), 'package-lock.json'), 'utf8');
  if (sameLock) {
    fs.symlinkSync(path.join(repoRoot(), 'node_modules'), path.join(dir, 'node_modules'), 'dir');
  } else {
    execFileSync('npm', ['ci', '--no-audit', '--no-fund', '--loglevel=error'], { cwd: dir, ...quiet });
  }
  execFileSync(process.execPath, [path.join(dir, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', path.join(dir, 'tsconfig.json')], {
    cwd: dir,
    ...quiet,
  });
  fs.writeFileSync(marker, commit);
  return { ref, commit, version: packageVersion(dir), dir };
}

/** `fleet migrate` of a release, as a process (never throws: its exit code and output). */
export function migrateProcess(release: Release, databaseUrl: string): Promise<{ code: number; stdout: string; stderr: string }> {
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH, DATABASE_URL: databaseUrl, REDIS_URL: 'redis://127.0.0.1:1', LOG_LEVEL: 'warn' };
  return new Promise((resolve) => {
    execFile(process.execPath, [path.join(release.dir, 'bin', 'fleet.js'), 'migrate'], { env, timeout: 120_000 }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, stdout, stderr });
    });
  });
}
