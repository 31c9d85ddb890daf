/**
 * The Redis Cluster form of REDIS_URL (docs/contract.md, "Configuration"):
 * `redis+cluster://[user:password@]host1:port1,host2:port2,.../` (`rediss+cluster://` for TLS). The hosts are seed
 * nodes: ioredis' `Cluster` learns the rest of the cluster from any one of them. Pure parsing, no ioredis, so that
 * the configuration can check it.
 */

export const CLUSTER_SCHEMES = ['redis+cluster', 'rediss+cluster'] as const;

export interface RedisClusterUrl {
  readonly nodes: ReadonlyArray<{ readonly host: string; readonly port: number }>;
  readonly username: string | undefined;
  readonly password: string | undefined;
  readonly tls: boolean;
}

/** True when `url` names a Redis Cluster (its scheme is `redis+cluster` or `rediss+cluster`). */
export function isClusterUrl(url: string): boolean {
  const scheme = /^([a-z+]+):\/\//i.exec(url.trim())?.[1]?.toLowerCase();
  return scheme === 'redis+cluster' || scheme === 'rediss+cluster';
}

/**
 * Parses a cluster URL, or throws an Error whose message says which rule it breaks (never echoing the password).
 * Every node needs an explicit port; IPv6 hosts go in brackets (`[::1]:7000`); a path, if any, must be `/`.
 */
export function parseClusterUrl(url: string): RedisClusterUrl {
  const m = /^([a-z+]+):\/\/(?:([^@/]*)@)?([^/?#]*)(\/?)([^]*)$/i.exec(url.trim());
  const scheme = m?.[1]?.toLowerCase();
  if (m === null || (scheme !== 'redis+cluster' && scheme !== 'rediss+cluster')) {
    throw new Error(`scheme must be ${CLUSTER_SCHEMES.join(' or ')}`);
  }
  const [, , auth, hostList = '', , rest = ''] = m;
  if (rest !== '') throw new Error('a cluster URL takes no path, database number or query (the cluster has database 0 only)');
  let username: string | undefined;
  let password: string | undefined;
  if (auth !== undefined && auth !== '') {
    const colon = auth.indexOf(':');
    const user = colon < 0 ? auth : auth.slice(0, colon);
    const pass = colon < 0 ? undefined : auth.slice(colon + 1);
    try {
      username = user === '' ? undefined : decodeURIComponent(user);
      password = pass === undefined || pass === '' ? undefined : decodeURIComponent(pass);
    } catch {
      throw new Error('the user or password is not valid percent-encoding');
    }
  }
  const nodes = hostList.split(',').map((entry, i) => {
    const n = /^(\[[0-9a-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$/i.exec(entry.trim());
    const port = Number(n?.[2]);
    if (n === null || n[1] === undefined || port < 1 || port > 65_535) {
      throw new Error(`seed node ${i + 1} must be host:port with a port of 1-65535 (nodes are separated by commas)`);
    }
    return { host: n[1].replace(/^\[|\]$/g, ''), port };
  });
  return { nodes, username, password, tls: scheme === 'rediss+cluster' };
}

/**
 * The hash tag Redis Cluster would hash every key under `prefix:` by, or null when keys under it would spread over
 * slots: the part between the first `{` and the first `}` after it, when that is not empty.
 */
export function prefixHashTag(prefix: string): string | null {
  const open = prefix.indexOf('{');
  if (open < 0) return null;
  const close = prefix.indexOf('}', open + 1);
  return close > open + 1 ? prefix.slice(open + 1, close) : null;
}
