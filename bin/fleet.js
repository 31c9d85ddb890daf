#!/usr/bin/env node
'use strict';
// The `fleet` command; compiled sources live in dist/ (`npm run build`).
require('../dist/src/cli/main.js').main(process.argv);
