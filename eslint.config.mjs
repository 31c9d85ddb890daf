// Type-aware lint. The rules that matter most here: the promise rules (no floating promises, no misused promises),
// no explicit `any`, and the architecture's import rules (docs/architecture.md, "Layers"): which layer of src/ may
// import which, no circular imports, and the product never importing its tooling.
import js from '@eslint/js';
import importX from 'eslint-plugin-import-x';
import tseslint from 'typescript-eslint';

// Each part of src/ and what of ours it may import (besides itself). Anything not listed is refused.
const FOUNDATION = ['util', 'errors', 'log'];
/** what the composition root builds on: every layer but `client`, which only the package root re-exports */
const BELOW_APP = [
  'http',
  'workers',
  'streams',
  'services',
  'entities',
  'queues',
  'redis',
  'events',
  'machine',
  'metrics',
  'config',
  'telemetry',
  ...FOUNDATION,
];
const LAYERS = {
  machine: [], // the pure state machine: nothing of ours
  util: [], // small shared helpers: nothing of ours
  errors: [],
  log: ['util'], // pretty lines escape stored text with util's printable()
  telemetry: ['log'], // tracing: the SDK started only when asked, span helpers over @opentelemetry/api
  events: ['machine', 'util', 'errors'], // payload schemas, event ids, the endpoint allow-list
  entities: ['machine', ...FOUNDATION], // persistence: knows no BullMQ, no Redis, no services
  redis: [...FOUNDATION], // Redis connections, the fleet clock, the Redis lock: no BullMQ
  queues: ['redis', 'events', 'machine', 'telemetry', ...FOUNDATION], // BullMQ names, the producer SDK, the backlog
  config: ['events', 'machine', 'telemetry', ...FOUNDATION],
  metrics: [...FOUNDATION],
  services: ['entities', 'events', 'machine', 'queues', 'redis', 'config', 'telemetry', ...FOUNDATION], // domain services (config: its DEFAULTS)
  streams: ['entities', 'queues', 'redis', 'events', 'machine', 'telemetry', ...FOUNDATION], // outbox relay, stream consumer
  workers: ['services', 'entities', 'queues', 'redis', 'events', 'machine', 'metrics', 'telemetry', ...FOUNDATION],
  // the SDK's entry (lifecycle-fleet/client): the producer, the consumer, the event contract, the errors
  client: ['queues', 'streams', 'events', 'machine', ...FOUNDATION],
  http: ['services', 'entities', 'queues', 'redis', 'streams', 'events', 'machine', 'metrics', 'config', 'telemetry', ...FOUNDATION],
  app: BELOW_APP, // the composition root
  cli: ['app', ...BELOW_APP],
  index: ['client', 'app', ...BELOW_APP],
};
const FILE_LAYERS = new Set(['errors', 'log', 'config', 'metrics', 'telemetry', 'app', 'client', 'index']);
const pathOf = (layer) => (FILE_LAYERS.has(layer) ? `./src/${layer}.ts` : `./src/${layer}/**`);

const layerZones = Object.entries(LAYERS).flatMap(([layer, allowed]) =>
  Object.keys(LAYERS)
    .filter((other) => other !== layer && !allowed.includes(other))
    .map((other) => ({
      target: pathOf(layer),
      from: pathOf(other),
      message: `src/${layer} may not import src/${other} (docs/architecture.md, "Layers": ${layer} may import ${allowed.length > 0 ? allowed.join(', ') : 'nothing of ours'})`,
    })),
);
const TOOLING = ['dev', 'chaos', 'bench', 'test', 'examples'];
const toolingZones = (except = []) =>
  TOOLING.filter((t) => !except.includes(t)).map((t) => ({
    target: './src/**',
    from: `./${t}/**`,
    message: `the product (src/) never imports its tooling (${t}/): dist/src must run without it`,
  }));
const outsideZone = { target: './src/**', from: './ormconfig.ts', message: 'src/ imports the data source from src/entities/schema/data-source' };

// Size budgets (issue 30): a file of src/ up to 450 lines, a function up to 80, counted as written.
const SIZE_RULES = {
  'max-lines': ['error', { max: 450 }],
  'max-lines-per-function': ['error', { max: 80 }],
};
// Except a migration's functions: a migration is history, run as written on every database and never edited once
// released, so a long `up` is the length of the schema it made, not code anyone changes; split into helpers it
// would only be edited where nothing may change.
const MIGRATIONS = 'src/**/migrations/**/*.ts';

const PACKAGE_RULES = {
  machine: { patterns: [{ regex: '^(?!\\./)', message: 'the machine is pure: no packages, no node: modules' }] },
  entities: { paths: ['bullmq', 'ioredis', 'fastify'].map((name) => ({ name, message: 'persistence knows no BullMQ, Redis or HTTP' })) },
  events: { paths: ['bullmq', 'ioredis', 'typeorm', 'pg'].map((name) => ({ name, message: 'event schemas know no queue or database' })) },
  redis: { paths: ['bullmq', 'typeorm', 'pg', 'fastify'].map((name) => ({ name, message: 'the Redis layer knows no BullMQ, database or HTTP' })) },
};

export default tseslint.config(
  { ignores: ['dist/**', 'node_modules/**', '.fleet/**', 'bench/results/**', 'bin/**', 'eslint.config.mjs'] },
  js.configs.recommended,
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    plugins: { 'import-x': importX },
    settings: {
      'import-x/extensions': ['.ts', '.js'],
      'import-x/parsers': { '@typescript-eslint/parser': ['.ts'] },
      'import-x/external-module-folders': ['node_modules', 'node_modules/@types'],
      'import-x/resolver-next': [importX.createNodeResolver({ extensions: ['.ts', '.js', '.json'] })],
    },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/no-misused-promises': 'error',
      '@typescript-eslint/no-explicit-any': 'error',
      '@typescript-eslint/consistent-type-imports': ['error', { fixStyle: 'separate-type-imports' }],
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      '@typescript-eslint/require-await': 'off',
      'no-constant-condition': ['error', { checkLoops: false }],
      'import-x/no-cycle': ['error', { ignoreExternal: true }],
    },
  },
  {
    files: ['src/**/*.ts'],
    rules: { 'import-x/no-restricted-paths': ['error', { zones: [...layerZones, ...toolingZones(), outsideZone] }] },
  },
  {
    // `fleet start` is the one product command that may load the local development servers (lazily: dist/dev is
    // absent from a production install, and every other command runs without it)
    files: ['src/cli/start.ts'],
    rules: { 'import-x/no-restricted-paths': ['error', { zones: [...layerZones, ...toolingZones(['dev']), outsideZone] }] },
  },
  { files: ['src/**/*.ts'], rules: SIZE_RULES },
  { files: [MIGRATIONS], rules: { 'max-lines-per-function': 'off' } },
  ...Object.entries(PACKAGE_RULES).map(([layer, options]) => ({
    files: [`src/${layer}/**/*.ts`],
    rules: { 'no-restricted-imports': ['error', options] },
  })),
  {
    // the live page's script (src/http/ui/, docs/architecture.md, "Layers"): browser JavaScript served as written,
    // outside the TypeScript project, so linted without types
    files: ['src/http/ui/**/*.js'],
    ...tseslint.configs.disableTypeChecked,
    languageOptions: {
      sourceType: 'script',
      parserOptions: { projectService: false },
      globals: { document: 'readonly', EventSource: 'readonly', fetch: 'readonly', setTimeout: 'readonly', setInterval: 'readonly' },
    },
  },
  {
    files: ['test/**/*.ts'],
    rules: {
      // chai's `expect(x).to.be.true` style is an expression statement
      '@typescript-eslint/no-unused-expressions': 'off',
    },
  },
);
