/**
 * `bin/fleet.js` on a checkout that was never built (`npx fleet ...` on a fresh clone): one line saying what to run,
 * not a `Cannot find module` stack. Run from a copy of bin/ in a temporary directory, so the build of this checkout
 * stays where it is.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import { repoRoot } from '../../src/util';

describe('bin/fleet.js before a build', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-bin-'));
    fs.mkdirSync(path.join(dir, 'bin'));
    fs.copyFileSync(path.join(repoRoot(), 'bin', 'fleet.js'), path.join(dir, 'bin', 'fleet.js'));
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const run = () =>
    spawnSync(process.execPath, [path.join(dir, 'bin', 'fleet.js'), 'status', 'x'], { encoding: 'utf8', env: { PATH: process.env.PATH } });

  it('says to build when dist/ is missing, with exit code 1 and no stack', () => {
    const result = run();
    expect(result.stderr).to.equal('fleet: lifecycle-fleet is not built: run `npm run build` (or `npm install`)\n');
    expect(result.stdout).to.equal('');
    expect(result.status).to.equal(1);
  });

  it('says to install when the build is there but a dependency is not', () => {
    const main = path.join(dir, 'dist', 'src', 'cli', 'main.js');
    fs.mkdirSync(path.dirname(main), { recursive: true });
    fs.writeFileSync(main, "'use strict';\nrequire('commander-not-installed');\nexports.main = async () => undefined;\n");
    const result = run();
    expect(result.stderr).to.equal('fleet: a dependency of lifecycle-fleet is missing (commander-not-installed): run `npm install`\n');
    expect(result.status).to.equal(1);
  });

  it('still reports any other failure of the build as it is (a bug is not hidden behind "not built")', () => {
    const main = path.join(dir, 'dist', 'src', 'cli', 'main.js');
    fs.mkdirSync(path.dirname(main), { recursive: true });
    fs.writeFileSync(main, "'use strict';\nrequire('./missing-sibling');\n");
    const result = run();
    expect(result.stderr).to.contain("Cannot find module './missing-sibling'");
    expect(result.status).to.equal(1);
  });
});
