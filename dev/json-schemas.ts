/**
 * `npm run schemas`: the JSON Schemas of every job payload and of the stream entry, generated with zod 4's
 * `z.toJSONSchema` from the schemas the fleet itself parses with, into `docs/schemas/`. For producers and consumers
 * in other languages. `test/unit/json-schemas.test.ts` renders them again and fails when the checked-in files differ.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { z } from 'zod';
import { EVENT_NAMES, EVENT_SCHEMAS, MAX_PAYLOAD_BYTES } from '../src/events/schemas';
import { STREAM_ENTRY_SCHEMA } from '../src/streams/consumer';
import { repoRoot } from '../src/util';

/** Where the schemas live, relative to the repository root. */
export const SCHEMAS_DIR = path.join('docs', 'schemas');

const GENERATED = 'Generated from the fleet\'s zod schemas by `npm run schemas`; do not edit.';

/** A zod schema as a JSON Schema document (draft 2020-12) with a title and a description in front. */
function document(schema: z.ZodType, title: string, description: string): Record<string, unknown> {
  // `input`: what a producer sends (before defaults and the lower-casing of ids), which is what it must check
  const { $schema, ...rest } = z.toJSONSchema(schema, { io: 'input', target: 'draft-2020-12' });
  return { $schema, title, description, ...rest };
}

function jobDescription(name: string): string {
  return [
    `The data of a BullMQ job named "${name}" on the queue "lifecycle" (prefix FLEET_PREFIX); its jobId is its eventId.`,
    `The fleet also refuses: a payload over ${MAX_PAYLOAD_BYTES} bytes as JSON, an eventId that begins with another`,
    'event\'s name and a dot, and an endpoint whose host FLEET_ENDPOINT_ALLOW does not allow (docs/contract.md).',
    GENERATED,
  ].join(' ');
}

/** Every file under `docs/schemas/` (path relative to it, with `/`) and its text. */
export function renderJsonSchemas(): ReadonlyMap<string, string> {
  const files = new Map<string, string>();
  const json = (value: unknown): string => `${JSON.stringify(value, null, 2)}\n`;
  for (const name of EVENT_NAMES) {
    files.set(`jobs/${name}.json`, json(document(EVENT_SCHEMAS[name], name, jobDescription(name))));
  }
  files.set(
    'stream-entry.json',
    json(
      document(
        STREAM_ENTRY_SCHEMA,
        'state_transition stream entry',
        `The fields of one entry of the Redis stream "<FLEET_PREFIX>:transitions", all strings. At-least-once; per deployment in increasing version. Fields not named here may be added later: ignore them. ${GENERATED}`,
      ),
    ),
  );
  files.set(
    'README.md',
    [
      '# JSON Schemas (generated)',
      '',
      `${GENERATED} The contract is [docs/contract.md](../contract.md); these schemas say the same for machines`,
      '(JSON Schema draft 2020-12), so that a producer or consumer in another language can check what it sends or',
      'reads. A payload these schemas accept is one the fleet accepts, except for what they cannot say: the size',
      `limit (${MAX_PAYLOAD_BYTES} bytes as JSON), an eventId that begins with another event's name and a dot, and the`,
      'endpoint allow-list (a running fleet\'s setting). A JSON Schema counts string lengths in code points, the fleet',
      'in UTF-16 units: near a length limit, text with characters outside the Basic Multilingual Plane (emoji) may',
      'pass here and be refused there.',
      '',
      '| file | what |',
      '|---|---|',
      ...EVENT_NAMES.map((name) => `| [jobs/${name}.json](jobs/${name}.json) | the data of the \`${name}\` job |`),
      '| [stream-entry.json](stream-entry.json) | one entry of the transition stream `<FLEET_PREFIX>:transitions` |',
      '',
    ].join('\n'),
  );
  return files;
}

/** The files now under `docs/schemas/` (relative, with `/`), for the check and for removing stale ones. */
export function listSchemaFiles(root: string = repoRoot()): string[] {
  const dir = path.join(root, SCHEMAS_DIR);
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir, { recursive: true, encoding: 'utf8' })
    .filter((f) => fs.statSync(path.join(dir, f)).isFile())
    .map((f) => f.split(path.sep).join('/'))
    .sort();
}

/** Writes the schemas and removes files that are no longer generated (a job name that went away). */
export function writeJsonSchemas(root: string = repoRoot()): { written: number; removed: string[] } {
  const dir = path.join(root, SCHEMAS_DIR);
  const files = renderJsonSchemas();
  const removed = listSchemaFiles(root).filter((f) => !files.has(f));
  for (const f of removed) fs.rmSync(path.join(dir, f));
  for (const [file, text] of files) {
    fs.mkdirSync(path.dirname(path.join(dir, file)), { recursive: true });
    fs.writeFileSync(path.join(dir, file), text);
  }
  return { written: files.size, removed };
}

if (require.main === module) {
  const { written, removed } = writeJsonSchemas();
  process.stdout.write(`${SCHEMAS_DIR}: ${written} files written${removed.length > 0 ? `, removed ${removed.join(', ')}` : ''}\n`);
}
