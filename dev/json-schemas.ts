/**
 * `npm run schemas`: the JSON Schemas of every job payload and of the stream entry, generated with zod 4's
 * `z.toJSONSchema` from the schemas the fleet itself parses with, into `docs/schemas/`. For producers and consumers
 * in other languages. `test/unit/json-schemas.test.ts` renders them again and fails when the checked-in files differ.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { z } from 'zod';
import { EVENT_NAMES, EVENT_SCHEMAS, MAX_PAYLOAD_BYTES, STORABLE_TEXT_PATTERN } from '../src/events/schemas';
import { STREAM_ENTRY_SCHEMA } from '../src/streams/consumer';
import { repoRoot } from '../src/util';

/** Where the schemas live, relative to the repository root. */
export const SCHEMAS_DIR = path.join('docs', 'schemas');

const GENERATED = "Generated from the fleet's zod schemas by `npm run schemas`; do not edit.";

/**
 * A zod schema as a JSON Schema document (draft 2020-12) with a title and a description in front. The payloads'
 * text rule (no NUL, no lone surrogate) is one check over the whole payload, which JSON Schema cannot say: it goes
 * to every free-text string as a pattern (a string with a pattern of its own is already ASCII-only).
 */
function document(schema: z.ZodType, title: string, description: string, text: 'storable' | 'any'): Record<string, unknown> {
  // `input`: what a producer sends (before defaults and the lower-casing of ids), which is what it must check
  const { $schema, ...rest } = z.toJSONSchema(schema, {
    io: 'input',
    target: 'draft-2020-12',
    override: ({ jsonSchema }) => {
      const free =
        jsonSchema.type === 'string' && jsonSchema.pattern === undefined && jsonSchema.enum === undefined && jsonSchema.const === undefined;
      if (text === 'storable' && free) jsonSchema.pattern = STORABLE_TEXT_PATTERN;
    },
  });
  return { $schema, title, description, ...rest };
}

function jobDescription(name: string): string {
  return [
    `The data of a BullMQ job named "${name}" on the queue "lifecycle" (prefix FLEET_PREFIX); its jobId is its eventId.`,
    `The fleet also refuses: a payload over ${MAX_PAYLOAD_BYTES} bytes as JSON, an eventId that begins with another`,
    "event's name and a dot (in any case), an eventId that begins with this event's name and a dot but does not go on",
    'with its own subject (attemptId, or deploymentId for deployment.create; docs/contract.md, "Event ids"), an endpoint',
    'URL with an invalid punycode (xn--) label, and an endpoint whose host FLEET_ENDPOINT_ALLOW does not allow.',
    GENERATED,
  ].join(' ');
}

/** Every file under `docs/schemas/` (path relative to it, with `/`) and its text. */
export function renderJsonSchemas(): ReadonlyMap<string, string> {
  const files = new Map<string, string>();
  const json = (value: unknown): string => `${JSON.stringify(value, null, 2)}\n`;
  for (const name of EVENT_NAMES) {
    files.set(`jobs/${name}.json`, json(document(EVENT_SCHEMAS[name], name, jobDescription(name), 'storable')));
  }
  files.set(
    'stream-entry.json',
    json(
      document(
        STREAM_ENTRY_SCHEMA,
        'state_transition stream entry',
        `The fields of one entry of the Redis stream "<FLEET_PREFIX>:transitions", all strings. At-least-once; per deployment in increasing version. Fields not named here may be added later: ignore them. ${GENERATED}`,
        'any',
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
      `limit (${MAX_PAYLOAD_BYTES} bytes as JSON), an eventId that begins with another event's name and a dot (in any`,
      'case) or with its own but not followed by its own subject, an endpoint URL with an invalid punycode (xn--) label,',
      "and the endpoint allow-list (a running fleet's setting). A JSON Schema counts string lengths in code points, the fleet",
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
