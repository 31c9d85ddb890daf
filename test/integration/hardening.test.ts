import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { expect } from 'chai';
import IORedis from 'ioredis';
import { Client } from 'pg';
import { startFleet, type Fleet } from '../../src/app';
import { loadConfig } from '../../src/config';
import { createLogger, scrubUrls } from '../../src/log';
import { startLocalServices, type LocalServices } from '../../dev/servers';
import { fleetAclRules } from '../../src/redis/connection';
import { OutboxRelay } from '../../src/streams/outbox-relay';
import { createDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { freePort } from '../helpers/net';
import { ReadyServer } from '../helpers/ready-server';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';
import { createDataSource } from '../../ormconfig';
import { migrate } from '../../src/entities/schema/migrate';
import { repoRoot } from '../../src/util';

const ROOT = repoRoot();
const FLEET = path.join(ROOT, 'bin', 'fleet.js');

const secret = (label: string) => `${label}-${randomBytes(9).toString('hex')}`;

/** Collects everything a pino logger writes. */
class Capture extends Writable {
  text = '';
  override _write(chunk: Buffer, _encoding: string, callback: () => void): void {
    this.text += chunk.toString();
    callback();
  }
}

/** Output of a child process, for assertions on what it logged. */
function collect(child: ChildProcess): { out: string } {
  const output = { out: '' };
  child.stdout?.on('data', (c: Buffer) => (output.out += c.toString()));
  child.stderr?.on('data', (c: Buffer) => (output.out += c.toString()));
  return output;
}

async function stopChild(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
  try {
    return await exited;
  } finally {
    clearTimeout(timer);
  }
}

describe('hardening', function () {
  this.timeout(90_000);

  describe('secrets in logs', () => {
    it('never logs a password from REDIS_URL or DATABASE_URL, the board password or an Authorization header, over a full run', async () => {
      const redisPassword = secret('redispw');
      const wrongRedisPassword = secret('wrongredispw');
      const db = await createDatabase();
      // the suite's PostgreSQL has a generated password; a server that trusts loopback gets one seeded (carried, not checked)
      const pgPassword = decodeURIComponent(new URL(db.url).password) || secret('pgpw');
      const boardPassword = secret('boardpw');
      const boardGuess = secret('boardguess');
      const bearer = secret('token');
      const user = `u${randomBytes(4).toString('hex')}`;
      const prefix = uniquePrefix();
      const admin = testRedis();
      const capture = new Capture();
      const logger = createLogger('trace', capture);
      let fleet: Fleet | null = null;
      const closers: Array<() => Promise<void>> = [];
      const ready = new ReadyServer('ok');
      try {
        await admin.call('ACL', 'SETUSER', user, 'reset', 'on', `>${redisPassword}`, ...fleetAclRules(prefix));
        const redisUrl = new URL(testEnv().redisUrl);
        redisUrl.username = user;
        redisUrl.password = redisPassword;
        const databaseUrl = new URL(db.url);
        databaseUrl.password = pgPassword;
        const ds = createDataSource({ url: databaseUrl.toString(), poolSize: 2 });
        await ds.initialize();
        await migrate(ds);
        await ds.destroy();

        const config = loadConfig({
          REDIS_URL: redisUrl.toString(),
          DATABASE_URL: databaseUrl.toString(),
          FLEET_PREFIX: prefix,
          FLEET_BOARD_USER: 'admin',
          FLEET_BOARD_PASSWORD: boardPassword,
          FLEET_HTTP_PORT: '0',
          FLEET_SWEEP_EVERY_S: '1',
          FLEET_READY_WINDOW_S: '5',
          LOG_LEVEL: 'trace',
        });
        const started = await startFleet(config, { redisUrl: redisUrl.toString(), databaseUrl: databaseUrl.toString() }, logger, { http: true });
        fleet = started;
        // what a careless line elsewhere might do: log the configuration, or a URL in a message
        logger.info({ config, endpoints: { redisUrl: redisUrl.toString(), databaseUrl: databaseUrl.toString() } }, 'configuration');
        logger.warn(`could not reach ${redisUrl.toString()} or ${databaseUrl.toString()}`);

        // a full lifecycle through the HTTP intake, with an Authorization header the API does not need
        const api = started.httpUrl ?? '';
        const deploymentId = randomUUID();
        const attemptId = randomUUID();
        const endpointUrl = await ready.listen();
        const events: Array<[string, Record<string, unknown>]> = [
          ['deployment.create', { name: 'web' }],
          ['attempt.create', { attemptId }],
          ['attempt.start', { attemptId }],
          ['attempt.heartbeat', { attemptId }],
          ['attempt.end', { attemptId, outcome: 'succeeded', endpoint: { url: endpointUrl, kind: 'node_port' } }],
          ['deployment.resolve', { outcome: 'ready' }], // rejected: logged as a warning
          ['deployment.explode', {}], // invalid: a 400
        ];
        for (const [name, data] of events) {
          await fetch(`${api}/api/events`, {
            method: 'POST',
            headers: { 'content-type': 'application/json', authorization: `Bearer ${bearer}` },
            body: JSON.stringify({ name, data: { deploymentId, ...data } }),
          });
        }
        await waitFor('the deployment to be ready', async () => {
          const res = await fetch(`${api}/api/deployments/${deploymentId}`);
          return res.ok && ((await res.json()) as { state: string }).state === 'ready' ? true : undefined;
        });
        await waitFor('a readiness probe by the sweep', () => (ready.requests.length > 0 ? true : undefined));
        const basic = (pw: string) => `Basic ${Buffer.from(`admin:${pw}`).toString('base64')}`;
        expect((await fetch(`${api}/admin/queues`, { headers: { authorization: basic(boardPassword) } })).status).to.equal(200);
        expect((await fetch(`${api}/admin/queues`, { headers: { authorization: basic(boardGuess) } })).status).to.equal(401);

        // failures that carry credentials in their errors: Redis AUTH refused (ioredis attaches the AUTH command and
        // its arguments to the error), and a database that cannot be reached
        const badRedis = new URL(redisUrl.toString());
        badRedis.password = wrongRedisPassword;
        const badDb = new URL(databaseUrl.toString());
        badDb.port = String(await freePort());
        const relay = new OutboxRelay({
          databaseUrl: badDb.toString(),
          redis: badRedis.toString(),
          streamKey: `${prefix}:x`,
          logger,
          standbyRetryMs: 100,
        });
        closers.push(() => relay.close());
        relay.start();
        await waitFor('the refused AUTH to be logged', () => (capture.text.includes('WRONGPASS') ? true : undefined));
        await waitFor('the unreachable database to be logged', () => (capture.text.includes('relay cycle failed') ? true : undefined));
        // and at debug level too: the relay's next failed cycle logs its whole error there
        await waitFor('a debug line with an error', () => (capture.text.includes('relay cycle failed again') ? true : undefined));
      } finally {
        for (const close of closers.reverse()) await close();
        await fleet?.close(5000);
        await ready.close();
        await admin.call('ACL', 'DELUSER', user);
        admin.disconnect();
        await db.drop();
        await dropPrefix(prefix);
      }

      const text = capture.text;
      // it did log, errors included: the checks below are not vacuous
      for (const seen of ['attempt.end applied', 'became the active outbox relay', 'WRONGPASS', 'relay cycle failed', '"level":20']) {
        expect(text).to.include(seen);
      }
      expect(text).to.include('[redacted]');
      for (const s of [redisPassword, wrongRedisPassword, pgPassword, boardPassword, boardGuess, bearer]) {
        expect(text, `the log holds ${s}`).not.to.include(s);
      }
      for (const s of [`admin:${boardPassword}`, `admin:${boardGuess}`]) {
        expect(text).not.to.include(Buffer.from(s).toString('base64'));
      }
    });

    it('scrubs passwords from URLs in any string', () => {
      expect(scrubUrls('redis://u:p%40ss@h:1/0 and postgres://fleet:x@127.0.0.1:5/db?sslmode=require, rediss://:only@h')).to.equal(
        'redis://u:[redacted]@h:1/0 and postgres://fleet:[redacted]@127.0.0.1:5/db?sslmode=require, rediss://:[redacted]@h',
      );
      expect(scrubUrls('http://127.0.0.1:3000/api and user@example.com')).to.equal('http://127.0.0.1:3000/api and user@example.com');
    });
  });

  describe('least privilege, over TLS', () => {
    const openssl = spawnSync('openssl', ['version']).status === 0;
    let tmp: string;
    let services: LocalServices | null = null;
    let redisServer: ChildProcess | null = null;
    const children: ChildProcess[] = [];

    before(function () {
      if (!openssl) this.skip(); // the certificates are made with openssl
      tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-hardening-'));
    });
    after(async () => {
      for (const child of children) await stopChild(child);
      redisServer?.kill('SIGKILL');
      await services?.stop();
      if (tmp !== undefined) fs.rmSync(tmp, { recursive: true, force: true });
    });

    /** A CA and a server certificate for localhost and 127.0.0.1. */
    function makeCertificates(): { ca: string; cert: string; key: string } {
      const run = (args: string[]) => {
        const r = spawnSync('openssl', args, { cwd: tmp, encoding: 'utf8' });
        if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr}`);
      };
      const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
      run(['req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2', '-subj', '/CN=lifecycle-fleet test CA']);
      run(['req', ...ec, '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=localhost']);
      fs.writeFileSync(path.join(tmp, 'san.ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n');
      run([
        'x509',
        '-req',
        '-in',
        'server.csr',
        '-CA',
        'ca.crt',
        '-CAkey',
        'ca.key',
        '-CAcreateserial',
        '-out',
        'server.crt',
        '-days',
        '2',
        '-extfile',
        'san.ext',
      ]);
      return { ca: path.join(tmp, 'ca.crt'), cert: path.join(tmp, 'server.crt'), key: path.join(tmp, 'server.key') };
    }

    it('runs worker, relay, sweep, HTTP and a consumer as a DML-only PostgreSQL role and a prefix-confined Redis ACL user, over TLS', async () => {
      const certs = makeCertificates();
      const ca = fs.readFileSync(certs.ca);
      const prefix = uniquePrefix();
      const pw = { migrator: secret('migpw'), app: secret('apppw'), redisAdmin: secret('redisadminpw'), redisApp: secret('redisapppw') };

      // --- PostgreSQL of its own: SSL on, password (scram) auth for the two roles, SSL required for them
      services = await startLocalServices({ dir: path.join(ROOT, '.fleet', 'hardening'), redis: false, postgres: true, fresh: true, fast: true });
      const dataDir = services.pgDataDir ?? '';
      const owner = fs.statSync(dataDir);
      for (const [from, to] of [
        [certs.cert, 'server.crt'],
        [certs.key, 'server.key'],
      ] as const) {
        fs.copyFileSync(from, path.join(dataDir, to));
        fs.chownSync(path.join(dataDir, to), owner.uid, owner.gid);
        fs.chmodSync(path.join(dataDir, to), 0o600);
      }
      const hba = path.join(dataDir, 'pg_hba.conf');
      fs.writeFileSync(
        hba,
        `hostssl all fleet_app,fleet_migrator 127.0.0.1/32 scram-sha-256\nhost all fleet_app,fleet_migrator 127.0.0.1/32 reject\n${fs.readFileSync(hba, 'utf8')}`,
      );
      const superUrl = services.adminDatabaseUrl ?? ''; // the fleet's own role is no superuser
      const asSuper = async (database: string, statements: string[]) => {
        const url = new URL(superUrl);
        url.pathname = `/${database}`;
        const c = new Client({ connectionString: url.toString() });
        await c.connect();
        try {
          for (const s of statements) await c.query(s);
        } finally {
          await c.end();
        }
      };
      await asSuper('fleet', [
        `ALTER SYSTEM SET ssl = 'on'`,
        `SELECT pg_reload_conf()`,
        `CREATE ROLE fleet_migrator LOGIN PASSWORD '${pw.migrator}'`,
        `CREATE ROLE fleet_app LOGIN PASSWORD '${pw.app}'`,
        `CREATE DATABASE fleetdb`,
      ]);
      await asSuper('fleetdb', [
        `REVOKE ALL ON DATABASE fleetdb FROM PUBLIC`,
        `REVOKE ALL ON SCHEMA public FROM PUBLIC`,
        `GRANT CONNECT ON DATABASE fleetdb TO fleet_migrator, fleet_app`,
        `CREATE SCHEMA lifecycle AUTHORIZATION fleet_migrator`,
        `ALTER ROLE fleet_migrator IN DATABASE fleetdb SET search_path = lifecycle`,
        `ALTER ROLE fleet_app IN DATABASE fleetdb SET search_path = lifecycle`,
      ]);
      const pgUrl = (role: 'fleet_migrator' | 'fleet_app', password: string, ssl = true) =>
        `postgres://${role}:${password}@localhost:${services?.pgPort ?? 0}/fleetdb${ssl ? `?sslmode=verify-full&sslrootcert=${encodeURIComponent(certs.ca)}` : ''}`;

      // --- Redis of its own: TLS only, the default user behind a password, the fleet's user confined to its prefix
      const redisPort = await freePort();
      redisServer = spawn(
        'redis-server',
        [
          '--port',
          '0',
          '--tls-port',
          String(redisPort),
          '--bind',
          '127.0.0.1',
          '--tls-cert-file',
          certs.cert,
          '--tls-key-file',
          certs.key,
          '--tls-ca-cert-file',
          certs.ca,
          '--tls-auth-clients',
          'no',
          '--save',
          '',
          '--appendonly',
          'no',
          '--requirepass',
          pw.redisAdmin,
        ],
        { stdio: 'ignore' },
      );
      const tlsRedis = (username: string, password: string) =>
        new IORedis({
          host: 'localhost',
          port: redisPort,
          username,
          password,
          tls: { ca },
          maxRetriesPerRequest: 1,
          retryStrategy: () => null,
          lazyConnect: true,
        });
      const admin = tlsRedis('default', pw.redisAdmin);
      admin.on('error', () => undefined);
      await waitFor('redis-server with TLS', async () => {
        try {
          if (admin.status !== 'ready') await admin.connect();
          return (await admin.ping()) === 'PONG' ? true : undefined;
        } catch {
          admin.disconnect();
          return undefined;
        }
      });
      await admin.call('ACL', 'SETUSER', 'fleetapp', 'reset', 'on', `>${pw.redisApp}`, ...fleetAclRules(prefix));
      const redisUrl = `rediss://fleetapp:${pw.redisApp}@localhost:${redisPort}`;

      // --- migrations as the schema's owner, then only the DML the app needs
      const env = (databaseUrl: string, extra: Record<string, string> = {}): NodeJS.ProcessEnv => {
        const e: NodeJS.ProcessEnv = {
          ...process.env,
          REDIS_URL: redisUrl,
          DATABASE_URL: databaseUrl,
          FLEET_PREFIX: prefix,
          NODE_EXTRA_CA_CERTS: certs.ca,
          ...extra,
        };
        return e;
      };
      const migrateRun = spawnSync(process.execPath, [FLEET, 'migrate'], { env: env(pgUrl('fleet_migrator', pw.migrator)), encoding: 'utf8' });
      expect(migrateRun.status, migrateRun.stderr).to.equal(0);
      const migrator = new Client({ connectionString: pgUrl('fleet_migrator', pw.migrator) });
      await migrator.connect();
      try {
        for (const sql of [
          `GRANT USAGE ON SCHEMA lifecycle TO fleet_app`,
          `GRANT SELECT ON migrations TO fleet_app`,
          `GRANT SELECT, INSERT, UPDATE ON deployments, attempts TO fleet_app`,
          `GRANT SELECT, INSERT ON state_transitions TO fleet_app`,
          // the relay's leader prunes published outbox rows and old processed_events rows
          `GRANT SELECT, INSERT, DELETE ON processed_events TO fleet_app`,
          `GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO fleet_app`,
          `GRANT USAGE ON ALL SEQUENCES IN SCHEMA lifecycle TO fleet_app`,
        ]) {
          await migrator.query(sql);
        }
      } finally {
        await migrator.end();
      }

      // --- the fleet, as fleet_app and fleetapp
      const appDb = pgUrl('fleet_app', pw.app);
      const httpPort = await freePort();
      const spawnFleet = (args: string[], extra: Record<string, string> = {}) => {
        const child = spawn(process.execPath, [FLEET, ...args], { env: env(appDb, extra), stdio: ['ignore', 'pipe', 'pipe'] });
        children.push(child);
        return collect(child);
      };
      const worker = spawnFleet(['worker'], { LOG_LEVEL: 'info', FLEET_SWEEP_EVERY_S: '1', FLEET_READY_WINDOW_S: '5' });
      const http = spawnFleet(['http'], { LOG_LEVEL: 'info', FLEET_HTTP_PORT: String(httpPort) });
      const tail = spawnFleet(['tail', '--group', 'audit', '--from', '0', '--json']);
      const api = `http://127.0.0.1:${httpPort}`;
      await waitFor(
        'the HTTP surface to be ready',
        async () => ((await fetch(`${api}/readyz`).catch(() => null))?.status === 200 ? true : undefined),
        30_000,
      );
      await waitFor('the relay to lead', () => (worker.out.includes('became the active outbox relay') ? true : undefined), 30_000);

      const ready = new ReadyServer('ok');
      const endpointUrl = await ready.listen();
      try {
        const deploymentId = randomUUID();
        const attemptId = randomUUID();
        for (const [name, data] of [
          ['deployment.create', { name: 'web' }],
          ['attempt.create', { attemptId }],
          ['attempt.start', { attemptId }],
          ['attempt.heartbeat', { attemptId }],
          ['attempt.end', { attemptId, outcome: 'succeeded', endpoint: { url: endpointUrl, kind: 'node_port' } }],
        ] as const) {
          const res = await fetch(`${api}/api/events`, {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ name, data: { deploymentId, ...data } }),
          });
          expect(res.status).to.equal(202);
        }
        const version = await waitFor('the deployment to be ready', async () => {
          const res = await fetch(`${api}/api/deployments/${deploymentId}`);
          const body = res.ok ? ((await res.json()) as { state: string; version: number }) : null;
          return body?.state === 'ready' ? body.version : undefined;
        });
        // the relay published under the ACL user, and a consumer group read and acknowledged every version (3 or 4:
        // the worker runs events concurrently, and an end that overtakes its start is applied from pending)
        await waitFor(
          'every transition through the consumer group',
          () => (tail.out.split('\n').filter((l) => l.includes(deploymentId)).length >= version ? true : undefined),
          30_000,
        ).catch((err: Error) => {
          throw new Error(`${err.message}\ntail: ${tail.out.slice(-2000)}\nworker: ${worker.out.slice(-3000)}`);
        });
        // the sweep probed the endpoint and stamped it: an UPDATE as fleet_app
        const stampedAfter = Date.now();
        await waitFor(
          'a sweep stamp',
          async () => {
            const res = await fetch(`${api}/api/deployments/${deploymentId}`);
            const body = (await res.json()) as { lastReadyAt: string | null };
            return body.lastReadyAt !== null && Date.parse(body.lastReadyAt) >= stampedAfter ? true : undefined;
          },
          15_000,
        );
        const endpoint = (await (await fetch(`${api}/api/deployments/${deploymentId}/endpoint`)).json()) as { source: string };
        expect(endpoint).to.include({ source: 'private' });
      } finally {
        await ready.close();
      }

      // --- what the Redis user may not do
      const app = tlsRedis('fleetapp', pw.redisApp);
      app.on('error', () => undefined);
      await app.connect();
      try {
        expect(await app.set(`${prefix}:probe`, '1')).to.equal('OK');
        const refused: Array<[string, () => Promise<unknown>]> = [
          ['SET outside the prefix', () => app.set('other:key', '1')],
          ['GET another fleet', () => app.get('fleet:lifecycle:meta')],
          ['FLUSHALL', () => app.flushall()],
          ['KEYS', () => app.keys('*')],
          ['CONFIG GET', () => app.config('GET', '*')],
          ['CLIENT KILL', () => app.call('CLIENT', 'KILL', 'TYPE', 'normal')],
          ['ACL SETUSER', () => app.call('ACL', 'SETUSER', 'fleetapp', '+@all')],
          ['SCRIPT FLUSH', () => app.call('SCRIPT', 'FLUSH')],
          ['SELECT', () => app.select(1)],
          ['PUBLISH outside the prefix', () => app.publish('other', 'x')],
          ['EVAL touching another key', () => app.eval(`return redis.call('GET', KEYS[1])`, 1, 'other:key')],
        ];
        for (const [what, attempt] of refused) {
          let error: unknown = null;
          try {
            await attempt();
          } catch (err) {
            error = err;
          }
          expect(error, what).to.be.instanceOf(Error);
          expect((error as Error).message, what).to.match(/NOPERM/);
        }
      } finally {
        app.disconnect();
        admin.disconnect();
      }

      // --- what the PostgreSQL role may not do
      const asApp = new Client({ connectionString: appDb });
      await asApp.connect();
      try {
        const [row] = (await asApp.query<{ super: boolean }>(`SELECT rolsuper AS super FROM pg_roles WHERE rolname = current_user`)).rows;
        expect(row?.super).to.equal(false);
        for (const sql of [
          `CREATE TABLE lifecycle.x (id int)`,
          `CREATE TABLE public.x (id int)`,
          `DROP TABLE deployments`,
          `ALTER TABLE deployments ADD COLUMN x int`,
          `TRUNCATE outbox`,
          `DELETE FROM state_transitions`,
          `UPDATE state_transitions SET reason = 'x'`,
          `UPDATE processed_events SET outcome = 'x'`,
          `INSERT INTO migrations (timestamp, name) VALUES (1, 'x')`,
        ]) {
          let code: string | undefined;
          try {
            await asApp.query(sql);
          } catch (err) {
            code = (err as { code?: string }).code;
          }
          expect(code, sql).to.equal('42501'); // insufficient_privilege
        }
      } finally {
        await asApp.end();
      }
      for (const [url, code] of [
        [pgUrl('fleet_app', pw.app, false), '28000'], // no SSL: refused by pg_hba
        [pgUrl('fleet_app', 'wrong-password'), '28P01'],
      ] as const) {
        const c = new Client({ connectionString: url });
        c.on('error', () => undefined);
        let got: string | undefined;
        try {
          await c.connect();
        } catch (err) {
          got = (err as { code?: string }).code;
        } finally {
          await c.end().catch(() => undefined);
        }
        expect(got, url.replace(/:[^:@/]+@/, ':***@')).to.equal(code);
      }

      // --- clean stops, and nothing refused along the way; no secret in any output
      for (const child of children.splice(0)) expect(await stopChild(child)).to.equal(0);
      const logs = [worker.out, http.out, tail.out, migrateRun.stdout, migrateRun.stderr].join('\n');
      const refusals = logs.split('\n').filter((l) => /NOPERM|permission denied|no pg_hba|self.signed|unable to verify/i.test(l));
      expect(refusals).to.deep.equal([]);
      for (const s of Object.values(pw)) expect(logs).not.to.include(s);
    });
  });
});
