/**
 * The endpoint URL rules (docs/contract.md, "Endpoints"; issue 28). Dispatch hands a stored endpoint URL to build
 * traffic, whose clients parse it each their own way (curl, Python's urllib, Go, Node's WHATWG URL), and the sweep
 * probes it; the allow-list checks the host that WHATWG URL reads. So an endpoint URL must be one that every common
 * parser reads as the same host and port: spellings that parsers disagree on are refused (backslashes, user info,
 * control characters and whitespace that WHATWG strips, non-ASCII hosts that WHATWG maps, IPv4 written in forms
 * that WHATWG reads as addresses and others as names, percent-encoded hosts, IPv6 zone ids), and what is accepted
 * is stored and served as WHATWG URL's `href` (lower-case host, default port dropped, dot segments resolved).
 *
 * The grammar (`ENDPOINT_URL_PATTERN`) is also the JSON Schema's pattern (docs/schemas): one definition.
 * Pure: no I/O.
 */
import { domainToUnicode } from 'node:url';

/** The longest endpoint URL, as sent and as stored. */
export const ENDPOINT_URL_MAX_LENGTH = 2048;

/** One IPv4 number, 0-255 in decimal without a leading zero. */
const DEC_OCTET = '(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])';
const IPV4 = `${DEC_OCTET}(?:\\.${DEC_OCTET}){3}`;
const H16 = '[0-9A-Fa-f]{1,4}';
const LS32 = `(?:${H16}:${H16}|${IPV4})`;
/** RFC 3986's IPv6address: eight groups, or fewer around one `::`, the last 32 bits possibly as IPv4. */
const IPV6 = [
  `(?:${H16}:){6}${LS32}`,
  `::(?:${H16}:){5}${LS32}`,
  ...[`(?:${H16}:){4}${LS32}`, `(?:${H16}:){3}${LS32}`, `(?:${H16}:){2}${LS32}`, `${H16}:${LS32}`, LS32, H16, ''].map(
    (after, before) => `(?:(?:${H16}:){0,${before}}${H16})?::${after}`,
  ),
]
  .map((form) => `(?:${form})`)
  .join('|');
/**
 * A host name: dot-separated labels of letters, digits, `-` and `_`, the last one beginning with a letter (a last
 * label that is a number makes WHATWG URL read the whole host as an IPv4 address), an optional trailing dot.
 */
const NAME = '(?:[A-Za-z0-9_-]+\\.)*[A-Za-z][A-Za-z0-9_-]*\\.?';
/** 1-65535 without a leading zero. */
const PORT = '(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})';
/** Printable ASCII but `#`, `?` and `\`. */
const PATH = '/[!-"$->@-\\[\\]-~]*';

/**
 * The grammar of an endpoint URL, as a regular expression that JSON Schema validators (ECMA-262, and Python's `re`)
 * read alike: `http` or `https`, `://`, a host (a name, an IPv4 address, an IPv6 address in brackets), an optional
 * port, an optional path; no user info, query or fragment.
 */
export const ENDPOINT_URL_PATTERN = `^[Hh][Tt][Tt][Pp][Ss]?://(?:${NAME}|${IPV4}|\\[(?:${IPV6})\\])(?::${PORT})?(?:${PATH})?$`;

const whole = (source: string) => new RegExp(`^(?:${source})$`);
const IS_NAME = whole(NAME);
const IS_IPV4 = whole(IPV4);
const IS_IPV6 = whole(`\\[(?:${IPV6})\\]`);
const IS_PORT = whole(PORT);
const IS_GRAMMAR = new RegExp(ENDPOINT_URL_PATTERN);

/**
 * The rule an endpoint URL breaks, in words, or null when it is one (then `normalizeEndpointUrl` gives its stored
 * form). The first rule broken is named, the most specific first.
 */
export function endpointUrlProblem(url: string): string | null {
  if (url.length > ENDPOINT_URL_MAX_LENGTH) return `must be at most ${ENDPOINT_URL_MAX_LENGTH} characters`;
  if (!/^[!-~]*$/.test(url)) {
    return 'must be printable ASCII without spaces or control characters (a non-ASCII host as punycode, xn--..., a non-ASCII path percent-encoded)';
  }
  if (url.includes('\\')) return 'must not contain a backslash (WHATWG URL reads it as "/", other parsers as part of the host or user name)';
  if (/[?#]/.test(url)) return 'must not carry a query or a fragment';
  const parts = /^https?:\/\/([^/]+)/i.exec(url);
  if (parts?.[1] === undefined) return 'must be an http or https URL: "http://" or "https://", then a host';
  const authority = parts[1];
  if (authority.includes('@')) return 'must not carry credentials (user info: no "@" before the path)';
  if (authority.includes('%')) return 'the host must not be percent-encoded, nor carry an IPv6 zone id';
  const hostAndPort = /^(\[[^\]]*\]?|[^:]*)(?::(.*))?$/.exec(authority);
  const host = hostAndPort?.[1] ?? '';
  const port = hostAndPort?.[2];
  if (host === '') return 'must be an http or https URL: "http://" or "https://", then a host';
  if (host.startsWith('[')) {
    if (!IS_IPV6.test(host)) return 'an IPv6 host must be an IPv6 address in brackets, with nothing after "]" but a port';
  } else if (!IS_NAME.test(host) && !IS_IPV4.test(host)) {
    if (/^[0-9]/.test(host.replace(/\.$/, '').split('.').pop() ?? '')) {
      return "a host name's last label must begin with a letter, and an IPv4 address be four decimal numbers 0-255 without leading zeros (WHATWG URL reads 127.1, 0x7f.1 or 2130706433 as 127.0.0.1, other parsers as names)";
    }
    return 'the host must be a name (dot-separated labels of letters, digits, "-" and "_"), an IPv4 address or an IPv6 address in brackets';
  }
  if (port !== undefined && !IS_PORT.test(port)) return 'the port must be a number 1-65535 without leading zeros';
  if (!host.startsWith('[') && host.split('.').some((label) => /^xn--/i.test(label) && !isPunycode(label))) {
    return 'an xn-- label must be valid punycode (parsers disagree on one that is not)';
  }
  let href: string;
  try {
    href = normalizeEndpointUrl(url);
  } catch {
    return 'must be a URL that WHATWG URL parses (an xn-- label must be valid punycode)';
  }
  if (href.length > ENDPOINT_URL_MAX_LENGTH) return `must be at most ${ENDPOINT_URL_MAX_LENGTH} characters (as stored: ${href.length})`;
  // every case above names its rule; this keeps the checks and the JSON Schema's pattern one grammar
  if (!IS_GRAMMAR.test(url)) return 'must be http(s)://host[:port][/path]';
  return null;
}

/**
 * Whether an `xn--` label decodes to the Unicode label it stands for. Checked here, not left to WHATWG URL: Node 20's
 * and 22's refuses such a label and Node 24's (ada 4) keeps it as it is, so every supported Node accepts the same URLs.
 */
function isPunycode(label: string): boolean {
  const unicode = domainToUnicode(label.toLowerCase());
  return unicode !== '' && !/^xn--/i.test(unicode);
}

/**
 * The stored and served form of an endpoint URL that `endpointUrlProblem` accepts: WHATWG URL's `href`, with `^`
 * percent-encoded. The URL Standard added `^` to the path percent-encode set, and Node 24's parser (ada 4) encodes it
 * while Node 20's and 22's keep it: encoding it here makes the stored form, and the digest of the payload that holds
 * it, the same whichever supported Node validated the event (a rolling runtime upgrade would otherwise read a
 * redelivery as another payload under the same eventId). `^` can only be in the path (the grammar has no user info,
 * query or fragment, and no host holds one).
 */
export function normalizeEndpointUrl(url: string): string {
  return new URL(url).href.replaceAll('^', '%5E');
}
