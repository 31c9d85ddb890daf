/**
 * `fleet watch` (issue 31): transitions over HTTP with a token, against a real `fleet http` (a child process) over
 * real Redis and PostgreSQL; the watch runs with no REDIS_URL or DATABASE_URL, as an operator without Redis access.
 * Transitions come from the transition service and an outbox relay in this process, as a worker's would.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import type IORedis from 'ioredis';
import { formatEntry } from '../../src/cli/tail';
import { watch as followWatch, type WatchOutcome } from '../../src/cli/watch';
import { createToken } from '../../src/http/tokens';
import { TransitionService } from '../../src/services/transitions';
import { parseEntry, type TransitionEntry } from '../../src/streams/consumer';
import { OutboxRelay } from '../../src/streams/outbox-relay';
import { encodeCursor } from '../../src/streams/stream-follower';
import { repoRoot } from '../../src/util';
import { forgetOutbox, openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { applied, applyVersions } from '../helpers/lifecycle';
import { freePort } from '../helpers/net';
import { dropPrefix, testRedis, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

const FLEET = path.join(repoRoot(), 'bin', 'fleet.js');

/** A child process's output so far, and its exit. */
interface Run {
  readonly child: ChildProcess;
  readonly output: { out: string; err: string };
  readonly exited: Promise<number | null>;
}

/** The environment without the servers' URLs: what an operator with only the HTTP API has. */
function withoutServers(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra };
  delete env.REDIS_URL;
  delete env.DATABASE_URL;
  delete env.FLEET_TOKEN;
  delete env.FLEET_URL;
  return { ...env, ...extra };
}

const lines = (text: string): string[] => text.split('\n').filter((l) => l !== '');

describe('fleet watch: transitions over HTTP with a token', function () {
  this.timeout(120_000);
  let db: TestDatabase;
  let service: TransitionService;
  let redis: IORedis;
  let prefix: string;
  let streamKey: string;
  let api: string;
  let port: number;
  let tokensDir: string;
  let tokensFile: string;
  let readToken: string;
  let writeToken: string;
  let http: Run | null = null;
  const closers: Array<() => Promise<void>> = [];

  before(async () => {
    db = await openTestDatabase(8);
    service = new TransitionService({ dataSource: db.dataSource });
    redis = testRedis();
    tokensDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-watch-'));
    tokensFile = path.join(tokensDir, 'tokens.json');
    const read = createToken('watcher', ['read']);
    const write = createToken('writer', ['events:write']);
    readToken = read.token;
    writeToken = write.token;
    fs.writeFileSync(tokensFile, JSON.stringify([read.entry, write.entry]));
  });
  after(async () => {
    redis.disconnect();
    await db?.close();
    fs.rmSync(tokensDir, { recursive: true, force: true });
  });
  beforeEach(async () => {
    prefix = uniquePrefix();
    streamKey = `${prefix}:transitions`;
    // a stream of its own over the one database: earlier tests' rows are not this relay's to publish
    await forgetOutbox(db);
    const relay = new OutboxRelay({ databaseUrl: db.url, redis: testEnv().redisUrl, streamKey, standbyRetryMs: 200 });
    relay.start();
    closers.push(() => relay.close());
    port = await freePort();
    api = `http://127.0.0.1:${port}`;
    http = await startHttp();
  });
  afterEach(async () => {
    for (const close of closers.splice(0).reverse()) await close();
    await dropPrefix(prefix);
  });

  function spawnRun(args: readonly string[], env: NodeJS.ProcessEnv): Run {
    const child = spawn(process.execPath, [FLEET, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    const output = { out: '', err: '' };
    child.stdout?.on('data', (chunk: Buffer) => (output.out += chunk.toString()));
    child.stderr?.on('data', (chunk: Buffer) => (output.err += chunk.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    closers.push(async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    });
    return { child, output, exited };
  }

  /** `fleet http` on `port`, for this test's prefix, with the tokens file; resolves once it answers /readyz. */
  async function startHttp(): Promise<Run> {
    const run = spawnRun(['http'], {
      ...process.env,
      DATABASE_URL: db.url,
      FLEET_PREFIX: prefix,
      FLEET_HTTP_PORT: String(port),
      FLEET_API_TOKENS_FILE: tokensFile,
      LOG_LEVEL: 'warn',
    });
    await waitFor(
      'fleet http to answer /readyz',
      async () => {
        if (run.child.exitCode !== null) throw new Error(`fleet http exited ${run.child.exitCode}: ${run.output.err}`);
        return (await fetch(`${api}/readyz`).catch(() => null))?.status === 200 ? true : undefined;
      },
      30_000,
    );
    return run;
  }

  async function stopHttp(): Promise<void> {
    if (http === null) return;
    http.child.kill('SIGTERM');
    expect(await http.exited).to.equal(0);
    http = null;
  }

  function watch(args: readonly string[], env: Record<string, string> = { FLEET_TOKEN: readToken }): Run {
    return spawnRun(['watch', ...args], withoutServers({ FLEET_URL: api, ...env }));
  }

  /** Every entry on the stream, in order. */
  async function streamEntries(): Promise<TransitionEntry[]> {
    const raw = (await redis.xrange(streamKey, '-', '+')) as Array<[string, string[]]>;
    return raw.map(([id, fields]) => parseEntry(id, fields));
  }

  /** Applies a deployment's versions one at a time until `run` printed `count` lines; returns the last version applied. */
  /**
   * Applies a version at a time until every watch prints: they are live. A version applied just before a watch went
   * live may print before the last one applied does: waits for the last one's line in each and leaves it the first
   * line of the output (what printed before it is the warm-up's), so that the test counts from it. Returns its version.
   */
  async function untilPrinting(watches: Run | Run[], deploymentId: string): Promise<number> {
    const runs = Array.isArray(watches) ? watches : [watches];
    let version = 0;
    await waitFor(
      'the watch to print',
      async () => {
        for (const run of runs) {
          if (run.child.exitCode !== null) throw new Error(`fleet watch exited ${run.child.exitCode}: ${run.output.err}`);
        }
        if (runs.every((run) => lines(run.output.out).length >= 1)) return true;
        version++;
        await applyVersions(service, deploymentId, version, version);
        return undefined;
      },
      30_000,
    );
    const isLast = (line: string) =>
      line.startsWith('{') ? (JSON.parse(line) as TransitionEntry).version === version : line.includes(`${deploymentId}  v${version}  `);
    for (const run of runs) {
      await waitFor(`v${version} printed`, () => (lines(run.output.out).some(isLast) ? true : undefined), 30_000);
      const all = lines(run.output.out);
      run.output.out = `${all.slice(all.findIndex(isLast)).join('\n')}\n`;
    }
    return version;
  }

  const printed = (run: Run, count: number) => waitFor(`${count} lines`, () => (lines(run.output.out).length >= count ? true : undefined), 30_000);

  it('prints transitions as they happen, the lines fleet tail prints, as text and as JSON', async () => {
    const deploymentId = randomUUID();
    const text = watch([]);
    const json = watch(['--json']);
    const first = await untilPrinting([text, json], deploymentId);
    await applyVersions(service, deploymentId, first + 1, first + 4);
    await printed(text, 5);
    await printed(json, 5);
    const entries = (await streamEntries()).filter((e) => e.version >= first);
    expect(entries.map((e) => e.version)).to.deep.equal([first, first + 1, first + 2, first + 3, first + 4]);
    // fleet tail, reading Redis, prints the same lines
    const tail = spawnRun(['tail', '--from', '0', '--json'], { ...process.env, DATABASE_URL: db.url, FLEET_PREFIX: prefix });
    await printed(tail, first + 4);
    const tailJson = lines(tail.output.out).slice(first - 1);
    tail.child.kill('SIGINT');
    expect(await tail.exited).to.equal(0);
    const watched = lines(json.output.out);
    expect(watched.slice(-5)).to.deep.equal(tailJson);
    expect(lines(text.output.out).slice(-5)).to.deep.equal(entries.map((e) => formatEntry(e, false)));
    expect(lines(text.output.out).at(-1)).to.contain(`${deploymentId}  v${first + 4}  `);
    expect(text.output.err).to.equal('');
  });
  it('filters by deployment and by the state a transition went to, in catch-up and live', async () => {
    const [a, b, c] = [randomUUID(), randomUUID(), randomUUID()];
    await applyVersions(service, a, 1, 3);
    await applyVersions(service, b, 1, 3);
    await waitFor('six entries', async () => ((await redis.xlen(streamKey)) >= 6 ? true : undefined));
    // from the stream's start, so that every watch sees the same entries whenever it went live
    const fromStart = encodeCursor({ p: 1, r: 0, ids: ['0-0'] });
    const onlyA = watch(['--deployment', a, '--json', '--from', fromStart]);
    const ready = watch(['--state', 'ready', '--state', 'failed', '--json', '--from', fromStart]);
    const all = watch(['--json', '--from', fromStart]);
    await printed(all, 6);
    await applyVersions(service, b, 4, 6);
    await applyVersions(service, a, 4, 6);
    // a deployment that goes ready, then failed: create, attempt, start, end succeeded, attempt, start, end failed
    const [one, two] = [randomUUID(), randomUUID()];
    for (const [name, data] of [
      ['deployment.create', { name: 'web' }],
      ['attempt.create', { attemptId: one }],
      ['attempt.start', { attemptId: one }],
      ['attempt.end', { attemptId: one, outcome: 'succeeded' }],
      ['attempt.create', { attemptId: two }],
      ['attempt.start', { attemptId: two }],
      ['attempt.end', { attemptId: two, outcome: 'failed' }],
    ] as const) {
      await applied(service, name, { deploymentId: c, ...data });
    }
    // last on the stream (one partition: one order): a watch that printed it has read everything before it
    await applyVersions(service, a, 7, 7);
    await waitFor('20 entries', async () => ((await redis.xlen(streamKey)) >= 20 ? true : undefined));
    const expected = await streamEntries();
    const keys = (entries: readonly TransitionEntry[]) => entries.map((e) => `${e.deploymentId}:${e.version}`);
    const keysOf = (run: Run) => keys(lines(run.output.out).map((l) => JSON.parse(l) as TransitionEntry));
    await printed(all, expected.length);
    expect(keysOf(all)).to.deep.equal(keys(expected));
    const ofA = expected.filter((e) => e.deploymentId === a);
    const toReadyOrFailed = expected.filter((e) => e.to === 'ready' || e.to === 'failed');
    // c went ready; a cancelled attempt leaves a deployment failed (a:3, a:5, a:7, ...)
    expect(toReadyOrFailed.filter((e) => e.deploymentId === c).map((e) => e.to)).to.deep.equal(['ready', 'failed']);
    expect(toReadyOrFailed.at(-1)).to.include({ deploymentId: a, version: 7 });
    await printed(onlyA, ofA.length);
    await printed(ready, toReadyOrFailed.length);
    // one order over one partition: both filtered watches printed a:7, the stream's last entry, so each has read
    // (and left out) everything else
    expect(keysOf(onlyA)).to.deep.equal(keys(ofA));
    expect(keysOf(ready)).to.deep.equal(keys(toReadyOrFailed));
  });

  it('resumes after the HTTP process restarts: nothing missed, nothing printed twice', async () => {
    const deploymentId = randomUUID();
    const run = watch(['--json']);
    const first = await untilPrinting(run, deploymentId);
    await applyVersions(service, deploymentId, first + 1, first + 3);
    await printed(run, 4);
    await stopHttp();
    await waitFor('the watch to notice', () => (run.output.err.includes('reconnecting') ? true : undefined), 30_000);
    // while no fleet http runs, the fleet goes on
    await applyVersions(service, deploymentId, first + 4, first + 7);
    http = await startHttp();
    await printed(run, 8);
    await applyVersions(service, deploymentId, first + 8, first + 9);
    await printed(run, 10);
    const versions = lines(run.output.out).map((l) => (JSON.parse(l) as TransitionEntry).version);
    expect(versions).to.deep.equal(Array.from({ length: 10 }, (_, i) => first + i));
    expect(run.output.err).to.match(new RegExp(`fleet watch: lost the fleet at ${api} \\(.+\\), reconnecting\\n`));
    expect(run.output.err).to.contain(`fleet watch: the fleet at ${api} is back`);
  });

  it('prints the cursor on SIGTERM; --from takes it (and fleet tail --from too): nothing missed or repeated', async () => {
    const deploymentId = randomUUID();
    const run = watch(['--json']);
    const first = await untilPrinting(run, deploymentId);
    await applyVersions(service, deploymentId, first + 1, first + 2);
    await printed(run, 3);
    run.child.kill('SIGTERM');
    expect(await run.exited).to.equal(0);
    const cursor = /^fleet watch: to resume from here: --from (\S+)$/m.exec(run.output.err)?.[1];
    expect(cursor, run.output.err).to.be.a('string');
    await applyVersions(service, deploymentId, first + 3, first + 5);
    const resumed = watch(['--json', '--from', cursor ?? '']);
    await printed(resumed, 3);
    expect(lines(resumed.output.out).map((l) => (JSON.parse(l) as TransitionEntry).version)).to.deep.equal([first + 3, first + 4, first + 5]);
    // the same cursor in fleet tail, which reads Redis: the same three
    const tail = spawnRun(['tail', '--from', cursor ?? '', '--json'], { ...process.env, DATABASE_URL: db.url, FLEET_PREFIX: prefix });
    await printed(tail, 3);
    expect(lines(tail.output.out)).to.deep.equal(lines(resumed.output.out));
    // and a tail's cursor in fleet watch
    tail.child.kill('SIGINT');
    expect(await tail.exited).to.equal(0);
    const tailCursor = /--from (\S+)$/m.exec(tail.output.err)?.[1];
    await applyVersions(service, deploymentId, first + 6, first + 6);
    const fromTail = watch(['--json', '--from', tailCursor ?? '']);
    await printed(fromTail, 1);
    expect((JSON.parse(lines(fromTail.output.out)[0] ?? '{}') as TransitionEntry).version).to.equal(first + 6);
  });

  it('exits 3 with the backfill hint when the cursor was trimmed away', async () => {
    const deploymentId = randomUUID();
    const run = watch([]);
    await untilPrinting(run, deploymentId);
    run.child.kill('SIGINT');
    expect(await run.exited).to.equal(0);
    const cursor = /--from (\S+)$/m.exec(run.output.err)?.[1] ?? '';
    for (let i = 0; i < 20; i++) await redis.xadd(streamKey, '*', 'type', 'state_transition', 'deploymentId', randomUUID(), 'version', '1');
    await redis.xtrim(streamKey, 'MAXLEN', 5);
    const late = watch(['--from', cursor]);
    expect(await late.exited).to.equal(3);
    expect(late.output.out).to.equal('');
    expect(late.output.err).to.match(/^fleet: the watch must resync \(trimmed\): .+$/m);
    expect(late.output.err).to.contain(
      'fleet watch: backfill with GET /api/deployments/{id}/transitions?afterVersion={last version you have}, then run fleet watch again without --from',
    );
  });

  it('exits 1 when it fell behind and the fleet closed it (overflow); --from its cursor resumes with nothing missed', async () => {
    const run = watch(['--json']);
    await untilPrinting(run, randomUUID());
    // the watch stops reading: what the fleet sends fills the sockets' buffers, then its bound of unsent bytes
    run.child.kill('SIGSTOP');
    let appended = 0;
    const append = async (count: number): Promise<void> => {
      const pipeline = redis.pipeline();
      for (let i = 0; i < count; i++, appended++) {
        // a transition's fields, about 400 bytes on the wire
        pipeline.xadd(
          streamKey,
          '*',
          ...['type', 'state_transition', 'transitionId', String(appended), 'deploymentId', randomUUID(), 'attemptId', randomUUID()],
          ...['from', '', 'to', 'pending', 'version', '1', 'reason', 'created', 'eventId', `flood-${appended}`],
          ...['at', new Date().toISOString(), 'actor', 'producer'],
        );
      }
      await pipeline.exec();
    };
    const overflows = async () => Number(/^fleet_watch_overflows_total (\d+)/m.exec(await (await fetch(`${api}/metrics`)).text())?.[1] ?? 0);
    await waitFor(
      'the fleet to close the watch with an overflow',
      async () => {
        if ((await overflows()) > 0) return true;
        await append(2000);
        return undefined;
      },
      60_000,
    );
    run.child.kill('SIGCONT');
    expect(await run.exited).to.equal(1);
    expect(run.output.err).to.match(/^fleet: the fleet closed the watch: it fell behind \(.+\)$/m);
    const cursor = /^fleet watch: to resume from where it was: --from (\S+)$/m.exec(run.output.err)?.[1];
    expect(cursor, run.output.err).to.be.a('string');
    const resumed = watch(['--json', '--from', cursor ?? '']);
    const onStream = (await streamEntries()).map((e) => e.streamId);
    const streamIdOf = (l: string | undefined) => (l === undefined ? undefined : (JSON.parse(l) as TransitionEntry).streamId);
    await waitFor(
      'the resumed watch at the end of the stream',
      () => (streamIdOf(lines(resumed.output.out).at(-1)) === onStream.at(-1) ? true : undefined),
      60_000,
    );
    const seen = [...lines(run.output.out), ...lines(resumed.output.out)].map(streamIdOf);
    expect(seen).to.deep.equal(onStream.slice(onStream.indexOf(seen[0] ?? '')));
    expect(appended).to.be.above(0);
  });

  it('exits 2 with one line when the fleet refuses the token (401) or its scope (403); 4 when it is unreachable', async () => {
    const wrong = watch([], { FLEET_TOKEN: 'lft_not-a-token' });
    expect(await wrong.exited).to.equal(2);
    expect(wrong.output.err).to.equal(
      `fleet: the fleet at ${api} refused the watch (unauthorized: the credentials are not valid): FLEET_TOKEN is not a token this fleet knows\n`,
    );
    const none = watch([], {});
    expect(await none.exited).to.equal(2);
    expect(none.output.err).to.match(
      /^fleet: the fleet at .+ refused the watch \(unauthorized: .+\): set FLEET_TOKEN to a token with the read scope/,
    );
    const scope = watch([], { FLEET_TOKEN: writeToken });
    expect(await scope.exited).to.equal(2);
    expect(scope.output.err).to.match(/^fleet: the fleet at .+ refused the watch \(forbidden: .+\): FLEET_TOKEN needs the read scope\n$/);
    // the token never shows
    for (const r of [wrong, none, scope]) expect(r.output.err + r.output.out).not.to.contain(writeToken);
    const closed = spawnRun(['watch'], withoutServers({ FLEET_URL: `http://127.0.0.1:${await freePort()}`, FLEET_TOKEN: readToken }));
    expect(await closed.exited).to.equal(4);
    expect(closed.output.err).to.match(/^fleet: the fleet at http:\/\/127\.0\.0\.1:\d+ is unreachable \(ECONNREFUSED\)\n$/);
  });

  it('the curl example of examples/watch resumes with Last-Event-ID', async () => {
    const deploymentId = randomUUID();
    const run = watch([]);
    await untilPrinting(run, deploymentId);
    run.child.kill('SIGINT');
    await run.exited;
    const cursor = /--from (\S+)$/m.exec(run.output.err)?.[1] ?? '';
    const last = (await streamEntries()).at(-1)?.version ?? 0;
    await applyVersions(service, deploymentId, last + 1, last + 2);
    const curl = spawn('bash', [path.join(repoRoot(), 'examples', 'watch', 'curl.sh')], {
      env: withoutServers({ FLEET_URL: api, FLEET_TOKEN: readToken, LAST_EVENT_ID: cursor, DEPLOYMENT_ID: deploymentId }),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    curl.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    const exited = new Promise<number | null>((resolve) => curl.on('exit', (code) => resolve(code)));
    closers.push(async () => {
      if (curl.exitCode === null) curl.kill('SIGKILL');
      await exited;
    });
    await waitFor('two transitions from curl', () => ((out.match(/^event: transition$/gm) ?? []).length >= 2 ? true : undefined), 30_000);
    const data = [...out.matchAll(/^data: (.+)$/gm)].map((m) => JSON.parse(m[1] ?? '{}') as Record<string, string>);
    expect(data.map((d) => d.version)).to.deep.equal([String(last + 1), String(last + 2)]);
    expect(out).to.match(/^retry: 2000$/m);
    expect(out).to.match(/^id: \S+$/m);
  });
});

describe('fleet watch: answers that are not a watch, and a connection gone silent', function () {
  this.timeout(60_000);
  let server: http.Server;
  let url: string;
  /** what the next request gets */
  let answer: (req: http.IncomingMessage, res: http.ServerResponse) => void = () => undefined;
  const requests: http.IncomingHttpHeaders[] = [];

  before(async () => {
    server = http.createServer((req, res) => {
      requests.push(req.headers);
      answer(req, res);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  async function watchOnce(): Promise<{ code: number | null; err: string }> {
    const child = spawn(process.execPath, [FLEET, 'watch'], {
      env: withoutServers({ FLEET_URL: url, FLEET_TOKEN: 'lft_x' }),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let err = '';
    child.stderr.on('data', (chunk: Buffer) => (err += chunk.toString()));
    const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
    return { code, err };
  }

  const json =
    (status: number, body: unknown, headers: Record<string, string> = {}) =>
    (_req: http.IncomingMessage, res: http.ServerResponse) => {
      res.writeHead(status, { 'content-type': 'application/json', ...headers });
      res.end(JSON.stringify(body));
    };

  it('refuses bad options with exit 2, naming the option and the rule, before it connects', async () => {
    requests.length = 0;
    const refused = async (args: readonly string[]) => {
      const child = spawn(process.execPath, [FLEET, 'watch', ...args], {
        env: withoutServers({ FLEET_URL: url }),
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let err = '';
      child.stderr.on('data', (chunk: Buffer) => (err += chunk.toString()));
      return { code: await new Promise<number | null>((resolve) => child.on('exit', resolve)), err };
    };
    expect(await refused(['--deployment', `${randomUUID()},nope`])).to.deep.equal({
      code: 2,
      err: 'fleet: --deployment: must be a UUID, got "nope"\n',
    });
    expect(await refused(['--state', 'ready', '--state', 'done'])).to.deep.equal({
      code: 2,
      err: 'fleet: --state: must be one of pending, deploying, ready, failed, unknown, got "done"\n',
    });
    expect(await refused(['--from', '0'])).to.deep.equal({
      code: 2,
      err: 'fleet: --from: must be the cursor a fleet watch or a fleet tail printed when it stopped, got "0"\n',
    });
    const many = Array.from({ length: 101 }, () => randomUUID()).join(',');
    expect(await refused(['--deployment', many])).to.deep.equal({ code: 2, err: 'fleet: --deployment: at most 100, got 101\n' });
    expect(requests).to.have.length(0);
  });

  it('a 400 exits 2 with the fleet message; 404, 429, 500 and a page that is not an event stream exit 1; 502/503/504 at the start exit 4', async () => {
    answer = json(400, { error: { code: 'invalid_query', message: 'state: must be one of pending, ...' } });
    expect(await watchOnce()).to.deep.equal({
      code: 2,
      err: `fleet: the fleet at ${url} refused the watch (invalid_query: state: must be one of pending, ...)\n`,
    });
    answer = json(404, { error: { code: 'not_found', message: 'Route GET:/api/watch not found' } });
    const notFound = await watchOnce();
    expect(notFound.code).to.equal(1);
    expect(notFound.err).to.contain('no /api/watch there');
    answer = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end('<html></html>');
    };
    const page = await watchOnce();
    expect(page.code).to.equal(1);
    expect(page.err).to.contain('answered text/html, not an event stream');
    // the fleet's own error (logged there): asking again would not mend it, and the fleet was reached
    answer = json(500, { error: { code: 'internal', message: 'internal error' } });
    expect(await watchOnce()).to.deep.equal({
      code: 1,
      err: `fleet: the fleet at ${url} refused the watch (internal: internal error): an error of the fleet's own (its log says more)\n`,
    });
    // the fleet's 429 comes only to a request without a valid token (a valid one always gets through)
    answer = json(
      429,
      { error: { code: 'too_many_failed_authentications', message: 'too many failed authentications from this address; retry in 5 s' } },
      { 'retry-after': '5' },
    );
    expect(await watchOnce()).to.deep.equal({
      code: 1,
      err: `fleet: the fleet at ${url} refused the watch (too_many_failed_authentications: too many failed authentications from this address; retry in 5 s)\n`,
    });
    for (const status of [502, 503, 504]) {
      answer = json(status, { error: { code: 'unavailable', message: 'try again shortly' } }, { 'retry-after': '1' });
      expect(await watchOnce(), String(status)).to.deep.equal({
        code: 4,
        err: `fleet: the fleet at ${url} is unreachable (it answered unavailable: try again shortly)\n`,
      });
    }
  });

  it('a watch that reconnects to a 500 ends with the refusal; to a 503 it tries again', async () => {
    requests.length = 0;
    // the first connection opens the stream and ends it, the second answers 503, the third 500
    answer = (_req, res) => {
      if (requests.length === 1) {
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.end('retry: 10\n\nid: c1\n\n');
      } else if (requests.length === 2) json(503, { error: { code: 'unavailable', message: 'try again shortly' } })(_req, res);
      else json(500, { error: { code: 'internal', message: 'internal error' } })(_req, res);
    };
    const reports: string[] = [];
    let stop: () => void = () => undefined;
    let end: WatchOutcome | null = null;
    const ended = followWatch({
      url,
      token: null,
      deploymentIds: [],
      states: [],
      from: null,
      json: true,
      write: () => undefined,
      stop: new Promise<void>((resolve) => (stop = resolve)),
      report: (message) => reports.push(message),
    }).then((e) => (end = e));
    try {
      await waitFor('the watch to end', () => (end !== null ? true : undefined), 20_000);
    } finally {
      stop();
      await ended;
    }
    expect(end).to.deep.equal({
      kind: 'refused',
      status: 500,
      message: `the fleet at ${url} refused the watch (internal: internal error): an error of the fleet's own (its log says more)`,
    });
    expect(requests.map((h) => h['last-event-id'])).to.deep.equal([undefined, 'c1', 'c1']);
    expect(reports).to.deep.equal([`lost the fleet at ${url} (the fleet ended the stream), reconnecting`]);
  });

  it('drops a connection on which nothing came for its idle timeout, and makes it again after the last cursor', async () => {
    requests.length = 0;
    const event = (n: number) =>
      `id: c${n}\nevent: transition\ndata: ${JSON.stringify({ type: 'state_transition', deploymentId: randomUUID(), version: String(n), to: 'pending', reason: 'created' })}\n\n`;
    // the first connection sends one event and then nothing, the next one the second event, and so on
    answer = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      // (later connections, should the machine be slow to stop the watch, get nothing)
      res.write(`retry: 10\n\n${requests.length <= 2 ? event(requests.length) : ''}`);
    };
    const printed: string[] = [];
    const reports: string[] = [];
    let stop: () => void = () => undefined;
    const ended = followWatch({
      url,
      token: null,
      deploymentIds: [],
      states: [],
      from: null,
      json: true,
      write: (line) => printed.push(line),
      stop: new Promise<void>((resolve) => (stop = resolve)),
      report: (message) => reports.push(message),
      idleTimeoutMs: 300,
    });
    await waitFor('the second event', () => (printed.length >= 2 ? true : undefined));
    stop();
    expect(await ended).to.deep.equal({ kind: 'stopped', cursor: 'c2' });
    expect(requests.slice(0, 2).map((h) => h['last-event-id'])).to.deep.equal([undefined, 'c1']);
    expect(reports[0]).to.equal(`lost the fleet at ${url} (nothing came for 300 ms), reconnecting`);
    expect(printed.map((l) => (JSON.parse(l) as TransitionEntry).version)).to.deep.equal([1, 2]);
  });
});
