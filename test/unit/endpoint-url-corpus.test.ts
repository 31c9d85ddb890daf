/**
 * Endpoint URLs across parsers (issue 28). Dispatch hands a stored endpoint URL to build traffic (curl, Python,
 * Node, Go...), and the sweep probes it, while the allow-list checks the host that Node's WHATWG URL reads. So for
 * every URL of a corpus of tricky spellings: either the schema refuses it, naming `endpoint.url` and the rule, or
 * the form it stores (and dispatch serves) is read as the same host and port by Node's WHATWG URL and by Python's
 * `urllib.parse.urlsplit` (one python3 run for the whole corpus), with no user info, and that host is the one the
 * allow-list saw. The JSON Schema's pattern agrees with the checks on the corpus, in JavaScript and in Python.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { ValidationError } from '../../src/errors';
import { endpointHost, parseEndpointAllowList } from '../../src/events/endpoint-allow';
import { ENDPOINT_URL_MAX_LENGTH, ENDPOINT_URL_PATTERN } from '../../src/events/endpoint-url';
import { parsePayload } from '../../src/events/schemas';
import { resolveEndpoint } from '../../src/services/dispatch/resolve-endpoint';

const PYTHON = process.env.PYTHON ?? (fs.existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3');

/**
 * An accepted URL and the form stored and served (or the forms, where the supported Nodes' WHATWG URLs differ); or a
 * refused one and a part of the rule it breaks.
 */
type Case = { readonly url: string; readonly stored: string | readonly string[] } | { readonly url: string; readonly refused: string };

const RULE = {
  backslash: 'must not contain a backslash',
  userInfo: 'must not carry credentials',
  chars: 'must be printable ASCII',
  query: 'must not carry a query or a fragment',
  scheme: 'must be an http or https URL',
  percent: 'the host must not be percent-encoded',
  number: "a host name's last label must begin with a letter",
  ipv6: 'an IPv6 host must be',
  host: 'the host must be',
  port: 'the port must be a number 1-65535',
  whatwg: 'WHATWG URL',
  punycode: 'an xn-- label must be valid punycode',
  length: 'must be at most 2048 characters',
} as const;

const CORPUS: readonly Case[] = [
  // accepted, and what is stored: WHATWG URL's href
  { url: 'http://10.0.0.1:30000', stored: 'http://10.0.0.1:30000/' },
  { url: 'HTTP://Build.Cluster.LOCAL:8080/App/Path', stored: 'http://build.cluster.local:8080/App/Path' },
  { url: 'https://web.default.svc.cluster.local.', stored: 'https://web.default.svc.cluster.local./' },
  { url: 'http://h.example.com:80/', stored: 'http://h.example.com/' },
  { url: 'https://h.example.com:443', stored: 'https://h.example.com/' },
  { url: 'https://h.example.com:80/', stored: 'https://h.example.com:80/' },
  { url: 'http://h.example.com:65535/', stored: 'http://h.example.com:65535/' },
  { url: 'http://[::1]:3000/', stored: 'http://[::1]:3000/' },
  { url: 'http://[0:0:0:0:0:0:0:1]/', stored: 'http://[::1]/' },
  { url: 'http://[2001:DB8::A]:8443/x', stored: 'http://[2001:db8::a]:8443/x' },
  { url: 'http://[::ffff:10.0.0.1]/', stored: 'http://[::ffff:a00:1]/' },
  { url: 'http://127.0.0.1:18999/', stored: 'http://127.0.0.1:18999/' },
  { url: 'http://localhost', stored: 'http://localhost/' },
  { url: 'http://my_service:8080/', stored: 'http://my_service:8080/' },
  { url: 'http://xn--bcher-kva.example/', stored: 'http://xn--bcher-kva.example/' },
  { url: 'http://h.example.com/a@b', stored: 'http://h.example.com/a@b' },
  { url: 'http://h.example.com/a%40b/%2e%2e/c', stored: 'http://h.example.com/c' },
  { url: 'http://h.example.com/a/../../b', stored: 'http://h.example.com/b' },
  { url: 'http://h.example.com//10.0.0.1/', stored: 'http://h.example.com//10.0.0.1/' },
  // Node 24's WHATWG URL (ada 4) percent-encodes ^ in a path, Node 20's and 22's (ada 2.9) keep it: stored encoded on every Node
  { url: 'http://h.example.com/a|b^c[d]', stored: 'http://h.example.com/a|b%5Ec[d]' },
  { url: 'http://h.example.com/a%5Eb^', stored: 'http://h.example.com/a%5Eb%5E' },
  { url: 'http://h.example.com/"<x>"', stored: 'http://h.example.com/%22%3Cx%3E%22' },
  { url: 'http://1e100.net/', stored: 'http://1e100.net/' },
  // the issue's bypasses, and backslashes anywhere
  { url: 'http://10.0.0.1\\@127.0.0.1:3199/', refused: RULE.backslash },
  { url: 'https://build.cluster.local\\@attacker.example.com/', refused: RULE.backslash },
  { url: 'http://10.0.0.1\\.127.0.0.1/', refused: RULE.backslash },
  { url: 'http:\\\\10.0.0.1/', refused: RULE.backslash },
  { url: 'http:/\\10.0.0.1/', refused: RULE.backslash },
  { url: 'http://h.example.com/a\\b', refused: RULE.backslash },
  // user info in any spelling
  { url: 'http://user@h.example.com/', refused: RULE.userInfo },
  { url: 'http://user:pw@h.example.com/', refused: RULE.userInfo },
  { url: 'http://@h.example.com/', refused: RULE.userInfo },
  { url: 'http://10.0.0.1@@127.0.0.1/', refused: RULE.userInfo },
  { url: 'http://a@b@127.0.0.1/', refused: RULE.userInfo },
  { url: 'http://10.0.0.1:80@127.0.0.1/', refused: RULE.userInfo },
  { url: 'http://10.0.0.1%40127.0.0.1/', refused: RULE.percent },
  { url: 'http://%40@127.0.0.1/', refused: RULE.userInfo },
  { url: 'http://%31%30.0.0.1/', refused: RULE.percent },
  // control characters, whitespace (WHATWG strips tabs and newlines, others do not), NUL
  { url: 'http://10.0.0.1\t.evil.example/', refused: RULE.chars },
  { url: 'http://h.example.com\n/', refused: RULE.chars },
  { url: 'http://h.exa\r\nmple.com/', refused: RULE.chars },
  { url: 'http://h.example.com/\u0000', refused: RULE.chars },
  { url: 'http://h.example.com /', refused: RULE.chars },
  { url: ' http://h.example.com/', refused: RULE.chars },
  { url: 'http://h.example.com/\u007f', refused: RULE.chars },
  // non-ASCII: unicode dots, fullwidth letters, soft hyphens, IDN (send punycode)
  { url: 'http://10。0。0。1/', refused: RULE.chars },
  { url: 'http://build.cluster。local/', refused: RULE.chars },
  { url: 'http://ｅｘａｍｐｌｅ.com/', refused: RULE.chars },
  { url: 'http://ex\u00adample.com/', refused: RULE.chars },
  { url: 'http://bücher.example/', refused: RULE.chars },
  { url: 'http://h.example.com/ü', refused: RULE.chars },
  // IPv4 in forms WHATWG normalises and others keep as names
  { url: 'http://127.1/', refused: RULE.number },
  { url: 'http://0x7f.1/', refused: RULE.number },
  { url: 'http://2130706433/', refused: RULE.number },
  { url: 'http://0177.0.0.1/', refused: RULE.number },
  { url: 'http://010.0.0.1/', refused: RULE.number },
  { url: 'http://127.0.0.1./', refused: RULE.number },
  { url: 'http://1.2.3.4.5/', refused: RULE.number },
  { url: 'http://256.0.0.1/', refused: RULE.number },
  { url: 'http://h.0x10/', refused: RULE.number },
  // IPv6: zone ids, malformed
  { url: 'http://[fe80::1%25eth0]/', refused: RULE.percent },
  { url: 'http://[fe80::1%eth0]/', refused: RULE.percent },
  { url: 'http://[::g]/', refused: RULE.ipv6 },
  { url: 'http://[::1/', refused: RULE.ipv6 },
  { url: 'http://[1:2:3:4:5:6:7:8:9]/', refused: RULE.ipv6 },
  { url: 'http://[::1]x/', refused: RULE.ipv6 },
  // the scheme and the slashes
  { url: 'http:/h.example.com/', refused: RULE.scheme },
  { url: 'http:h.example.com', refused: RULE.scheme },
  { url: 'http:///h.example.com/', refused: RULE.scheme },
  { url: '//h.example.com/', refused: RULE.scheme },
  { url: 'ftp://h.example.com/', refused: RULE.scheme },
  { url: 'javascript:alert(1)', refused: RULE.scheme },
  { url: 'http://', refused: RULE.scheme },
  { url: 'http://:80/', refused: RULE.scheme },
  { url: 'not a url', refused: RULE.chars },
  // host names
  { url: 'http://a..b/', refused: RULE.host },
  { url: 'http://.h.example.com/', refused: RULE.host },
  { url: 'http://h<x>/', refused: RULE.host },
  { url: 'http://h.exa;mple.com/', refused: RULE.host },
  { url: 'http://h.example.com;10.0.0.1/', refused: RULE.number },
  // refused by every supported Node, though Node 24's WHATWG URL keeps them as they are
  { url: 'http://xn--a/', refused: RULE.punycode },
  { url: 'http://XN--ZZ.example/', refused: RULE.punycode },
  { url: 'http://a.xn--a.example:8080/', refused: RULE.punycode },
  // ports
  { url: 'http://h.example.com:/', refused: RULE.port },
  { url: 'http://h.example.com:0/', refused: RULE.port },
  { url: 'http://h.example.com:65536/', refused: RULE.port },
  { url: 'http://h.example.com:08080/', refused: RULE.port },
  { url: 'http://h.example.com:80:81/', refused: RULE.port },
  { url: 'http://h.example.com:http/', refused: RULE.port },
  // query, fragment, length
  { url: 'http://h.example.com/?q=1', refused: RULE.query },
  { url: 'http://h.example.com/#f', refused: RULE.query },
  { url: 'http://10.0.0.1#@127.0.0.1/', refused: RULE.query },
  { url: `http://h.example.com/${'x'.repeat(2048)}`, refused: RULE.length },
];

/** What a parser read: the host (no brackets) and the port (the scheme's default when none is written). */
interface Reading {
  readonly host: string | null;
  readonly port: number | null;
  readonly user: string | null;
  readonly password: string | null;
}
const DEFAULT_PORT: Record<string, number> = { http: 80, https: 443 };

function readByNode(url: string): Reading {
  const parsed = new URL(url);
  const scheme = parsed.protocol.replace(/:$/, '');
  return {
    host: parsed.hostname.replace(/^\[|\]$/g, ''),
    port: parsed.port === '' ? (DEFAULT_PORT[scheme] ?? null) : Number(parsed.port),
    user: parsed.username === '' ? null : parsed.username,
    password: parsed.password === '' ? null : parsed.password,
  };
}

/** Python's urlsplit over every URL, and whether Python's `re` matches the JSON Schema's pattern: one python3 run. */
function readByPython(urls: readonly string[], pattern: string): Array<Reading & { readonly matches: boolean; readonly error?: string }> {
  const script = [
    'import json, re, sys',
    'from urllib.parse import urlsplit',
    'data = json.load(sys.stdin)',
    'out = []',
    'for u in data["urls"]:',
    '    matches = re.fullmatch(data["pattern"], u) is not None',
    '    try:',
    '        s = urlsplit(u)',
    '        port = s.port if s.port is not None else {"http": 80, "https": 443}.get(s.scheme)',
    '        out.append({"host": s.hostname, "port": port, "user": s.username, "password": s.password, "matches": matches})',
    '    except ValueError as e:',
    '        out.append({"host": None, "port": None, "user": None, "password": None, "matches": matches, "error": str(e)})',
    'print(json.dumps(out))',
  ].join('\n');
  const output = execFileSync(PYTHON, ['-c', script], { input: JSON.stringify({ urls, pattern }), encoding: 'utf8' });
  return JSON.parse(output) as Array<Reading & { matches: boolean; error?: string }>;
}

function storedForm(url: string): { stored: string } | { issues: ReadonlyArray<{ field: string; rule: string }> } {
  try {
    const data = parsePayload('attempt.end', {
      deploymentId: randomUUID(),
      attemptId: randomUUID(),
      outcome: 'succeeded',
      endpoint: { url, kind: 'cluster_dns' },
    });
    return { stored: data.endpoint?.url ?? '' };
  } catch (err) {
    if (err instanceof ValidationError) return { issues: err.issues };
    throw err;
  }
}

describe('endpoint URLs: one host for the checker and every parser (issue 28)', () => {
  const outcomes = CORPUS.map((c) => ({ ...c, got: storedForm(c.url) }));
  const stored = outcomes.flatMap((o) => ('stored' in o.got ? [o.got.stored] : []));

  it('accepts and stores (as WHATWG URL normalises it), or refuses naming endpoint.url and the rule, as the corpus says', () => {
    const wrong = outcomes.flatMap((o) => {
      const label = JSON.stringify(o.url).slice(0, 80);
      if ('stored' in o) {
        if ('stored' in o.got && [o.stored].flat().includes(o.got.stored)) return [];
        return [`${label}: expected stored as ${[o.stored].flat().join(' or ')}, got ${JSON.stringify(o.got)}`];
      }
      if ('issues' in o.got && o.got.issues.length === 1 && o.got.issues[0]?.field === 'endpoint.url' && o.got.issues[0].rule.includes(o.refused))
        return [];
      return [`${label}: expected refused (endpoint.url: ${o.refused}...), got ${JSON.stringify(o.got)}`];
    });
    expect(wrong).to.deep.equal([]);
  });

  it('every stored form is read as one host and port by WHATWG URL, Python urlsplit and the allow-list, without user info', () => {
    expect(stored.length).to.be.greaterThan(15);
    const python = readByPython(stored, ENDPOINT_URL_PATTERN);
    const disagreements = stored.flatMap((url, i) => {
      const node = readByNode(url);
      const py = python[i];
      const checked = endpointHost(url);
      const problems: string[] = [];
      if (py === undefined || py.error !== undefined) problems.push(`python cannot parse it: ${py?.error ?? 'no answer'}`);
      else if (py.host !== node.host || py.port !== node.port) problems.push(`node reads ${node.host}:${node.port}, python ${py.host}:${py.port}`);
      if (node.host?.replace(/\.$/, '') !== checked) problems.push(`the allow-list saw ${checked}, node reads ${node.host}`);
      if (node.user !== null || node.password !== null || py?.user !== null || py.password !== null) problems.push('user info');
      const again = storedForm(url); // a stored job the worker validates again
      if (!('stored' in again) || again.stored !== url) problems.push(`validated again, it becomes ${JSON.stringify(again)}`);
      return problems.map((p) => `${url}: ${p}`);
    });
    expect(disagreements).to.deep.equal([]);
  });

  it("the JSON Schema's pattern accepts what the checks accept, in JavaScript's and Python's regex dialects", () => {
    const urls = CORPUS.map((c) => c.url);
    const python = readByPython(urls, ENDPOINT_URL_PATTERN);
    const js = new RegExp(ENDPOINT_URL_PATTERN, 'u');
    const disagreements = outcomes.flatMap((o, i) => {
      const accepted = 'stored' in o.got;
      // the one thing a pattern cannot check: whether an xn-- label is valid punycode (WHATWG URL decodes it)
      const laxer = !accepted && 'refused' in o && (o.refused === RULE.punycode || o.refused === RULE.whatwg);
      const short = o.url.length <= ENDPOINT_URL_MAX_LENGTH; // the JSON Schema's maxLength
      const verdicts = { checks: accepted, javascript: short && js.test(o.url), python: short && python[i]?.matches };
      const agree = laxer ? verdicts.javascript && verdicts.python === true : verdicts.javascript === accepted && verdicts.python === accepted;
      return agree ? [] : [`${JSON.stringify(o.url).slice(0, 80)}: ${JSON.stringify(verdicts)}`];
    });
    expect(disagreements).to.deep.equal([]);
  });

  it('dispatch serves a stored row in its normalised form, and never one the rules refuse (rows stored before them)', () => {
    const list = parseEndpointAllowList('.cluster.local,10.0.0.0/8').list;
    const serve = (url: string) =>
      resolveEndpoint({ state: 'ready', lastReadyAt: null, endpoint: { url, kind: 'cluster_dns' } }, new Date(0), {
        publicEndpointUrl: 'https://public.example.com',
        endpointAllow: list,
      });
    expect(serve('http://10.0.0.1\\@127.0.0.1:3199/')).to.deep.equal({
      url: 'https://public.example.com',
      source: 'public',
      reason: 'endpoint_not_allowed',
    });
    expect(serve('https://build.cluster.local\\@attacker.example.com/')).to.deep.include({ source: 'public', reason: 'endpoint_not_allowed' });
    expect(serve('http://10.0.0.1\t@127.0.0.1/')).to.deep.include({ source: 'public', reason: 'endpoint_not_allowed' });
    expect(serve('HTTP://Web.Cluster.Local:80')).to.deep.equal({ url: 'http://web.cluster.local/', source: 'private', reason: 'cluster_dns' });
    // without a list too: the rules are not the list's
    const open = resolveEndpoint(
      { state: 'ready', lastReadyAt: null, endpoint: { url: 'http://user@10.0.0.1/', kind: 'cluster_dns' } },
      new Date(0),
      {},
    );
    expect(open).to.deep.equal({ url: null, source: 'none', reason: 'endpoint_not_allowed' });
  });
});
