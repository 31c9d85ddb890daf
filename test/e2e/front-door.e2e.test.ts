/**
 * Black-box, as the attacker tried it: `fleet start` listening on 0.0.0.0 with tokens, an allow-list and
 * board credentials, talked to only over 127.0.0.1.
 */
import { execFile, spawn } from 'node:child_process';
import { FleetProcess } from '../helpers/fleet-process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Queue } from 'bullmq';
import { LIFECYCLE_QUEUE } from '../../src/queues/names';
import { createToken } from '../../src/http/tokens';
import { createDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { freePort } from '../helpers/net';
import { ReadyServer } from '../helpers/ready-server';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';
import { repoRoot } from '../../src/util';

const FLEET = path.join(repoRoot(), 'bin', 'fleet.js');

function fleetRun(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [FLEET, ...args], { env, timeout: 30_000 }, (err, stdout, stderr) =>
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, stdout, stderr }),
    );
  });
}

describe('front door, black-box: fleet start on 0.0.0.0', function () {
  this.timeout(120_000);

  it('refuses to start off loopback without a tokens file, an allow-list, or with a short board password', async () => {
    const env = { PATH: process.env.PATH, REDIS_URL: testEnv().redisUrl, DATABASE_URL: testEnv().databaseUrl, FLEET_HTTP_HOST: '0.0.0.0' };
    const bare = await fleetRun(['http'], { ...env, FLEET_BOARD_USER: 'ops', FLEET_BOARD_PASSWORD: 'short' });
    expect(bare.code).to.equal(2);
    for (const text of [
      'FLEET_API_TOKENS_FILE: required',
      'FLEET_ENDPOINT_ALLOW: required',
      'FLEET_BOARD_PASSWORD: must be at least 12 characters',
    ]) {
      expect(bare.stderr).to.contain(text);
    }
    expect(bare.stderr).to.not.contain('short');
  });

  it('scopes every write, records the admin as actor everywhere, and reloads tokens on SIGHUP', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-e2e-'));
    const tokensFile = path.join(dir, 'tokens.json');
    const created = await fleetRun(['token', 'create', '--name', 'platform-admin', '--scopes', 'read,events:admin', '--file', tokensFile], {
      PATH: process.env.PATH,
    });
    expect(created.code, created.stderr).to.equal(0);
    const adminToken = created.stdout.split('\n')[0] ?? '';
    expect(fs.readFileSync(tokensFile, 'utf8')).to.not.contain(adminToken);
    const writer = createToken('ci-deployer', ['read', 'events:write']);
    const reader = createToken('dashboard', ['read']);
    const entries = JSON.parse(fs.readFileSync(tokensFile, 'utf8')) as unknown[];
    fs.writeFileSync(tokensFile, JSON.stringify([...entries, writer.entry, reader.entry]));

    const db = await createDatabase();
    const prefix = uniquePrefix();
    const port = await freePort();
    const ready = new ReadyServer('ok');
    const endpointUrl = await ready.listen();
    const env: NodeJS.ProcessEnv = {
      PATH: process.env.PATH,
      REDIS_URL: testEnv().redisUrl,
      DATABASE_URL: db.url,
      FLEET_PREFIX: prefix,
      FLEET_HTTP_HOST: '0.0.0.0',
      FLEET_HTTP_PORT: String(port),
      FLEET_API_TOKENS_FILE: tokensFile,
      FLEET_ENDPOINT_ALLOW: '127.0.0.1',
      FLEET_BOARD_USER: 'ops',
      FLEET_BOARD_PASSWORD: 'a-board-password-of-some-length',
      LOG_LEVEL: 'info',
    };
    const fleet = new FleetProcess(['start'], env);
    const { child, exited } = fleet;
    const api = `http://127.0.0.1:${port}`;
    const call = (method: string, url: string, token: string | null, body?: unknown) =>
      fetch(`${api}${url}`, {
        method,
        headers: {
          ...(token === null ? {} : { authorization: `Bearer ${token}` }),
          ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        },
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      });
    const event = (token: string, name: string, data: Record<string, unknown>) => call('POST', '/api/events', token, { name, data });
    const redis = testRedis();
    const queue = new Queue(LIFECYCLE_QUEUE, { connection: redis, prefix });
    try {
      await waitFor('the fleet to serve', async () => ((await fetch(`${api}/readyz`).catch(() => null))?.status === 200 ? true : undefined), 60_000);
      expect(fleet.log).to.contain('API tokens loaded');

      const deploymentId = randomUUID();
      const attemptId = randomUUID();
      for (const [name, data] of [
        ['deployment.create', { name: 'web' }],
        ['attempt.create', { attemptId }],
        ['attempt.start', { attemptId }],
        ['attempt.end', { attemptId, outcome: 'succeeded', endpoint: { url: endpointUrl, kind: 'node_port' } }],
      ] as const) {
        const res = await event(writer.token, name, { deploymentId, ...data });
        expect(res.status, `${name}: ${await res.clone().text()}`).to.equal(202);
      }
      const state = async () =>
        (await (await call('GET', `/api/deployments/${deploymentId}`, reader.token)).json()) as { state: string; version: number };
      await waitFor('ready', async () => ((await state()).state === 'ready' ? true : undefined));

      // nobody without a token reads or writes; a read token cannot enqueue
      expect((await call('GET', `/api/deployments/${deploymentId}`, null)).status).to.equal(401);
      const jobs = await queue.count();
      expect((await event(reader.token, 'deployment.teardown', { deploymentId })).status).to.equal(403);
      // an events:write token cannot force a teardown, resolve, or orphan
      expect((await event(writer.token, 'deployment.teardown', { deploymentId, force: true })).status).to.equal(403);
      expect((await event(writer.token, 'deployment.resolve', { deploymentId, outcome: 'failed' })).status).to.equal(403);
      expect((await event(writer.token, 'attempt.orphaned', { deploymentId, attemptId })).status).to.equal(403);
      // hijack and SSRF attempts are refused before anything is enqueued
      const hijack = await event(writer.token, 'attempt.end', {
        deploymentId,
        attemptId,
        outcome: 'succeeded',
        endpoint: { url: 'https://attacker.example/', kind: 'cluster_dns' },
      });
      expect(hijack.status).to.equal(400);
      const ssrf = await event(writer.token, 'attempt.end', {
        deploymentId,
        attemptId,
        outcome: 'succeeded',
        endpoint: { url: 'http://127.0.0.1:18999/internal-admin?x=', kind: 'node_port' },
      });
      expect(ssrf.status).to.equal(400);
      expect(await queue.count()).to.equal(jobs);
      expect((await state()).state).to.equal('ready');

      // the admin's forced teardown carries its name: history (the API), and the stream
      const teardown = await event(adminToken, 'deployment.teardown', { deploymentId, force: true });
      expect(teardown.status).to.equal(202);
      await waitFor('pending', async () => ((await state()).state === 'pending' ? true : undefined));
      const { version } = await state();
      const history = (await (
        await call('GET', `/api/deployments/${deploymentId}/transitions?afterVersion=${version - 1}`, reader.token)
      ).json()) as {
        items: Array<{ version: number; actor: string; reason: string }>;
      };
      expect(history.items).to.deep.equal([{ ...history.items[0], version, actor: 'platform-admin', reason: 'torn_down' }]);
      const entry = await waitFor('the teardown on the stream', async () => {
        const entries = await redis.xrange(`${prefix}:transitions`, '-', '+');
        const fields = entries.map(
          ([, f]) => Object.fromEntries(f.flatMap((v, i, a) => (i % 2 === 0 ? [[v, a[i + 1]]] : []))) as Record<string, string>,
        );
        return fields.find((f) => f.deploymentId === deploymentId && f.version === String(version));
      });
      expect(entry).to.deep.include({ actor: 'platform-admin', reason: 'torn_down', to: 'pending' });
      expect(entry.actor).to.equal('platform-admin');

      // a token added to the file works after SIGHUP, without a restart
      const late = createToken('late-reader', ['read']);
      expect((await call('GET', '/api/deployments', late.token)).status).to.equal(401);
      const current = JSON.parse(fs.readFileSync(tokensFile, 'utf8')) as unknown[];
      fs.writeFileSync(`${tokensFile}.new`, JSON.stringify([...current, late.entry]), { mode: 0o600 });
      fs.renameSync(`${tokensFile}.new`, tokensFile);
      child.kill('SIGHUP');
      await waitFor('the new token to be accepted', async () =>
        (await call('GET', '/api/deployments', late.token)).status === 200 ? true : undefined,
      );
      // the process logs the reload after it swapped the tokens in, and its output reaches us through a pipe later still
      await waitFor('the reload in the log', () => (fleet.log.includes('API tokens reloaded') ? true : undefined));
      // SIGHUP is harmless in a process with nothing to reload (Node's default would end it)
      const worker = spawn(process.execPath, [FLEET, 'worker'], {
        env: { ...env, FLEET_HTTP_HOST: '127.0.0.1', FLEET_API_TOKENS_FILE: '' },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let workerLog = '';
      worker.stdout.on('data', (c: Buffer) => (workerLog += c.toString()));
      worker.stderr.on('data', (c: Buffer) => (workerLog += c.toString()));
      const workerExit = new Promise<number | null>((resolve) => worker.on('exit', (code) => resolve(code)));
      await waitFor('the worker to start', () => (workerLog.includes('worker started') ? true : undefined), 30_000);
      worker.kill('SIGHUP');
      await waitFor('the worker to shrug off SIGHUP', () => (workerLog.includes('nothing to reload') ? true : undefined));
      worker.kill('SIGTERM');
      expect(await workerExit, workerLog.slice(-2000)).to.equal(0);
      // the log never carries a token
      for (const t of [adminToken, writer.token, reader.token, late.token]) expect(fleet.log).to.not.contain(t);
    } finally {
      child.kill('SIGTERM');
      const code = await exited;
      await queue.close();
      redis.disconnect();
      await ready.close();
      await db.drop();
      await dropPrefix(prefix);
      fs.rmSync(dir, { recursive: true, force: true });
      expect(code, fleet.log.slice(-3000)).to.equal(0);
    }
  });
});
