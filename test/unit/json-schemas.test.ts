/**
 * docs/schemas/ (`npm run schemas`): current with the zod schemas, and a JSON Schema validator (ajv) accepts and
 * refuses exactly what the fleet's own schemas do, so that a producer or consumer in another language can trust them.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import Ajv2020 from 'ajv/dist/2020';
import addFormats from 'ajv-formats';
import type { z } from 'zod';
import { listSchemaFiles, renderJsonSchemas, SCHEMAS_DIR } from '../../dev/json-schemas';
import { EVENT_NAMES, EVENT_SCHEMAS, type EventName } from '../../src/events/schemas';
import { STREAM_ENTRY_SCHEMA } from '../../src/streams/consumer';
import { repoRoot } from '../../src/util';

const dir = path.join(repoRoot(), SCHEMAS_DIR);

/** A validator for one checked-in schema file. */
function validatorFor(file: string): (data: unknown) => boolean {
  const ajv = new Ajv2020({ allErrors: true, strict: true });
  addFormats(ajv);
  const validate = ajv.compile(JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8')) as object);
  return (data) => validate(data);
}

interface Sample {
  readonly label: string;
  readonly data: unknown;
  /** what the sample was written to be: the fleet must agree, or the sample is wrong */
  readonly valid: boolean;
}

/** Compares ajv on the checked-in file with zod on every sample; returns one line per disagreement. */
function disagreements(file: string, schema: z.ZodType, samples: readonly Sample[]): string[] {
  const ajv = validatorFor(file);
  return samples.flatMap(({ label, data, valid }) => {
    const byZod = schema.safeParse(data).success;
    const byAjv = ajv(data);
    if (byZod !== valid) return [`${file} ${label}: zod says ${byZod ? 'valid' : 'invalid'}, the sample was meant ${valid ? 'valid' : 'invalid'}`];
    if (byAjv !== byZod) return [`${file} ${label}: zod says ${byZod ? 'valid' : 'invalid'}, the JSON Schema ${byAjv ? 'valid' : 'invalid'}`];
    return [];
  });
}

const uuid = randomUUID();
const FIELDS: Record<string, { readonly valid: readonly unknown[]; readonly invalid: readonly unknown[] }> = {
  eventId: {
    valid: ['a', 'deployment.create.x', `ci-${'x'.repeat(197)}`, 'A.b_c-9'],
    invalid: ['', 'has space', 'x'.repeat(201), 'é', 'a/b', 42, null],
  },
  actor: { valid: ['ci-deployer', 'svc:a@b.c', 'x'.repeat(100)], invalid: ['', 'a b', 'x'.repeat(101), 'a/b', null, 1] },
  deploymentId: {
    valid: [uuid, uuid.toUpperCase(), '00000000-0000-0000-0000-000000000000'],
    invalid: ['not-a-uuid', uuid.slice(1), `${uuid}0`, '00000000-0000-9000-8000-000000000000', '00000000-0000-4000-c000-000000000000', 7, null],
  },
  attemptId: { valid: [randomUUID()], invalid: ['', 'x', 12, {}] },
  name: { valid: ['web', 'a-1', 'x'.repeat(63)], invalid: ['', 'Web', 'a_b', 'a.b', 'x'.repeat(64), 3] },
  reason: { valid: ['', 'because', 'x'.repeat(500), 'x😀y'], invalid: ['x'.repeat(501), 5, null, 'x\u0000y', 'x\uD800y', '\uDE00'] },
  force: { valid: [true, false], invalid: ['true', 1, null] },
  observedAt: {
    valid: ['2025-01-02T03:04:05Z', '2025-01-02T03:04:05.123+02:00', '2024-02-29T23:59:59.999999Z'],
    invalid: [
      '2025-01-02',
      '2025-01-02 03:04:05Z',
      '2025-01-02T03:04:05',
      '2025-13-01T00:00:00Z',
      '2025-02-29T00:00:00Z',
      '2025-01-02T03:04:60Z',
      'yesterday',
      0,
    ],
  },
  endpoint: {
    valid: [
      { url: 'http://127.0.0.1:8080/health', kind: 'node_port' },
      { url: 'https://web.default.svc.cluster.local', kind: 'cluster_dns' },
      { url: 'HTTPS://Example.com/a/b/', kind: 'node_port' },
      { url: 'http://[::1]:3000/', kind: 'node_port' },
      { url: 'http://host/a@b', kind: 'node_port' },
      { url: 'http://web.cluster.local.:8080', kind: 'cluster_dns' },
      { url: 'http://[::ffff:10.0.0.1]/', kind: 'node_port' },
    ],
    invalid: [
      { url: 'http://host/?q=1', kind: 'node_port' },
      { url: 'http://host/#frag', kind: 'node_port' },
      { url: 'http://user:secret@host/', kind: 'node_port' },
      { url: 'http://user@host/', kind: 'node_port' },
      { url: 'ftp://host/', kind: 'node_port' },
      { url: 'not a url', kind: 'node_port' },
      { url: 'http://10.0.0.1\\@127.0.0.1:3199/', kind: 'cluster_dns' },
      { url: 'http://h\t.example.com/', kind: 'node_port' },
      { url: 'http://h.example.com/\u0000', kind: 'node_port' },
      { url: 'http://127.1/', kind: 'node_port' },
      { url: 'http://[fe80::1%25eth0]/', kind: 'node_port' },
      { url: 'http://h.example.com:0/', kind: 'node_port' },
      { url: 'http://bücher.example/', kind: 'node_port' },
      { url: `http://host/${'x'.repeat(2048)}`, kind: 'node_port' },
      { url: 'http://host/', kind: 'load_balancer' },
      { url: 'http://host/' },
      { kind: 'node_port' },
      { url: 'http://host/', kind: 'node_port', extra: 1 },
      { url: 42, kind: 'node_port' },
      'http://host/',
      null,
    ],
  },
};
const OUTCOMES: Partial<Record<EventName, { readonly valid: readonly string[]; readonly invalid: readonly unknown[] }>> = {
  'attempt.end': { valid: ['succeeded', 'failed'], invalid: ['ready', 'SUCCEEDED', '', true] },
  'deployment.resolve': { valid: ['ready', 'failed'], invalid: ['succeeded', 'Ready', null] },
};

/** Every sample for one job: valid ones with each optional field, and one per broken field, missing field and more. */
function jobSamples(name: EventName): Sample[] {
  const shape = EVENT_SCHEMAS[name].shape as Record<string, z.ZodType>;
  const fields = (field: string) => (field === 'outcome' ? OUTCOMES[name] : FIELDS[field]);
  const base: Record<string, unknown> = {};
  const required = Object.keys(shape).filter((f) => !shape[f]?.safeParse(undefined).success);
  for (const field of required) base[field] = fields(field)?.valid[0];
  const samples: Sample[] = [{ label: 'the required fields', data: base, valid: true }];
  for (const field of Object.keys(shape)) {
    const values = fields(field);
    if (values === undefined) throw new Error(`no samples for ${name}.${field}: add them to FIELDS`);
    for (const v of values.valid) samples.push({ label: `${field}=${JSON.stringify(v).slice(0, 40)}`, data: { ...base, [field]: v }, valid: true });
    for (const v of values.invalid)
      samples.push({ label: `${field}=${JSON.stringify(v)?.slice(0, 40)}`, data: { ...base, [field]: v }, valid: false });
    if (required.includes(field)) {
      const { [field]: _dropped, ...without } = base;
      samples.push({ label: `without ${field}`, data: without, valid: false });
    }
  }
  samples.push({ label: 'an unknown field', data: { ...base, extra: 'x' }, valid: false });
  samples.push({ label: 'a misspelt field', data: { ...base, deploymentID: base.deploymentId }, valid: false });
  for (const data of [null, [], 'x', 1]) samples.push({ label: `the payload ${JSON.stringify(data)}`, data, valid: false });
  return samples;
}

describe('JSON Schemas (docs/schemas)', () => {
  it('are current with the zod schemas (run `npm run schemas` when this fails)', () => {
    const rendered = renderJsonSchemas();
    expect(listSchemaFiles(), `the files in ${SCHEMAS_DIR}: run npm run schemas`).to.deep.equal([...rendered.keys()].sort());
    for (const [file, text] of rendered) {
      expect(fs.readFileSync(path.join(dir, file), 'utf8'), `${SCHEMAS_DIR}/${file} is out of date: run npm run schemas`).to.equal(text);
    }
  });

  it('hold one job schema per job name', () => {
    const jobs = listSchemaFiles().filter((f) => f.startsWith('jobs/'));
    expect(jobs).to.deep.equal(EVENT_NAMES.map((n) => `jobs/${n}.json`).sort());
  });

  for (const name of EVENT_NAMES) {
    it(`${name}: ajv accepts and refuses what the fleet's schema does`, () => {
      const samples = jobSamples(name);
      expect(samples.filter((s) => s.valid).length).to.be.greaterThan(1);
      expect(disagreements(`jobs/${name}.json`, EVENT_SCHEMAS[name], samples)).to.deep.equal([]);
    });
  }

  it("the stream entry: ajv accepts and refuses what the fleet's schema does", () => {
    const entry = {
      type: 'state_transition',
      transitionId: '42',
      deploymentId: uuid,
      attemptId: '',
      from: '',
      to: 'pending',
      version: '1',
      reason: 'created',
      eventId: `deployment.create.${uuid}`,
      at: '2025-01-02T03:04:05.678Z',
      actor: 'producer',
    };
    const traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
    const samples: Sample[] = [
      { label: 'a creation', data: entry, valid: true },
      { label: 'an attempt transition', data: { ...entry, attemptId: randomUUID(), from: 'pending', to: 'deploying', version: '12' }, valid: true },
      { label: 'with traceparent', data: { ...entry, traceparent }, valid: true },
      { label: 'an entry older than the actor field', data: { ...entry, actor: undefined }, valid: true },
      { label: 'an empty actor', data: { ...entry, actor: '' }, valid: false },
      { label: 'a field added later', data: { ...entry, region: 'eu' }, valid: true },
      { label: 'a number version', data: { ...entry, version: 1 }, valid: false },
      { label: 'version 0', data: { ...entry, version: '0' }, valid: false },
      { label: 'version 01', data: { ...entry, version: '01' }, valid: false },
      { label: 'another type', data: { ...entry, type: 'other' }, valid: false },
      { label: 'an unknown state', data: { ...entry, to: 'gone' }, valid: false },
      { label: 'an empty to', data: { ...entry, to: '' }, valid: false },
      { label: 'an upper-case deploymentId', data: { ...entry, deploymentId: uuid.toUpperCase() }, valid: false },
      { label: 'a bad attemptId', data: { ...entry, attemptId: 'x' }, valid: false },
      { label: 'a bad eventId', data: { ...entry, eventId: 'a b' }, valid: false },
      { label: 'a bad at', data: { ...entry, at: 'now' }, valid: false },
      { label: 'a bad traceparent', data: { ...entry, traceparent: 'x' }, valid: false },
      { label: 'a non-string added field', data: { ...entry, region: 1 }, valid: false },
      { label: 'without version', data: { ...entry, version: undefined }, valid: false },
    ];
    // JSON has no undefined: drop such keys, as a stream entry would not have them
    const json = samples.map((s) => ({ ...s, data: JSON.parse(JSON.stringify(s.data)) as unknown }));
    expect(disagreements('stream-entry.json', STREAM_ENTRY_SCHEMA, json)).to.deep.equal([]);
  });
});
