/**
 * examples/python/consume_transitions.py, a consumer in another language with nothing but Debian's python3-redis,
 * against a live fleet (`fleet worker`): it receives every version of every deployment, in order, once; it drops a
 * redelivered entry; it stops on SIGTERM, after --count, and with --until-idle. The entries it read are valid by
 * docs/schemas/stream-entry.json.
 */
import { execFile, spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'chai';
import Ajv2020 from 'ajv/dist/2020';
import addFormats from 'ajv-formats';
import { Queue } from 'bullmq';
import { Client } from 'pg';
import { DEBIAN_PYTHON } from '../../dev/servers/binaries';
import { LIFECYCLE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { partitionKey, partitionKeys, partitionOf, partitionsRecordKey } from '../../src/streams/partitions';
import { repoRoot } from '../../src/util';
import { createDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

const ROOT = repoRoot();
const FLEET = path.join(ROOT, 'bin', 'fleet.js');
const CONSUMER = path.join(ROOT, 'examples', 'python', 'consume_transitions.py');
/** Debian's python3-redis is installed for Debian's interpreter; PYTHON names another one. */
const PYTHON = process.env.PYTHON ?? (fs.existsSync(DEBIAN_PYTHON) ? DEBIAN_PYTHON : 'python3');

/** `<deploymentId> v<version> <from> -> <to> (<reason>) <eventId>` */
const LINE = /^([0-9a-f-]{36}) v(\d+) (\S+) -> (\S+) \((.*)\) (\S+)$/;

interface Printed {
  readonly deploymentId: string;
  readonly version: number;
  readonly from: string;
  readonly to: string;
  readonly reason: string;
  readonly eventId: string;
}

function printed(stdout: string): Printed[] {
  return stdout
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      const m = LINE.exec(l);
      if (m === null) throw new Error(`not a transition line: ${l}`);
      return { deploymentId: m[1] ?? '', version: Number(m[2]), from: m[3] ?? '', to: m[4] ?? '', reason: m[5] ?? '', eventId: m[6] ?? '' };
    });
}

interface Run {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((resolve) => {
    execFile(file, args, { env, timeout: 30_000 }, (err, stdout, stderr) =>
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : null, stdout, stderr }),
    );
  });
}

/** A child whose output is collected as it comes, and whose exit can be awaited. */
function start(
  file: string,
  args: string[],
  env: NodeJS.ProcessEnv,
): { child: ChildProcessWithoutNullStreams; out: () => string; err: () => string; exited: Promise<number | null> } {
  const child = spawn(file, args, { env, stdio: 'pipe' });
  let out = '';
  let err = '';
  child.stdout.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr.on('data', (c: Buffer) => (err += c.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return { child, out: () => out, err: () => err, exited };
}

describe('the Python stream consumer (examples/python), against a live fleet', function () {
  this.timeout(120_000);

  before(function () {
    const probe = spawnSync(PYTHON, ['-c', 'import redis'], { encoding: 'utf8' });
    if (probe.status === 0) return;
    const cause = probe.error?.message ?? probe.stderr.trim().split('\n').pop();
    const why = `${PYTHON} cannot import redis (${cause}): apt-get install python3-redis (npm test does as root)`;
    // `npm test` installs it as root: in CI, its absence is a failure, never a skip
    if (process.env.CI !== undefined && process.env.CI !== '' && process.env.CI !== 'false') throw new Error(why);
    process.stderr.write(`\n  SKIPPING the Python consumer test: ${why}\n\n`);
    this.skip();
  });

  /** The same consumer against a fleet with one stream and with 4 partitions: it reads every one. */
  const consumes = (partitions: number) => async () => {
    const { redisUrl } = testEnv();
    const db = await createDatabase();
    const prefix = uniquePrefix();
    const env: NodeJS.ProcessEnv = {
      PATH: process.env.PATH,
      REDIS_URL: redisUrl,
      DATABASE_URL: db.url,
      FLEET_PREFIX: prefix,
      FLEET_STREAM_PARTITIONS: String(partitions),
      LOG_LEVEL: 'info',
    };
    const base = `${prefix}:transitions`;
    const keys = partitionKeys(base, partitions);
    const python = (args: string[]) => [CONSUMER, '--prefix', prefix, ...args];
    const children: ChildProcessWithoutNullStreams[] = [];
    const redis = testRedis();
    const queue = new Queue(LIFECYCLE_QUEUE, { connection: redis, prefix });
    const producer = new LifecycleProducer({ connection: redisUrl, prefix });
    const pg = new Client({ connectionString: db.url });
    try {
      const migrated = await run(process.execPath, [FLEET, 'migrate'], env);
      expect(migrated.code, migrated.stderr).to.equal(0);
      await pg.connect();

      // the worker first, so that the consumer finds the recorded number of partitions; the consumer before the
      // first event: its new groups start at the partitions' end ($)
      const worker = start(process.execPath, [FLEET, 'worker'], env);
      children.push(worker.child);
      await waitFor('the worker to start', () => (worker.out().includes('worker started') ? true : undefined), 30_000);
      await waitFor('the partitions recorded', async () => ((await redis.get(partitionsRecordKey(base))) === String(partitions) ? true : undefined));
      const live = start(PYTHON, python(['--group', 'live', '--consumer', 'c1']), { PATH: process.env.PATH, REDIS_URL: redisUrl });
      children.push(live.child);
      await waitFor('the consumer to read', () => (live.err().includes(`reading ${base} as live/c1`) ? true : undefined));
      expect(live.err()).to.contain(`${partitions} partition(s)`);

      // whole lifecycles: a failed attempt, a second that succeeds, a teardown; each step once the last has applied
      const deployments = Array.from({ length: 3 }, () => ({ deploymentId: randomUUID(), first: randomUUID(), second: randomUUID() }));
      const steps: Array<(d: (typeof deployments)[number]) => Promise<{ jobId: string }>> = [
        (d) => producer.createDeployment({ deploymentId: d.deploymentId, name: 'web' }),
        (d) => producer.createAttempt({ deploymentId: d.deploymentId, attemptId: d.first }),
        (d) => producer.startAttempt({ deploymentId: d.deploymentId, attemptId: d.first }),
        (d) => producer.endAttempt({ deploymentId: d.deploymentId, attemptId: d.first, outcome: 'failed', reason: 'image pull failed' }),
        (d) => producer.createAttempt({ deploymentId: d.deploymentId, attemptId: d.second }),
        (d) => producer.startAttempt({ deploymentId: d.deploymentId, attemptId: d.second }),
        (d) => producer.endAttempt({ deploymentId: d.deploymentId, attemptId: d.second, outcome: 'succeeded' }),
        (d) => producer.teardown({ deploymentId: d.deploymentId }),
      ];
      for (const step of steps) {
        const jobIds = await Promise.all(deployments.map(async (d) => (await step(d)).jobId));
        await waitFor('the step to apply', async () => {
          const states = await Promise.all(jobIds.map((id) => queue.getJobState(id)));
          if (states.includes('failed')) throw new Error(`a job failed: ${states.join(', ')}`);
          return states.every((s) => s === 'completed') ? true : undefined;
        });
      }
      const { rows } = await pg.query<{ id: string; version: number; state: string }>(
        'SELECT id, version, state FROM deployments WHERE id = ANY($1)',
        [deployments.map((d) => d.deploymentId)],
      );
      expect(rows.map((r) => [r.version, r.state])).to.deep.equal(deployments.map(() => [steps.length, 'pending']));

      const total = deployments.length * steps.length;
      await waitFor(`${total} transitions printed`, () => (printed(live.out()).length >= total ? true : undefined));
      const lines = printed(live.out());
      expect(lines).to.have.length(total);
      for (const { deploymentId } of deployments) {
        const mine = lines.filter((l) => l.deploymentId === deploymentId);
        expect(
          mine.map((l) => l.version),
          deploymentId,
        ).to.deep.equal(Array.from({ length: steps.length }, (_, i) => i + 1));
        expect(mine.map((l) => `${l.from} -> ${l.to}`)).to.deep.equal([
          '(new) -> pending',
          'pending -> pending',
          'pending -> deploying',
          'deploying -> failed',
          'failed -> pending',
          'pending -> deploying',
          'deploying -> ready',
          'ready -> pending',
        ]);
        expect(mine[0]?.eventId).to.equal(`deployment.create.${deploymentId}`);
      }

      // what it read is what docs/schemas/stream-entry.json describes
      const ajv = new Ajv2020({ allErrors: true });
      addFormats(ajv);
      const validEntry = ajv.compile(JSON.parse(fs.readFileSync(path.join(ROOT, 'docs', 'schemas', 'stream-entry.json'), 'utf8')) as object);
      const entries = (await Promise.all(keys.map((key) => redis.xrange(key, '-', '+')))).flat();
      expect(entries).to.have.length(total);
      for (const [, flat] of entries) {
        const fields = Object.fromEntries(flat.flatMap((v, i) => (i % 2 === 0 ? [[v, flat[i + 1]]] : [])));
        expect(validEntry(fields), JSON.stringify(validEntry.errors)).to.equal(true);
      }

      live.child.kill('SIGTERM');
      expect(await live.exited, live.err()).to.equal(0);
      expect(live.err()).to.contain(`stopped: ${total} transitions printed, 0 duplicates dropped`);
      const password = new URL(redisUrl).password;
      if (password !== '') expect(live.err()).to.not.contain(password);
      worker.child.kill('SIGTERM');
      expect(await worker.exited, worker.out().slice(-2000)).to.equal(0);

      // at-least-once: entries delivered again (copies of the first two, after the rest) are dropped, not printed
      const deploymentOf = (flat: string[]) => flat[flat.indexOf('deploymentId') + 1] ?? '';
      const firstTwo = lines
        .slice(0, 2)
        .map((l) => entries.find(([, flat]) => deploymentOf(flat) === l.deploymentId && flat[flat.indexOf('version') + 1] === String(l.version)));
      for (const entry of firstTwo) {
        if (entry === undefined) throw new Error('an entry printed is not in the stream');
        await redis.xadd(partitionKey(base, partitionOf(deploymentOf(entry[1]), partitions), partitions), '*', ...entry[1]);
      }
      const replay = await run(PYTHON, python(['--group', 'replay', '--start-id', '0', '--until-idle', '--block-ms', '200']), {
        PATH: process.env.PATH,
        REDIS_URL: redisUrl,
      });
      expect(replay.code, replay.stderr).to.equal(0);
      // one stream is read in stream order both times; partitions in another interleaving, each deployment's in order
      const byDeployment = (all: Printed[]) => [...all].sort((a, b) => a.deploymentId.localeCompare(b.deploymentId) || a.version - b.version);
      if (partitions === 1) expect(printed(replay.stdout)).to.deep.equal(lines);
      else expect(byDeployment(printed(replay.stdout))).to.deep.equal(byDeployment(lines));
      expect(replay.stderr).to.contain(`stopped: ${total} transitions printed, 2 duplicates dropped`);
      // nothing left unacknowledged
      for (const key of keys) {
        const pending = (await redis.xpending(key, 'replay')) as [number, ...unknown[]];
        expect(pending[0], key).to.equal(0);
      }

      const counted = await run(PYTHON, python(['--group', 'counted', '--start-id', '0', '--count', '3']), {
        PATH: process.env.PATH,
        REDIS_URL: redisUrl,
      });
      expect(counted.code, counted.stderr).to.equal(0);
      expect(printed(counted.stdout)).to.have.length(3);
    } finally {
      for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await producer.close();
      await queue.close();
      redis.disconnect();
      await pg.end().catch(() => undefined);
      await dropPrefix(prefix);
      await db.drop();
    }
  };

  it('receives every version of each deployment in order, drops redeliveries, and stops cleanly', consumes(1));
  it('with FLEET_STREAM_PARTITIONS=4: reads every partition, each deployment in order', consumes(4));
});
