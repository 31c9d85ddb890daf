/**
 * The endpoint allow-list (`FLEET_ENDPOINT_ALLOW`): which hosts an endpoint URL may name. Endpoint URLs are handed
 * to build traffic by dispatch and fetched by the sweep's readiness probe, so a producer that could set any URL
 * could hijack builds or make the sweep probe internal addresses (server-side request forgery).
 *
 * Entries, comma-separated:
 * - `build.example.com`: exactly that host name (case-insensitive);
 * - `.nodes.example.com`: any host name below it (`a.nodes.example.com`), not the name itself;
 * - `10.20.0.0/16`, `fd00::/8`: IP address literals inside the range (an IP entry without `/` is one address).
 * Host names are matched as names: no DNS lookup happens here, so a name matches only a name entry and an IP
 * literal only a range. The host is the one WHATWG URL reads, which for a URL that the endpoint URL rules accept
 * (endpoint-url.ts) is the one every common client reads. Pure: no I/O.
 */
import { BlockList, isIP } from 'node:net';
import { ValidationError } from '../errors';
import { endpointUrlProblem, normalizeEndpointUrl } from './endpoint-url';

export interface EndpointAllowList {
  /** the entries as configured, for messages */
  readonly entries: readonly string[];
  allows(url: string): boolean;
}

/** Parses the entries; returns the problems (naming the entry and the rule) instead of throwing. */
export function parseEndpointAllowList(raw: string): { list: EndpointAllowList; problems: string[] } {
  const entries = raw
    .split(',')
    .map((e) => e.trim().toLowerCase())
    .filter((e) => e !== '');
  const names = new Set<string>();
  const suffixes: string[] = [];
  const ranges = new BlockList();
  const problems: string[] = [];
  for (const entry of entries) {
    const cidr = /^([^/]+)\/(\d{1,3})$/.exec(entry);
    const address = cidr?.[1] ?? entry;
    const family = isIP(address.replace(/^\[|\]$/g, ''));
    if (family !== 0) {
      const bits = cidr?.[2] === undefined ? (family === 4 ? 32 : 128) : Number(cidr[2]);
      if (bits > (family === 4 ? 32 : 128)) {
        problems.push(`FLEET_ENDPOINT_ALLOW: "${entry}": prefix length must be at most ${family === 4 ? 32 : 128}`);
        continue;
      }
      ranges.addSubnet(address.replace(/^\[|\]$/g, ''), bits, family === 4 ? 'ipv4' : 'ipv6');
    } else if (cidr !== null) {
      problems.push(`FLEET_ENDPOINT_ALLOW: "${entry}": a range must be an IP address and a prefix length, like 10.0.0.0/8`);
    } else if (/^\.?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/.test(entry)) {
      if (entry.startsWith('.')) suffixes.push(entry);
      else names.add(entry);
    } else {
      problems.push(`FLEET_ENDPOINT_ALLOW: "${entry.slice(0, 80)}": must be a host name, a .suffix or a CIDR range`);
    }
  }
  if (entries.length === 0) problems.push('FLEET_ENDPOINT_ALLOW: names no host (set host names, .suffixes or CIDR ranges)');

  const list: EndpointAllowList = {
    entries,
    allows(url: string): boolean {
      const host = endpointHost(url);
      if (host === null) return false;
      const family = isIP(host);
      if (family !== 0) return ranges.check(host, family === 4 ? 'ipv4' : 'ipv6');
      return names.has(host) || suffixes.some((s) => host.endsWith(s));
    },
  };
  return { list, problems };
}

/** The URL's host as the allow-list sees it: lower-case, without IPv6 brackets or a trailing dot; null when it does not parse. */
export function endpointHost(url: string): string | null {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return null;
  }
  const host = parsed.hostname
    .toLowerCase()
    .replace(/^\[|\]$/g, '')
    .replace(/\.$/, '');
  return host === '' ? null : host;
}

/** The rule an endpoint URL broke, in words, or null when the list allows it (or there is no list). */
export function endpointNotAllowed(url: string, list: EndpointAllowList | null): string | null {
  if (list === null || list.allows(url)) return null;
  const host = endpointHost(url) ?? '?';
  return `host "${host.slice(0, 100)}" is not allowed by FLEET_ENDPOINT_ALLOW`;
}

/**
 * Refuses a payload whose endpoint the list does not allow, as a `ValidationError` on `endpoint.url` (every event
 * that carries an endpoint: `deployment.create` and `attempt.end`).
 */
export function assertEndpointAllowed(payload: object, list: EndpointAllowList | null): void {
  const url = 'endpoint' in payload ? (payload.endpoint as { url?: unknown } | undefined)?.url : undefined;
  if (typeof url !== 'string') return;
  const rule = endpointNotAllowed(url, list);
  if (rule !== null) throw new ValidationError('invalid_payload', [{ field: 'endpoint.url', rule }]);
}

/**
 * A stored endpoint as it may be handed to build traffic (dispatch) or probed (the sweep): its normalised form, or
 * the rule it breaks. Rows stored before the endpoint URL rules (issue 28) may break them: such a URL is never
 * served, whatever the list says; one that keeps them is served normalised, as a new one would be stored.
 */
export function servableEndpoint(url: string, list: EndpointAllowList | null): { readonly url: string } | { readonly refused: string } {
  const problem = endpointUrlProblem(url);
  if (problem !== null) return { refused: `endpoint URL: ${problem}` };
  const normalized = normalizeEndpointUrl(url);
  const rule = endpointNotAllowed(normalized, list);
  return rule === null ? { url: normalized } : { refused: rule };
}
