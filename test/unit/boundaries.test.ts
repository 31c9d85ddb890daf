/**
 * The architecture's import rules are enforced by `npm run lint` (eslint.config.mjs). This lints real files of the
 * product with one wrong import added, and checks that each breach is reported with the rule that names it; and
 * that the tree as it is passes.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'chai';
import { ESLint } from 'eslint';
import { repoRoot } from '../../src/util';

describe('layer boundaries (lint)', function () {
  this.timeout(120_000);
  const root = repoRoot();
  const eslint = new ESLint({ cwd: root });

  async function breaches(file: string, injected: string): Promise<Array<{ rule: string | null; message: string }>> {
    const filePath = path.join(root, file);
    const text = `${injected}\n${fs.readFileSync(filePath, 'utf8')}`;
    const [result] = await eslint.lintText(text, { filePath });
    return (result?.messages ?? []).map((m) => ({ rule: m.ruleId, message: m.message }));
  }

  const cases: Array<[string, string, string, string, RegExp]> = [
    [
      'the machine importing persistence',
      'src/machine/decide.ts',
      "import { Deployment } from '../entities';\nexport const _probe = Deployment;",
      'import-x/no-restricted-paths',
      /src\/machine may not import src\/entities/,
    ],
    [
      'persistence importing a service',
      'src/entities/schema/migrate.ts',
      "import { Sweeper } from '../../services/sweep/sweeper';\nexport const _probe = Sweeper;",
      'import-x/no-restricted-paths',
      /src\/entities may not import src\/services/,
    ],
    [
      'persistence importing BullMQ',
      'src/entities/schema/migrate.ts',
      "import { Queue } from 'bullmq';\nexport const _probe = Queue;",
      'no-restricted-imports',
      /persistence knows no BullMQ/,
    ],
    [
      'a service importing a worker',
      'src/services/sweep/sweeper.ts',
      "import { SweepWorker } from '../../workers/sweep-worker';\nexport const _probe = SweepWorker;",
      'import-x/no-restricted-paths',
      /src\/services may not import src\/workers/,
    ],
    [
      'the Redis layer importing a queue',
      'src/redis/lock.ts',
      "import { LIFECYCLE_QUEUE } from '../queues/names';\nexport const _probe = LIFECYCLE_QUEUE;",
      'import-x/no-restricted-paths',
      /src\/redis may not import src\/queues/,
    ],
    [
      'the Redis layer importing BullMQ',
      'src/redis/connection.ts',
      "import { Queue } from 'bullmq';\nexport const _probe = Queue;",
      'no-restricted-imports',
      /the Redis layer knows no BullMQ/,
    ],
    [
      'the product importing chaos tooling',
      'src/workers/sweep-worker.ts',
      "import { runChaos } from '../../chaos/run';\nexport const _probe = runChaos;",
      'import-x/no-restricted-paths',
      /never imports its tooling \(chaos\/\)/,
    ],
    [
      'the product loading dev servers outside fleet start',
      'src/cli/main.ts',
      "export const _probe = async () => import('../../dev/servers');",
      'import-x/no-restricted-paths',
      /never imports its tooling \(dev\/\)/,
    ],
    [
      'a circular import',
      'src/services/transitions/outcomes.ts',
      "import { TransitionService } from './service';\nexport const _probe = TransitionService;",
      'import-x/no-cycle',
      /Dependency cycle/,
    ],
  ];
  for (const [what, file, injected, rule, message] of cases) {
    it(`fails on ${what}`, async () => {
      const found = await breaches(file, injected);
      expect(found.filter((m) => m.rule === rule).map((m) => m.message)).to.satisfy(
        (ms: string[]) => ms.some((m) => message.test(m)),
        JSON.stringify(found),
      );
    });
  }

  it("holds src/ to 450 lines a file and 80 a function, a migration's functions excepted (issue 30)", async () => {
    const longFunction = `export function _probe(): number {\n  let n = 0;\n${'  n++;\n'.repeat(79)}  return n;\n}`;
    const longFile = '// a line\n'.repeat(450);
    const severities = async (file: string, injected: string, rule: string): Promise<number[]> => {
      const filePath = path.join(root, file);
      const [result] = await eslint.lintText(`${injected}\n${fs.readFileSync(filePath, 'utf8')}`, { filePath });
      return (result?.messages ?? []).filter((m) => m.ruleId === rule).map((m) => m.severity);
    };
    expect(await severities('src/http/server.ts', longFunction, 'max-lines-per-function')).to.deep.equal([2]);
    expect(await severities('src/events/catalog.ts', longFile, 'max-lines')).to.deep.equal([2]);
    expect(await severities('src/streams/leases.ts', longFunction, 'max-lines-per-function')).to.deep.equal([2]);
    expect(await severities('src/machine/decide.ts', longFile, 'max-lines')).to.deep.equal([2]);
    // wherever the migrations live: a migration is history, not split
    const migration = fs
      .readdirSync(path.join(root, 'src'), { recursive: true, encoding: 'utf8' })
      .find((f) => /(^|\/)migrations\/.+\.ts$/.test(f.split(path.sep).join('/')));
    expect(migration, 'a migration under src/').to.be.a('string');
    expect(await severities(path.join('src', migration ?? ''), longFunction, 'max-lines-per-function')).to.deep.equal([]);
    expect(await severities(path.join('src', migration ?? ''), longFile, 'max-lines')).to.deep.equal([2]);
  });

  it('passes the files as they are, including the one lazy dev import of fleet start', async () => {
    const results = await eslint.lintFiles([
      'src/cli/start.ts',
      'src/machine/decide.ts',
      'src/entities/schema/migrate.ts',
      'src/services/transitions/outcomes.ts',
    ]);
    expect(results.flatMap((r) => r.messages.map((m) => `${r.filePath}: ${m.ruleId}: ${m.message}`))).to.deep.equal([]);
  });
});
