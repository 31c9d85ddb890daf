/**
 * The front door's pure rules (issue 12): the tokens file, the failed-authentication throttle, the endpoint
 * allow-list, endpoint URL rules, event-id kinds, UUID normalisation and the config's secure defaults.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { isLoopbackHost, loadConfig } from '../../src/config';
import { ConfigError, ValidationError } from '../../src/errors';
import { parseEndpointAllowList } from '../../src/events/endpoint-allow';
import { deriveEventId, parsePayload } from '../../src/events/schemas';
import { AuthThrottle, hasScope, readAccess, scopeForEvent } from '../../src/http/auth';
import { createToken, parseTokenFile, TokenFileError, TokenStore } from '../../src/http/tokens';
import { resolveEndpoint } from '../../src/services/dispatch/resolve-endpoint';
import { readinessUrl } from '../../src/services/sweep/sweeper';

function issuesOf(fn: () => unknown): Array<{ field: string; rule: string }> {
  try {
    fn();
  } catch (err) {
    if (err instanceof ValidationError) return [...err.issues];
    throw err;
  }
  throw new Error('expected a ValidationError');
}

describe('front door rules', () => {
  describe('the tokens file', () => {
    it('creates a random token whose entry authenticates it, and only it', () => {
      const a = createToken('ci-deployer', ['read', 'events:write']);
      const b = createToken('ci-deployer', ['read']);
      expect(a.token).to.match(/^lft_[A-Za-z0-9_-]{43}$/);
      expect(a.token).to.not.equal(b.token);
      expect(a.entry).to.deep.equal({ name: 'ci-deployer', sha256: a.entry.sha256, scopes: ['read', 'events:write'] });
      expect(JSON.stringify(a.entry)).to.not.contain(a.token);
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tokens-'));
      const file = path.join(dir, 'tokens.json');
      fs.writeFileSync(file, JSON.stringify([a.entry]), { mode: 0o600 });
      const store = new TokenStore(file);
      expect(store.authenticate(a.token)?.name).to.equal('ci-deployer');
      expect(store.authenticate(b.token)).to.equal(null);
      expect(store.authenticate(`${a.token}x`)).to.equal(null);
      expect(store.authenticate('')).to.equal(null);
      fs.rmSync(dir, { recursive: true });
    });

    it('names every bad entry and field, and lets nothing in', () => {
      const good = createToken('ok', ['read']).entry;
      const bad = [
        good,
        { name: 'sweep', sha256: 'a'.repeat(64), scopes: ['read'] },
        { name: 'ok', sha256: 'b'.repeat(64), scopes: ['read'] },
        { name: 'x y', sha256: 'zz', scopes: [] },
        { name: 'other', sha256: good.sha256, scopes: ['root'] },
        { name: 'extra', sha256: 'c'.repeat(64), scopes: ['read'], token: 'plain' },
        'nope',
      ];
      let problems: readonly string[] = [];
      try {
        parseTokenFile(JSON.stringify(bad));
      } catch (err) {
        if (!(err instanceof TokenFileError)) throw err;
        problems = err.problems;
      }
      expect(problems).to.have.length(9);
      expect(problems.join('\n')).to.match(/\[4\]\.scopes: unknown scope\(s\) "root"/);
      expect(problems.join('\n')).to.match(/\[1\]\.name: "sweep" is reserved/);
      expect(problems.join('\n')).to.match(/\[2\]\.name: "ok" is used by another entry/);
      expect(problems.join('\n')).to.match(/\[3\]\.name: must be 1-100/);
      expect(problems.join('\n')).to.match(/\[3\]\.sha256: must be the hex SHA-256/);
      expect(problems.join('\n')).to.match(/\[3\]\.scopes: must be a non-empty array/);
      expect(problems.join('\n')).to.match(/\[4\]\.sha256: the same token is listed twice/);
      expect(problems.join('\n')).to.match(/\[5\]: unknown field\(s\): token/);
      expect(problems.join('\n')).to.match(/\[6\]: must be an object/);
      expect(() => parseTokenFile('{"name": "x"}')).to.throw(TokenFileError, /must be a JSON array/);
      expect(() => parseTokenFile('[')).to.throw(TokenFileError, /must be JSON/);
    });

    it('reloads on demand; a bad file keeps the tokens in force', () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tokens-'));
      const file = path.join(dir, 'tokens.json');
      const first = createToken('first', ['read']);
      const second = createToken('second', ['events:write']);
      fs.writeFileSync(file, JSON.stringify([first.entry]), { mode: 0o600 });
      const store = new TokenStore(file);
      expect(store.authenticate(second.token)).to.equal(null);
      fs.writeFileSync(file, JSON.stringify([first.entry, second.entry]));
      expect(store.reload()).to.equal(2);
      expect(store.authenticate(second.token)?.scopes.has('events:write')).to.equal(true);
      fs.writeFileSync(file, '[{"name": "broken"');
      expect(() => store.reload()).to.throw(TokenFileError);
      expect(store.authenticate(first.token)?.name).to.equal('first');
      fs.rmSync(file);
      expect(() => store.reload()).to.throw(TokenFileError, /cannot be read \(ENOENT\)/);
      expect(store.authenticate(second.token)?.name).to.equal('second');
      fs.rmSync(dir, { recursive: true });
    });

    it('warns (path and mode) about a file others can read, and refuses one others can write, as ssh does', () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tokens-'));
      const file = path.join(dir, 'tokens.json');
      const t = createToken('viewer', ['read']);
      fs.writeFileSync(file, JSON.stringify([t.entry]));
      const warnings: Array<{ message: string; fields: Record<string, unknown> }> = [];
      const warn = (message: string, fields: Record<string, unknown>) => void warnings.push({ message, fields });
      try {
        fs.chmodSync(file, 0o600);
        new TokenStore(file, { warn });
        expect(warnings).to.deep.equal([]);

        for (const mode of [0o644, 0o640, 0o604]) {
          fs.chmodSync(file, mode);
          const store = new TokenStore(file, { warn });
          expect(store.authenticate(t.token)?.name).to.equal('viewer'); // loaded, with a word
        }
        const octal = (m: number) => `0${m.toString(8)}`;
        expect(warnings.map((w) => w.fields)).to.deep.equal([0o644, 0o640, 0o604].map((m) => ({ file, mode: octal(m) })));
        expect(warnings[0]?.message).to.equal(`API tokens file ${file} is readable by others (mode 0644): make it private (chmod 600 ${file})`);
        expect(warnings[1]?.message).to.contain('readable by its group (mode 0640)');

        // writable by anyone but its owner: anyone could give themselves a token with every scope
        for (const mode of [0o666, 0o620, 0o602]) {
          fs.chmodSync(file, mode);
          expect(() => new TokenStore(file, { warn }), octal(mode)).to.throw(
            TokenFileError,
            `is writable by ${mode & 0o020 ? 'its group' : 'others'} (mode ${octal(mode)})`,
          );
        }
        // on reload, a file made writable meanwhile keeps the tokens in force, like a file that does not parse
        fs.chmodSync(file, 0o600);
        const store = new TokenStore(file, { warn });
        fs.chmodSync(file, 0o646);
        expect(() => store.reload()).to.throw(
          TokenFileError,
          /is writable by others \(mode 0646\): anyone who can write it can give themselves any scope; chmod go-w/,
        );
        expect(store.authenticate(t.token)?.name).to.equal('viewer');
      } finally {
        fs.rmSync(dir, { recursive: true });
      }
    });

    it('reads Bearer and Basic case-insensitively; Basic takes the board pair or a token as the password', () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tokens-'));
      const file = path.join(dir, 'tokens.json');
      const t = createToken('viewer', ['read']);
      fs.writeFileSync(file, JSON.stringify([t.entry]), { mode: 0o600 });
      const creds = { tokens: new TokenStore(file), boardUser: 'ops', boardPassword: 'a-long-password' };
      const basic = (pair: string) => `Basic ${Buffer.from(pair).toString('base64')}`;
      expect(readAccess(`bEaReR ${t.token}`, creds)).to.deep.include({ kind: 'token' });
      expect(readAccess(`BEARER  ${t.token} `, creds)).to.deep.include({ kind: 'token' });
      expect(readAccess(`Bearer ${t.token}x`, creds)).to.deep.equal({ kind: 'invalid' });
      expect(readAccess('Token abc', creds)).to.deep.equal({ kind: 'invalid' });
      expect(readAccess(undefined, creds)).to.deep.equal({ kind: 'anonymous' });
      expect(readAccess(undefined, { ...creds, tokens: null })).to.deep.equal({ kind: 'open' });
      expect(readAccess(basic('ops:a-long-password').replace('Basic', 'basic'), creds)).to.deep.equal({ kind: 'board_user' });
      expect(readAccess(basic('ops:wrong'), creds)).to.deep.equal({ kind: 'invalid' });
      expect(readAccess(basic(`anyone:${t.token}`), creds)).to.deep.include({ kind: 'token' });
      fs.rmSync(dir, { recursive: true });
    });

    it('gives events:admin everything events:write has; scopes events by what they do', () => {
      const principal = (scopes: string[]) =>
        ({ kind: 'token', principal: { name: 'p', scopes: new Set(scopes) } }) as Parameters<typeof hasScope>[0];
      expect(hasScope(principal(['events:admin']), 'events:write')).to.equal(true);
      expect(hasScope(principal(['events:write']), 'events:admin')).to.equal(false);
      expect(hasScope(principal(['board']), 'read')).to.equal(false);
      expect(hasScope({ kind: 'open' }, 'events:admin')).to.equal(true);
      expect(hasScope({ kind: 'board_user' }, 'read')).to.equal(false);
      expect(scopeForEvent('deployment.teardown', { force: true })).to.equal('events:admin');
      expect(scopeForEvent('deployment.teardown', { force: false })).to.equal('events:write');
      expect(scopeForEvent('deployment.teardown', { force: 'true' })).to.equal('events:write');
      for (const name of ['deployment.resolve', 'attempt.orphaned', 'attempt.expired']) expect(scopeForEvent(name, {})).to.equal('events:admin');
      for (const name of ['deployment.create', 'attempt.end', 'attempt.heartbeat', 'nonsense'])
        expect(scopeForEvent(name, {})).to.equal('events:write');
    });
  });

  describe('the failed-authentication throttle', () => {
    it('refuses an address past its failures for the rest of the window, others not; then lets it in again', () => {
      let now = 1_000_000;
      const throttle = new AuthThrottle(3, 60_000, () => now);
      for (let i = 0; i < 3; i++) {
        expect(throttle.retryAfterS('10.0.0.1')).to.equal(null);
        throttle.fail('10.0.0.1');
      }
      expect(throttle.retryAfterS('10.0.0.1')).to.equal(60);
      expect(throttle.retryAfterS('10.0.0.2')).to.equal(null);
      now += 45_500;
      expect(throttle.retryAfterS('10.0.0.1')).to.equal(15);
      now += 14_500;
      expect(throttle.retryAfterS('10.0.0.1')).to.equal(null);
    });

    it('tracks a bounded number of addresses', () => {
      const throttle = new AuthThrottle(1, 60_000, () => 0, 100);
      for (let i = 0; i < 1000; i++) throttle.fail(`a${i}`);
      expect(throttle.retryAfterS('a999')).to.equal(60);
      expect(throttle.retryAfterS('a0')).to.equal(null);
    });
  });

  describe('the endpoint allow-list', () => {
    const { list, problems } = parseEndpointAllowList('build.example.com, .nodes.example.com,10.20.0.0/16, fd00::/8, 192.0.2.7');
    it('allows exact names, names below a .suffix, and IP literals inside a range', () => {
      expect(problems).to.deep.equal([]);
      for (const url of [
        'https://build.example.com/',
        'http://BUILD.example.com:8080/x',
        'http://a.nodes.example.com:30000',
        'http://a.b.nodes.example.com',
        'http://10.20.3.4:30000',
        'http://[fd00::1]:80/',
        'http://192.0.2.7/',
      ]) {
        expect(list.allows(url), url).to.equal(true);
      }
      for (const url of [
        'https://attacker.example/',
        'http://nodes.example.com/',
        'http://evilnodes.example.com/',
        'http://build.example.com.attacker.example/',
        'http://10.21.0.1/',
        'http://127.0.0.1:18999/internal-admin',
        'http://2130706433/',
        'http://0x7f.1/',
        'http://[::1]/',
        'http://192.0.2.8/',
        'not a url',
      ]) {
        expect(list.allows(url), url).to.equal(false);
      }
    });

    it('names each bad entry', () => {
      const bad = parseEndpointAllowList('10.0.0.0/33, host_name, example.com/8, ,');
      expect(bad.problems).to.have.length(3);
      expect(bad.problems.join('\n')).to.contain('"10.0.0.0/33": prefix length must be at most 32');
      expect(bad.problems.join('\n')).to.contain('"host_name": must be a host name');
      expect(bad.problems.join('\n')).to.contain('"example.com/8": a range must be an IP address');
      expect(parseEndpointAllowList(' , ').problems.join()).to.contain('names no host');
    });

    it('dispatch never serves a stored private endpoint outside the list', () => {
      const deployment = {
        state: 'ready' as const,
        lastReadyAt: new Date(0),
        endpoint: { url: 'http://127.0.0.1:18999', kind: 'cluster_dns' as const },
      };
      expect(resolveEndpoint(deployment, new Date(0), { publicEndpointUrl: 'https://public.example.com' })).to.include({ source: 'private' });
      expect(resolveEndpoint(deployment, new Date(0), { publicEndpointUrl: 'https://public.example.com', endpointAllow: list })).to.deep.equal({
        url: 'https://public.example.com',
        source: 'public',
        reason: 'endpoint_not_allowed',
      });
    });
  });

  describe('endpoint URLs and the probe URL', () => {
    const end = (url: string) => ({
      deploymentId: randomUUID(),
      attemptId: randomUUID(),
      outcome: 'succeeded',
      endpoint: { url, kind: 'node_port' },
    });
    it('refuses credentials, a query or a fragment, naming endpoint.url', () => {
      for (const url of [
        'http://user:pw@h.example.com/',
        'http://user@h.example.com/',
        'http://127.0.0.1:18999/internal-admin?x=',
        'http://h.example.com/?',
        'http://h.example.com/#x',
      ]) {
        const issues = issuesOf(() => parsePayload('attempt.end', end(url)));
        expect(
          issues.map((i) => i.field),
          url,
        ).to.deep.equal(['endpoint.url']);
      }
      expect(() => parsePayload('attempt.end', end('http://h.example.com:30000/app'))).to.not.throw();
    });

    it('joins /ready to the path with the URL API', () => {
      expect(readinessUrl('http://h.example.com:30000')).to.equal('http://h.example.com:30000/ready');
      expect(readinessUrl('http://h.example.com:30000/app/')).to.equal('http://h.example.com:30000/app/ready');
      // rows stored before the rules: nothing of a query, fragment or credentials reaches the probe
      expect(readinessUrl('http://u:p@h.example.com/internal-admin?x=#y')).to.equal('http://h.example.com/internal-admin/ready');
    });
  });

  describe('event ids', () => {
    const D = randomUUID();
    const A = randomUUID();
    it("refuses an id with another kind's prefix, naming eventId", () => {
      const cases: Array<[string, Record<string, unknown>]> = [
        ['attempt.heartbeat', { deploymentId: D, attemptId: A, eventId: `attempt.end.${A}` }],
        ['deployment.readiness', { deploymentId: D, eventId: `deployment.create.${D}` }],
        ['attempt.cancel', { deploymentId: D, attemptId: A, eventId: `attempt.orphaned.${A}` }],
        ['deployment.teardown', { deploymentId: D, eventId: 'attempt.start.anything' }],
        ['attempt.heartbeat', { deploymentId: D, attemptId: A, eventId: `ATTEMPT.END.${A.toUpperCase()}` }],
        ['deployment.readiness', { deploymentId: D, eventId: `Deployment.Create.${D}` }],
      ];
      for (const [name, data] of cases) {
        const issues = issuesOf(() => parsePayload(name, data));
        expect(
          issues.map((i) => i.field),
          name,
        ).to.deep.equal(['eventId']);
        expect(issues[0]?.rule).to.contain('claims only its own event kind');
      }
    });

    it('takes free-form ids, and ids of its own kind that name its own subject (any case)', () => {
      for (const eventId of [
        `attempt.end.${A}`,
        `attempt.end.${A.toUpperCase()}`,
        `Attempt.End.${A}`,
        `attempt.end.${A}.retry-2`,
        'end-1',
        'attempt.ending',
        `attempt.end-${randomUUID()}`,
      ]) {
        expect(() => parsePayload('attempt.end', { deploymentId: D, attemptId: A, outcome: 'failed', eventId }), eventId).to.not.throw();
      }
      expect(() =>
        parsePayload('deployment.create', { deploymentId: D, name: 'web', eventId: `DEPLOYMENT.CREATE.${D.toUpperCase()}` }),
      ).to.not.throw();
      // events that happen many times derive random ids: they name no subject
      expect(() => parsePayload('attempt.heartbeat', { deploymentId: D, attemptId: A, eventId: `attempt.heartbeat.${randomUUID()}` })).to.not.throw();
      expect(() => parsePayload('deployment.teardown', { deploymentId: D, eventId: `deployment.teardown.${randomUUID()}` })).to.not.throw();
    });

    it('refuses an id of its own kind that names another subject (a squat), or none, naming eventId', () => {
      const cases: Array<[string, Record<string, unknown>, string]> = [
        ['attempt.end', { deploymentId: D, attemptId: A, outcome: 'failed', eventId: `attempt.end.${randomUUID()}` }, 'attemptId'],
        ['attempt.end', { deploymentId: D, attemptId: A, outcome: 'failed', eventId: `ATTEMPT.END.${randomUUID().toUpperCase()}` }, 'attemptId'],
        ['attempt.end', { deploymentId: D, attemptId: A, outcome: 'failed', eventId: `attempt.end.${A}x` }, 'attemptId'],
        ['attempt.end', { deploymentId: D, attemptId: A, outcome: 'failed', eventId: `attempt.end.${D}` }, 'attemptId'],
        ['attempt.orphaned', { deploymentId: D, attemptId: A, eventId: `attempt.orphaned.${randomUUID()}.90000` }, 'attemptId'],
        ['deployment.create', { deploymentId: D, name: 'web', eventId: `deployment.create.${randomUUID()}` }, 'deploymentId'],
        ['deployment.create', { deploymentId: D, name: 'web', eventId: 'deployment.create.anything' }, 'deploymentId'],
      ];
      for (const [name, data, field] of cases) {
        const issues = issuesOf(() => parsePayload(name, data));
        expect(
          issues.map((i) => i.field),
          String(data.eventId),
        ).to.deep.equal(['eventId']);
        expect(issues[0]?.rule).to.contain(`must name this event's ${field} next`);
      }
    });

    it('normalises UUIDs to lower case before deriving an id', () => {
      const upper = A.toUpperCase();
      const data = parsePayload('attempt.end', { deploymentId: D.toUpperCase(), attemptId: upper, outcome: 'succeeded' });
      expect(data).to.deep.include({ deploymentId: D, attemptId: A });
      expect(deriveEventId('attempt.end', data)).to.equal(`attempt.end.${A}`);
      expect(deriveEventId('attempt.end', { deploymentId: D, attemptId: upper })).to.equal(`attempt.end.${A}`);
    });

    it('takes an actor of the contract shape, naming actor otherwise', () => {
      expect(parsePayload('deployment.teardown', { deploymentId: D, actor: 'pipeline:team-a@ci' })).to.deep.include({ actor: 'pipeline:team-a@ci' });
      expect(issuesOf(() => parsePayload('deployment.teardown', { deploymentId: D, actor: 'has space' })).map((i) => i.field)).to.deep.equal([
        'actor',
      ]);
      expect(issuesOf(() => parsePayload('deployment.teardown', { deploymentId: D, actor: 'x'.repeat(101) })).map((i) => i.field)).to.deep.equal([
        'actor',
      ]);
    });
  });

  describe('secure by default', () => {
    const problems = (env: Record<string, string>) => {
      try {
        loadConfig(env);
        return [];
      } catch (err) {
        if (err instanceof ConfigError) return [...err.problems];
        throw err;
      }
    };
    const offLoopback = {
      FLEET_HTTP_HOST: '0.0.0.0',
      FLEET_BOARD_USER: 'ops',
      FLEET_BOARD_PASSWORD: 'twelve-chars',
      FLEET_API_TOKENS_FILE: '/etc/fleet/tokens.json',
      FLEET_ENDPOINT_ALLOW: '.nodes.example.com',
    };
    it('off loopback: a tokens file, an allow-list and a 12-character board password are required', () => {
      expect(problems(offLoopback)).to.deep.equal([]);
      expect(problems({ ...offLoopback, FLEET_API_TOKENS_FILE: '' }).join()).to.match(
        /^FLEET_API_TOKENS_FILE: required when FLEET_HTTP_HOST is not loopback/,
      );
      expect(problems({ ...offLoopback, FLEET_ENDPOINT_ALLOW: '' }).join()).to.match(
        /^FLEET_ENDPOINT_ALLOW: required when FLEET_HTTP_HOST is not loopback/,
      );
      const short = problems({ ...offLoopback, FLEET_BOARD_PASSWORD: 'elevenchars' });
      expect(short).to.deep.equal(['FLEET_BOARD_PASSWORD: must be at least 12 characters when FLEET_HTTP_HOST is not loopback']);
      expect(short.join()).to.not.contain('elevenchars');
    });

    it('on loopback: all optional, a short board password allowed', () => {
      expect(isLoopbackHost('127.0.0.1')).to.equal(true);
      const config = loadConfig({ FLEET_BOARD_USER: 'ops', FLEET_BOARD_PASSWORD: 'x' });
      expect(config).to.deep.include({ apiTokensFile: null, endpointAllow: null, eventsRateLimit: 100, metricsAuth: 'open' });
    });

    it('checks the rate limit, the metrics setting and the allow-list entries', () => {
      expect(problems({ FLEET_EVENTS_RATE_LIMIT: '-1' }).join()).to.contain('FLEET_EVENTS_RATE_LIMIT');
      expect(problems({ FLEET_METRICS_AUTH: 'token' }).join()).to.contain('FLEET_METRICS_AUTH: must be "open" or "read"');
      expect(problems({ FLEET_ENDPOINT_ALLOW: 'a/b' }).join()).to.contain('FLEET_ENDPOINT_ALLOW: "a/b"');
      expect(loadConfig({ FLEET_EVENTS_RATE_LIMIT: '0', FLEET_METRICS_AUTH: 'read' })).to.deep.include({ eventsRateLimit: 0, metricsAuth: 'read' });
      expect(loadConfig({ FLEET_HTTP_TRUST_PROXY: '10.0.0.0/8, 192.0.2.1,fd00::/8' }).httpTrustProxy).to.deep.equal([
        '10.0.0.0/8',
        '192.0.2.1',
        'fd00::/8',
      ]);
      expect(problems({ FLEET_HTTP_TRUST_PROXY: '10.0.0.0/33,proxy.local' })).to.deep.equal([
        'FLEET_HTTP_TRUST_PROXY: "10.0.0.0/33": must be an IP address or a CIDR range',
        'FLEET_HTTP_TRUST_PROXY: "proxy.local": must be an IP address or a CIDR range',
      ]);
    });
  });
});
