/**
 * Lints the migrations with squawk (https://squawkhq.com), so a migration that would hold a long lock on a live table
 * fails CI (`npm run lint:migrations`, run by `pretest`).
 *
 *   node dist/dev/lint-migrations.js [dir-or-file.js ...]
 *
 * By default every compiled migration in dist/src/entities/schema/migrations. Our migrations are TypeScript classes
 * calling `q.query(sql)`, so each one's up() is run against a recorder that only collects the SQL text it is given
 * (extraction, not a database: it answers every query with no rows, as an empty database would, so a statement behind
 * a condition on such an answer is linted on that path only). One .sql file per migration is written, between
 * BEGIN and COMMIT unless the migration says `transaction = false` (TypeORM then runs it outside a transaction), so
 * squawk's transaction rules see what PostgreSQL will; then squawk runs over them with the repository's .squawk.toml.
 * down() is not linted: undoing is an operator's deliberate act, and dropping is what it is for.
 *
 * Exits 0 when squawk finds nothing, 1 with squawk's report when it finds violations, 2 on a usage error.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { MigrationInterface, QueryRunner } from 'typeorm';
import { repoRoot } from '../src/util';

const DEFAULT_DIR = path.join(__dirname, '..', 'src', 'entities', 'schema', 'migrations');

/** The SQL one migration's up() sends, and whether TypeORM wraps it in a transaction. */
export interface ExtractedMigration {
  readonly name: string;
  readonly transaction: boolean;
  readonly statements: readonly string[];
}

/** A QueryRunner that records what `query()` is given; any other use names itself instead of passing unlinted. */
function recordingRunner(statements: string[]): QueryRunner {
  const query = (text: string): Promise<unknown[]> => {
    statements.push(text.trim());
    return Promise.resolve([]);
  };
  const runner = new Proxy(
    {},
    {
      get(_target, prop) {
        if (prop === 'query') return query;
        throw new Error(`lint-migrations reads SQL from q.query() only; this migration uses q.${String(prop)}`);
      },
    },
  );
  return runner as QueryRunner;
}

function isMigrationClass(value: unknown): value is new () => MigrationInterface {
  return typeof value === 'function' && typeof (value.prototype as Partial<MigrationInterface> | undefined)?.up === 'function';
}

/** The migration classes a compiled module exports. */
async function migrationsIn(file: string): Promise<MigrationInterface[]> {
  const exports = (await import(path.resolve(file))) as Record<string, unknown>;
  return Object.values(exports)
    .filter(isMigrationClass)
    .map((M) => new M());
}

export async function extractMigrations(files: readonly string[]): Promise<ExtractedMigration[]> {
  const extracted: ExtractedMigration[] = [];
  for (const file of files) {
    for (const migration of await migrationsIn(file)) {
      const statements: string[] = [];
      await migration.up(recordingRunner(statements));
      extracted.push({ name: migration.name ?? migration.constructor.name, transaction: migration.transaction !== false, statements });
    }
  }
  return extracted;
}

/** The squawk-cli release the migrations are linted with. */
export const SQUAWK_VERSION = '2.66.0';

/**
 * squawk's binary, installed from the npm registry into `.fleet/squawk/<version>` on first use (as dev/runtimes.ts
 * installs Node 22 and 24). Not a devDependency: squawk-cli's platform binaries are optional dependencies, and npm
 * records in package-lock.json only those the registry it resolves against serves, so a lockfile written against a
 * mirror that lacks the other platforms' packages fails `npm ci` everywhere ("Missing ... from lock file").
 */
function squawkBinary(): string {
  const prefix = path.join(repoRoot(), '.fleet', 'squawk', SQUAWK_VERSION);
  const bin = path.join(prefix, 'node_modules', '.bin', 'squawk');
  // the launcher is there without its platform binary when the optional package did not install: say so, rather
  // than read squawk's failure to start as a finding
  const works = () => spawnSync(bin, ['--version'], { encoding: 'utf8' }).status === 0;
  if (fs.existsSync(bin) && works()) return bin;
  const args = ['install', '--no-save', '--no-package-lock', '--no-audit', '--no-fund', '--prefix', prefix, `squawk-cli@${SQUAWK_VERSION}`];
  const installed = spawnSync('npm', args, { encoding: 'utf8' });
  if (installed.status !== 0 || !fs.existsSync(bin) || !works()) {
    throw new Error(`npm ${args.join(' ')} failed (exit ${String(installed.status)}):\n${(installed.stderr ?? '').slice(-2000)}`);
  }
  return bin;
}

/** The SQL file squawk reads for one migration: what PostgreSQL will be sent, in its transaction if it has one. */
export function sqlFileText(m: ExtractedMigration): string {
  const body = m.statements.map((s) => `${s};\n`).join('');
  return m.transaction ? `BEGIN;\n${body}COMMIT;\n` : body;
}

/** The compiled migration modules named by the arguments (files, or directories of them), in name order. */
function migrationFiles(args: readonly string[]): string[] {
  return (args.length > 0 ? args : [DEFAULT_DIR]).flatMap((arg) => {
    const full = path.resolve(arg);
    if (!fs.statSync(full).isDirectory()) return [full];
    return fs
      .readdirSync(full)
      .filter((f) => f.endsWith('.js'))
      .sort()
      .map((f) => path.join(full, f));
  });
}

async function main(): Promise<number> {
  const args = process.argv.slice(2);
  const missing = args.find((a) => !fs.existsSync(a));
  if (missing !== undefined) {
    process.stderr.write(`lint-migrations: no such file or directory: ${missing}\nusage: node dist/dev/lint-migrations.js [dir-or-file.js ...]\n`);
    return 2;
  }
  const migrations = await extractMigrations(migrationFiles(args));
  if (migrations.length === 0) {
    process.stderr.write(`lint-migrations: no migrations found in ${args.join(' ') || DEFAULT_DIR}\n`);
    return 2;
  }
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'lint-migrations-'));
  try {
    const sqlFiles = migrations.map((m) => {
      const file = path.join(out, `${m.name}.sql`);
      fs.writeFileSync(file, sqlFileText(m));
      return file;
    });
    const root = repoRoot();
    const squawk = spawnSync(squawkBinary(), ['--config', path.join(root, '.squawk.toml'), ...sqlFiles], {
      encoding: 'utf8',
    });
    if (squawk.error !== undefined) throw squawk.error;
    process.stdout.write(squawk.stdout);
    process.stderr.write(squawk.stderr);
    if (squawk.status !== 0) {
      process.stderr.write(`lint-migrations: squawk found migrations that are unsafe on a live table (exit ${String(squawk.status)})\n`);
      return 1;
    }
    process.stdout.write(`lint-migrations: ${migrations.length} migrations pass squawk: ${migrations.map((m) => m.name).join(', ')}\n`);
    return 0;
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
}

if (require.main === module) {
  main().then(
    (code) => (process.exitCode = code),
    (err: unknown) => {
      process.stderr.write(`lint-migrations: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exitCode = 2;
    },
  );
}
