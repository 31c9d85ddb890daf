/**
 * The migration linter (issue 33, part 2): `node dist/dev/lint-migrations.js [dir]` runs squawk over the SQL each
 * migration's up() sends; the real migrations pass, and a migration that would hold a long lock on a live table
 * fails it, naming the rule. The unsafe migrations are compiled-style modules written to a temporary directory.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { expect } from 'chai';
import { MIGRATIONS } from '../../src/entities';
import { repoRoot } from '../../src/util';

const run = promisify(execFile);
const SCRIPT = path.join(repoRoot(), 'dist', 'dev', 'lint-migrations.js');

/** Runs the linter; its exit code and output, whatever the code. */
async function lint(args: string[]): Promise<{ code: number; output: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [SCRIPT, ...args], { cwd: repoRoot(), timeout: 60_000 });
    return { code: 0, output: stdout + stderr };
  } catch (err) {
    const failed = err as { code?: number; stdout?: string; stderr?: string };
    return { code: failed.code ?? -1, output: (failed.stdout ?? '') + (failed.stderr ?? '') };
  }
}

/** A migration module as tsc emits one: `statements` are what its up() sends, one q.query() each. */
function migrationModule(name: string, statements: string[], transaction?: false): string {
  const body = statements.map((s) => `    await q.query(${JSON.stringify(s)});`).join('\n');
  return `exports.${name} = class {
  name = ${JSON.stringify(name)};${transaction === false ? '\n  transaction = false;' : ''}
  async up(q) {
${body}
  }
  async down() {}
};
`;
}

const TIMEOUTS = [`SET LOCAL lock_timeout = '2s'`, `SET LOCAL statement_timeout = '10s'`];

const UNSAFE: Array<{ what: string; rule: string; statements: string[] }> = [
  {
    what: 'a non-concurrent index on deployments (blocks every write while it builds)',
    rule: 'require-concurrent-index-creation',
    statements: [...TIMEOUTS, `CREATE INDEX deployments_name_idx ON deployments (name)`],
  },
  {
    what: 'ADD COLUMN with a volatile default (rewrites the table under ACCESS EXCLUSIVE)',
    rule: 'adding-field-with-default',
    statements: [...TIMEOUTS, `ALTER TABLE deployments ADD COLUMN token uuid NOT NULL DEFAULT gen_random_uuid()`],
  },
  {
    what: 'SET NOT NULL without the check-constraint dance (scans the table under ACCESS EXCLUSIVE)',
    rule: 'adding-not-nullable-field',
    statements: [...TIMEOUTS, `ALTER TABLE deployments ALTER COLUMN endpoint_url SET NOT NULL`],
  },
  {
    what: 'a CHECK constraint validated at once (scans the table, blocking writes)',
    rule: 'constraint-missing-not-valid',
    statements: [...TIMEOUTS, `ALTER TABLE deployments ADD CONSTRAINT deployments_name_check CHECK (name <> '')`],
  },
  {
    what: 'a concurrent index build inside the transaction TypeORM opens (PostgreSQL refuses it)',
    rule: 'ban-concurrent-index-creation-in-transaction',
    statements: [`CREATE INDEX CONCURRENTLY IF NOT EXISTS deployments_name_idx ON deployments (name)`],
  },
  {
    what: 'an ACCESS EXCLUSIVE lock with no lock_timeout (the fleet would queue behind it while it waits)',
    rule: 'require-lock-timeout',
    statements: [`ALTER TABLE deployments ADD COLUMN note text`],
  },
];

describe('the migration linter (npm run lint:migrations)', function () {
  this.timeout(120_000);
  let dir: string;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'unsafe-migrations-'));
  });

  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('passes every real migration', async () => {
    const { code, output } = await lint([]);
    expect(code, output).to.equal(0);
    expect(output).to.contain(`${MIGRATIONS.length} migrations pass squawk: ${MIGRATIONS.map((m) => m.name).join(', ')}`);
  });

  for (const unsafe of UNSAFE) {
    it(`fails ${unsafe.what}, naming ${unsafe.rule}`, async () => {
      fs.writeFileSync(path.join(dir, '1799999999999-unsafe.js'), migrationModule('Unsafe1799999999999', unsafe.statements));
      const { code, output } = await lint([dir]);
      expect(code, output).to.equal(1);
      expect(output).to.contain(unsafe.rule).and.to.contain('Unsafe1799999999999.sql');
    });
  }

  it('passes the same index built concurrently outside a transaction, with its timeouts', async () => {
    const statements = [
      `SET lock_timeout = '1min'`,
      `SET statement_timeout = '30min'`,
      `CREATE INDEX CONCURRENTLY IF NOT EXISTS deployments_name_idx ON deployments (name)`,
    ];
    fs.writeFileSync(path.join(dir, '1799999999999-safe.js'), migrationModule('Safe1799999999999', statements, false));
    const { code, output } = await lint([dir]);
    expect(code, output).to.equal(0);
  });

  it('refuses a migration that changes the schema other than through q.query(), which it cannot read', async () => {
    const module = `exports.Builder1799999999999 = class { async up(q) { await q.createIndex('deployments', {}); } async down() {} };\n`;
    fs.writeFileSync(path.join(dir, '1799999999999-builder.js'), module);
    const { code, output } = await lint([dir]);
    expect(code).to.equal(2);
    expect(output).to.contain('lint-migrations reads SQL from q.query() only; this migration uses q.createIndex');
  });

  it('refuses a path that does not exist, and a directory without migrations', async () => {
    expect(await lint([path.join(dir, 'nowhere')])).to.include({ code: 2 });
    const empty = await lint([dir]);
    expect(empty.code).to.equal(2);
    expect(empty.output).to.contain('no migrations found');
  });
});
