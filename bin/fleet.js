#!/usr/bin/env node
'use strict';
// The `fleet` command; compiled sources live in dist/ (`npm run build`).
const path = require('node:path');

const MAIN = path.join(__dirname, '..', 'dist', 'src', 'cli', 'main.js');

/**
 * The CLI, or one line saying what to run and exit code 1 when it cannot be loaded because the checkout was never
 * built (`npx fleet ...` on a fresh clone) or a dependency is not installed. Any other load failure is a bug and is
 * thrown as it is.
 */
function load() {
  try {
    return require(MAIN);
  } catch (err) {
    const missing = err && err.code === 'MODULE_NOT_FOUND' ? /Cannot find module '([^']+)'/.exec(err.message) : null;
    if (missing === null) throw err;
    if (path.resolve(missing[1]) === MAIN) {
      process.stderr.write('fleet: lifecycle-fleet is not built: run `npm run build` (or `npm install`)\n');
    } else if (!/^[./]/.test(missing[1])) {
      process.stderr.write(`fleet: a dependency of lifecycle-fleet is missing (${missing[1]}): run \`npm install\`\n`);
    } else {
      throw err;
    }
    process.exit(1);
  }
}

// Exit once the command is done, even if a library left a timer behind: BullMQ's Worker.close() never settles while
// Redis is unreachable and keeps a retry timer, so a worker stopped during a Redis outage would otherwise never exit.
// Output still in flight (pipes are asynchronous on macOS) is flushed first.
load()
  .main(process.argv)
  .then(() => process.stdout.write('', () => process.stderr.write('', () => process.exit())));
