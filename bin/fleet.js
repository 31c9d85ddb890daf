#!/usr/bin/env node
'use strict';
// The `fleet` command; compiled sources live in dist/ (`npm run build`).
// Exit once the command is done, even if a library left a timer behind: BullMQ's Worker.close() never settles while
// Redis is unreachable and keeps a retry timer, so a worker stopped during a Redis outage would otherwise never exit.
// Output still in flight (pipes are asynchronous on macOS) is flushed first.
require('../dist/src/cli/main.js')
  .main(process.argv)
  .then(() => process.stdout.write('', () => process.stderr.write('', () => process.exit())));
