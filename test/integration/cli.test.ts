import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { expect } from 'chai';
import { MIGRATIONS } from '../../src/entities';
import { Queue } from 'bullmq';
import { LIFECYCLE_QUEUE } from '../../src/queues/names';
import { LifecycleProducer } from '../../src/queues/producer';
import { ValidationError } from '../../src/errors';
import { isProcessAlive } from '../../dev/servers';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { repoRoot } from '../../src/util';

function readPid(file: string): number {
  try {
    return (JSON.parse(fs.readFileSync(file, 'utf8')) as { pid: number }).pid;
  } catch {
    return 0;
  }
}

const FLEET = path.join(repoRoot(), 'bin', 'fleet.js');

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function fleet(args: string[], env: Record<string, string | undefined>): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [FLEET, ...args], { env: { PATH: process.env.PATH, ...env }, timeout: 30_000 }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === 'number' ? err.code : 1;
      resolve({ code, stdout, stderr });
    });
  });
}

describe('the fleet CLI and the producer SDK', function () {
  this.timeout(60_000);
  let db: TestDatabase;
  let prefix: string;
  let env: Record<string, string>;

  before(async () => {
    db = await openTestDatabase(4);
  });
  after(async () => {
    await db?.close();
  });
  beforeEach(() => {
    prefix = uniquePrefix();
    env = { REDIS_URL: testEnv().redisUrl, DATABASE_URL: db.url, FLEET_PREFIX: prefix };
  });
  afterEach(async () => {
    await dropPrefix(prefix);
  });

  async function waitingJobs(): Promise<Array<{ id?: string; name: string; data: unknown }>> {
    const redis = testRedis();
    const queue = new Queue(LIFECYCLE_QUEUE, { connection: redis, prefix });
    try {
      return (await queue.getJobs(['waiting'])).map((j) => ({ id: j.id, name: j.name, data: j.data as unknown }));
    } finally {
      await queue.close();
      redis.disconnect();
    }
  }

  it('--help lists every command', async () => {
    const run = await fleet(['--help'], env);
    expect(run.code).to.equal(0);
    for (const command of ['start', 'worker', 'migrate', 'enqueue', 'status']) expect(run.stdout).to.contain(command);
  });

  it('enqueue validates, enqueues with the eventId as jobId, and prints it', async () => {
    const deploymentId = randomUUID();
    const run = await fleet(['enqueue', 'deployment.create', JSON.stringify({ deploymentId, name: 'web' })], env);
    expect(run.code, run.stderr).to.equal(0);
    const printed = JSON.parse(run.stdout) as { eventId: string; jobId: string };
    expect(printed).to.deep.equal({
      name: 'deployment.create',
      eventId: `deployment.create.${deploymentId}`,
      jobId: `deployment.create.${deploymentId}`,
      duplicate: false,
    });
    expect(await waitingJobs()).to.deep.equal([
      { id: printed.jobId, name: 'deployment.create', data: { deploymentId, name: 'web', eventId: printed.eventId } },
    ]);
  });

  it('enqueue refuses bad JSON and bad payloads with exit 2, naming the field, enqueuing nothing', async () => {
    const badJson = await fleet(['enqueue', 'deployment.create', '{nope'], env);
    expect(badJson.code).to.equal(2);
    expect(badJson.stderr).to.match(/<json>: not valid JSON/);

    const badPayload = await fleet(['enqueue', 'attempt.end', JSON.stringify({ deploymentId: 'x', attemptId: randomUUID() })], env);
    expect(badPayload.code).to.equal(2);
    expect(badPayload.stderr).to.contain('deploymentId: must be a UUID');
    expect(badPayload.stderr).to.contain('outcome: is required');

    const unknown = await fleet(['enqueue', 'deployment.explode', '{}'], env);
    expect(unknown.code).to.equal(2);
    expect(unknown.stderr).to.contain('unknown_event');

    const missingArg = await fleet(['enqueue', 'deployment.create'], env);
    expect(missingArg.code).to.not.equal(0);
    expect(missingArg.stderr).to.match(/missing required argument 'json'/);

    expect(await waitingJobs()).to.deep.equal([]);
  });

  it('stops with one message listing every configuration problem', async () => {
    const run = await fleet(['enqueue', 'deployment.create', '{}'], { ...env, FLEET_CONCURRENCY: 'lots', LOG_LEVEL: 'chatty' });
    expect(run.code).to.equal(2);
    expect(run.stderr).to.contain('FLEET_CONCURRENCY: must be a whole number');
    expect(run.stderr).to.contain('LOG_LEVEL: must be one of');
  });

  it('status prints a deployment, refuses a malformed id, and exits 1 for an absent one', async () => {
    const bad = await fleet(['status', 'nope'], env);
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.contain('<deploymentId>: must be a UUID');

    const absent = await fleet(['status', randomUUID()], env);
    expect(absent.code).to.equal(1);
    expect(absent.stderr).to.contain('not found');

    const deploymentId = randomUUID();
    await db.dataSource.query(`INSERT INTO deployments (id, name, state, version, state_changed_at) VALUES ($1, 'web', 'pending', 1, now())`, [
      deploymentId,
    ]);
    const found = await fleet(['status', deploymentId, '--json'], env);
    expect(found.code, found.stderr).to.equal(0);
    expect(JSON.parse(found.stdout)).to.deep.nested.include({ 'deployment.id': deploymentId, 'deployment.state': 'pending' });
  });

  it('status escapes what producers stored: no raw escape sequence, CR or bidi override reaches the terminal', async () => {
    const deploymentId = randomUUID();
    const attemptId = randomUUID();
    const forged = `\u001b[2J\u001b[H\rweb (${randomUUID()})\n  state     ready\u009b31m\u202e`;
    await db.dataSource.query(`INSERT INTO deployments (id, name, state, version, state_changed_at) VALUES ($1, $2, 'failed', 3, now())`, [
      deploymentId,
      'web\u001b]0;pwned\u0007',
    ]);
    await db.dataSource.query(`INSERT INTO attempts (id, deployment_id, number, status, reason) VALUES ($1, $2, 1, 'cancelled', $3)`, [
      attemptId,
      deploymentId,
      forged,
    ]);
    await db.dataSource.query(`UPDATE deployments SET current_attempt_id = $1 WHERE id = $2`, [attemptId, deploymentId]);
    await db.dataSource.query(
      `INSERT INTO state_transitions (deployment_id, attempt_id, from_state, to_state, version, reason, event_id) VALUES ($1, $2, 'deploying', 'failed', 3, $3, $4)`,
      [deploymentId, attemptId, 'cancelled\r    v9  forged', 'e\u001b[2J'],
    );
    // eslint-disable-next-line no-control-regex -- matching control characters is the point
    const raw = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/;
    const text = await fleet(['status', deploymentId], env);
    expect(text.code, text.stderr).to.equal(0);
    expect(raw.test(text.stdout), JSON.stringify(text.stdout)).to.equal(false);
    expect(text.stdout.split('\n')).to.have.length(8); // the seven lines status writes, and no forged one
    expect(text.stdout).to.contain('(\\u001b[2J\\u001b[H\\rweb (').and.to.contain('cancelled\\r    v9  forged');
    const json = await fleet(['status', deploymentId, '--json'], env);
    expect(raw.test(json.stdout), json.stdout).to.equal(false);
    expect(JSON.parse(json.stdout)).to.deep.nested.include({ 'deployment.currentAttempt.reason': forged }); // still the stored value
  });

  it('migrate reports an up-to-date schema', async () => {
    const run = await fleet(['migrate'], env);
    expect(run.code, run.stderr).to.equal(0);
    expect(run.stdout).to.contain('schema is up to date');
  });

  it('migrate --status lists every migration as applied, and a pending one as pending without applying it', async () => {
    const run = await fleet(['migrate', '--status'], env);
    expect(run.code, run.stderr).to.equal(0);
    const lines = run.stdout.trim().split('\n');
    expect(lines.slice(0, -1)).to.deep.equal(MIGRATIONS.map((m) => `applied ${m.name ?? ''}`));
    expect(lines.at(-1)).to.equal(`${MIGRATIONS.length} applied, 0 pending`);

    const fresh = await openTestDatabase(2);
    const last = MIGRATIONS[MIGRATIONS.length - 1]?.name ?? '';
    await fresh.dataSource.query(`DELETE FROM migrations WHERE name = $1`, [last]);
    try {
      const pending = await fleet(['migrate', '--status'], { ...env, DATABASE_URL: fresh.url });
      expect(pending.code, pending.stderr).to.equal(0);
      expect(pending.stdout)
        .to.contain(`pending ${last}\n`)
        .and.to.contain(`${MIGRATIONS.length - 1} applied, 1 pending\n`);
      const still = await fresh.dataSource.query<unknown[]>(`SELECT 1 FROM migrations WHERE name = $1`, [last]);
      expect(still).to.have.length(0);
    } finally {
      await fresh.close();
    }
  });

  it('worker refuses an unmigrated database', async () => {
    const fresh = await openTestDatabase(2);
    await fresh.dataSource.query(`DELETE FROM migrations`);
    try {
      const run = await fleet(['worker'], { ...env, DATABASE_URL: fresh.url });
      expect(run.code).to.equal(1);
      expect(run.stderr).to.contain('run `fleet migrate` first');
    } finally {
      await fresh.close();
    }
  });

  it('worker refuses a schema a newer release contracted: exit 6, naming the migration it lacks', async () => {
    const fresh = await openTestDatabase(2);
    await fresh.dataSource.query(`INSERT INTO migrations (timestamp, name) VALUES (1799999999999, 'Future1799999999999')`);
    await fresh.dataSource.query(
      `CREATE OR REPLACE FUNCTION fleet_schema_requires() RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT 'Future1799999999999'::text $$`,
    );
    try {
      const run = await fleet(['worker'], { ...env, DATABASE_URL: fresh.url });
      expect(run.code, run.stderr).to.equal(6);
      expect(run.stderr)
        .to.contain('requires migration Future1799999999999')
        .and.to.contain(`up to ${MIGRATIONS.at(-1)?.name ?? ''}`);
    } finally {
      await fresh.close();
    }
  });

  it('commands without URLs and without a running local fleet say what to do', async function () {
    const endpointsFile = path.join(repoRoot(), '.fleet', 'run', 'endpoints.json');
    if (isProcessAlive(readPid(endpointsFile))) this.skip(); // a developer's `npm start` is running in this checkout
    const run = await fleet(['migrate'], { FLEET_PREFIX: prefix });
    expect(run.code).to.equal(2);
    expect(run.stderr).to.contain('REDIS_URL and DATABASE_URL not set');
    expect(run.stderr).to.contain('npm start');
  });

  it('the SDK rejects a bad payload before touching Redis, and fails fast when Redis is unreachable', async () => {
    const producer = new LifecycleProducer({ connection: testEnv().redisUrl, prefix });
    try {
      const err = await producer.enqueue('attempt.start', { deploymentId: randomUUID() }).catch((e: unknown) => e);
      expect(err).to.be.instanceOf(ValidationError);
      expect((err as ValidationError).issues).to.deep.equal([{ field: 'attemptId', rule: 'is required' }]);
      expect(await waitingJobs()).to.deep.equal([]);
    } finally {
      await producer.close();
    }

    const offline = new LifecycleProducer({ connection: 'redis://127.0.0.1:1', prefix });
    try {
      const err = await offline.createDeployment({ deploymentId: randomUUID(), name: 'web' }).catch((e: unknown) => e);
      expect(err).to.be.instanceOf(Error);
    } finally {
      await offline.close();
    }
  });
});
