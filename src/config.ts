/**
 * The one reader of the environment (docs/contract.md, "Configuration"). `loadConfig` parses every variable once,
 * reports every problem in one error, and returns a frozen object that the rest of the code receives.
 */
import { isIP } from 'node:net';
import { ConfigError } from './errors';
import { parseEndpointAllowList, type EndpointAllowList } from './events/endpoint-allow';
import { LOG_FORMATS, type LogFormat } from './log';
import { MAX_STREAM_PARTITIONS } from './util/partition-of';
import { isClusterUrl, parseClusterUrl, prefixHashTag } from './util/redis-url';
import type { LivenessLimits } from './machine';
import type { TracingSettings } from './telemetry';

/**
 * Defaults that components built without a `FleetConfig` (embedders, tests) fall back to as well: the one place each
 * is written. `loadConfig` uses them for the variables.
 */
export const DEFAULTS = Object.freeze({
  /** `FLEET_ORPHAN_AFTER_S`: three missed 30 s heartbeats */
  orphanAfterS: 90,
  /** `FLEET_PROGRESS_DEADLINE_S` */
  progressDeadlineS: 1800,
} satisfies LivenessLimits);

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export interface FleetConfig {
  /**
   * `REDIS_URL`; null: start a local redis-server under `.fleet/`. `redis+cluster://[user:password@]host:port,...`
   * (or `rediss+cluster://`) names a Redis Cluster by its seed nodes.
   */
  readonly redisUrl: string | null;
  /** true when REDIS_URL names a Redis Cluster */
  readonly redisCluster: boolean;
  /** `DATABASE_URL`; null: start a local PostgreSQL under `.fleet/` */
  readonly databaseUrl: string | null;
  /**
   * `FLEET_PREFIX` (default `fleet`; `{fleet}` with a cluster REDIS_URL): BullMQ prefix and stream key prefix. With
   * a cluster it must hold a hash tag (`{...}`), so that every key of the fleet lives in one slot.
   */
  readonly prefix: string;
  /** `FLEET_PUBLIC_ENDPOINT_URL` (default unset): the fallback endpoint */
  readonly publicEndpointUrl: string | null;
  /** `FLEET_READY_WINDOW_S` (default 120) */
  readonly readyWindowS: number;
  /** `FLEET_SWEEP_EVERY_S` (default 30) */
  readonly sweepEveryS: number;
  /** `FLEET_ORPHAN_AFTER_S` (default 90) */
  readonly orphanAfterS: number;
  /** `FLEET_PROGRESS_DEADLINE_S` (default 1800) */
  readonly progressDeadlineS: number;
  /** `FLEET_STREAM_MAXLEN` (default 1000000) */
  readonly streamMaxLen: number;
  /**
   * `FLEET_STREAM_PARTITIONS` (default 1, at most 1024): partitions of the transition stream (docs/contract.md,
   * "The transition stream"); 1 is the one stream `<prefix>:transitions`
   */
  readonly streamPartitions: number;
  /** `FLEET_HTTP_PORT` (default 3000) */
  readonly httpPort: number;
  /** `FLEET_HTTP_HOST` (default 127.0.0.1) */
  readonly httpHost: string;
  /** `FLEET_BOARD_USER` / `FLEET_BOARD_PASSWORD` (default unset) */
  readonly boardUser: string | null;
  readonly boardPassword: string | null;
  /** `FLEET_CONCURRENCY` (default 16) */
  readonly concurrency: number;
  /**
   * `FLEET_BATCH_MAX` (default 32; 1: off): most events of concurrently running jobs applied in one group commit
   * (docs/architecture.md, "Group commit")
   */
  readonly batchMax: number;
  /**
   * `FLEET_PROBE_CONCURRENCY` (default 64, chosen by `npm run bench -- --only scale`): readiness probes in flight at
   * once per process, over all the shards it runs
   */
  readonly probeConcurrency: number;
  /**
   * `FLEET_DURABLE_ENQUEUE` (default 0: off): replicas every HTTP intake enqueue and every relay stream append of
   * this process waits for before it counts as done (Redis `WAIT`)
   */
  readonly durableReplicas: number;
  /** `FLEET_DURABLE_TIMEOUT_MS` (default 1000): how long a durable enqueue waits for its replicas */
  readonly durableTimeoutMs: number;
  /** `LOG_LEVEL` (default info) */
  readonly logLevel: LogLevel;
  /**
   * `LOG_FORMAT` (default `pretty` when stdout is a terminal, else `json`): how `fleet` commands write their log.
   * Whatever reads a fleet process's log (the tests and the bench wait for `worker started` / `http started`) runs
   * it with stdout on a pipe, so it gets JSON unless it asks otherwise.
   */
  readonly logFormat: LogFormat;
  /**
   * `FLEET_API_TOKENS_FILE` (default unset): the bearer tokens of the HTTP API. Unset, the API is open, which is
   * allowed only while FLEET_HTTP_HOST is loopback.
   */
  readonly apiTokensFile: string | null;
  /**
   * `FLEET_ENDPOINT_ALLOW` (default unset: any host, allowed only while FLEET_HTTP_HOST is loopback): the hosts
   * endpoint URLs may name.
   */
  readonly endpointAllow: EndpointAllowList | null;
  /** `FLEET_EVENTS_RATE_LIMIT` (default 100; 0: no limit): `POST /api/events` per token (or per address) per second */
  readonly eventsRateLimit: number;
  /** `FLEET_METRICS_AUTH` (default `open`): `read` puts `/metrics` behind a token with the `read` scope */
  readonly metricsAuth: 'open' | 'read';
  /**
   * `FLEET_HTTP_TRUST_PROXY` (default none): addresses and CIDR ranges of the reverse proxies whose
   * `X-Forwarded-For` names the client (for the failed-authentication throttle and per-address limits)
   */
  readonly httpTrustProxy: readonly string[];
  /**
   * Tracing (docs/architecture.md, "Tracing"), from the standard OpenTelemetry variables: on when
   * `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set or `OTEL_TRACES_EXPORTER=otlp`;
   * `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turns it off whatever else is set (default: off)
   */
  readonly tracing: TracingSettings;
}

/** Off loopback, Bull Board's basic-auth password must be at least this long. */
export const MIN_BOARD_PASSWORD_LENGTH = 12;

type Env = Readonly<Record<string, string | undefined>>;

const LOOPBACK_HOSTS = new Set(['127.0.0.1', '::1', 'localhost']);

export function isLoopbackHost(host: string): boolean {
  return LOOPBACK_HOSTS.has(host) || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

/** Reads the environment, collecting every problem (never echoing a value that may carry a secret). */
class EnvReader {
  readonly problems: string[] = [];

  constructor(private readonly env: Env) {}

  /** the variable, trimmed; undefined when unset or blank */
  read(name: string): string | undefined {
    const value = this.env[name];
    return value === undefined || value.trim() === '' ? undefined : value.trim();
  }

  int(name: string, fallback: number, min: number, max: number): number {
    const raw = this.read(name);
    if (raw === undefined) return fallback;
    if (!/^\d+$/.test(raw)) {
      this.problems.push(`${name}: must be a whole number, got "${raw}"`);
      return fallback;
    }
    const value = Number(raw);
    if (value < min || value > max) {
      this.problems.push(`${name}: must be between ${min} and ${max}, got ${value}`);
      return fallback;
    }
    return value;
  }

  url(name: string, protocols: readonly string[]): string | null {
    const raw = this.read(name);
    if (raw === undefined) return null;
    let parsed: URL;
    try {
      parsed = new URL(raw);
    } catch {
      this.problems.push(`${name}: must be a URL (${protocols.join(' or ')}), got an unparsable value`);
      return null;
    }
    if (!protocols.includes(parsed.protocol.replace(/:$/, ''))) {
      // Never echo the value: it may carry a password.
      this.problems.push(`${name}: scheme must be ${protocols.join(' or ')}, got "${parsed.protocol.replace(/:$/, '')}"`);
      return null;
    }
    return raw;
  }
}

/**
 * @param terminal whether stdout is a terminal (the default of `LOG_FORMAT`); default: asks `process.stdout`
 */
export function loadConfig(env: Env = process.env, terminal: boolean = process.stdout.isTTY === true): FleetConfig {
  const r = new EnvReader(env);
  const redis = readRedis(r);
  const logging = readLogging(r, terminal);
  const http = readHttp(r);
  const sweepEveryS = r.int('FLEET_SWEEP_EVERY_S', 30, 1, 3600);
  const readyWindowS = r.int('FLEET_READY_WINDOW_S', 120, 1, 86_400);
  if (readyWindowS <= sweepEveryS) {
    r.problems.push(
      `FLEET_READY_WINDOW_S: must be longer than FLEET_SWEEP_EVERY_S (${readyWindowS} <= ${sweepEveryS}), or every endpoint flaps between ticks`,
    );
  }
  const tracing = readTracing((name) => r.read(name), r.problems);

  const config: FleetConfig = {
    ...redis,
    databaseUrl: r.url('DATABASE_URL', ['postgres', 'postgresql']),
    publicEndpointUrl: r.url('FLEET_PUBLIC_ENDPOINT_URL', ['http', 'https']),
    readyWindowS,
    sweepEveryS,
    orphanAfterS: r.int('FLEET_ORPHAN_AFTER_S', DEFAULTS.orphanAfterS, 1, 86_400),
    progressDeadlineS: r.int('FLEET_PROGRESS_DEADLINE_S', DEFAULTS.progressDeadlineS, 1, 7 * 86_400),
    streamMaxLen: r.int('FLEET_STREAM_MAXLEN', 1_000_000, 1000, 1_000_000_000),
    streamPartitions: r.int('FLEET_STREAM_PARTITIONS', 1, 1, MAX_STREAM_PARTITIONS),
    httpPort: r.int('FLEET_HTTP_PORT', 3000, 0, 65_535),
    concurrency: r.int('FLEET_CONCURRENCY', 16, 1, 1000),
    batchMax: r.int('FLEET_BATCH_MAX', 32, 1, 1000),
    probeConcurrency: r.int('FLEET_PROBE_CONCURRENCY', 64, 1, 10_000),
    durableReplicas: r.int('FLEET_DURABLE_ENQUEUE', 0, 0, 16),
    // under the fleet's Redis command timeout (5 s), or the client gives up on WAIT before Redis answers it
    durableTimeoutMs: r.int('FLEET_DURABLE_TIMEOUT_MS', 1000, 1, 4000),
    ...logging,
    ...http,
    eventsRateLimit: r.int('FLEET_EVENTS_RATE_LIMIT', 100, 0, 1_000_000),
    tracing,
  };

  if (r.problems.length > 0) throw new ConfigError(r.problems);
  return Object.freeze(config);
}

/** `REDIS_URL` (a cluster URL or a plain one) and `FLEET_PREFIX`, which a cluster constrains. */
function readRedis(r: EnvReader): Pick<FleetConfig, 'redisUrl' | 'redisCluster' | 'prefix'> {
  const redisUrlRaw = r.read('REDIS_URL');
  const redisCluster = redisUrlRaw !== undefined && isClusterUrl(redisUrlRaw);
  let redisUrl: string | null = null;
  if (redisCluster && redisUrlRaw !== undefined) {
    try {
      parseClusterUrl(redisUrlRaw);
      redisUrl = redisUrlRaw;
    } catch (err) {
      // the parser's messages never echo the value (it may carry a password)
      r.problems.push(`REDIS_URL: a cluster URL (redis+cluster://[user:password@]host:port,host:port,.../): ${(err as Error).message}`);
    }
  } else {
    redisUrl = r.url('REDIS_URL', ['redis', 'rediss', 'redis+cluster', 'rediss+cluster']);
  }

  const prefix = r.read('FLEET_PREFIX') ?? (redisCluster ? '{fleet}' : 'fleet');
  if (!/^[A-Za-z0-9_.{}-]{1,64}$/.test(prefix)) {
    r.problems.push(`FLEET_PREFIX: must be 1-64 characters of A-Za-z0-9_.-{} (no ':' or spaces), got "${prefix}"`);
  } else if (redisCluster && prefixHashTag(prefix) === null) {
    r.problems.push(
      `FLEET_PREFIX: with a Redis Cluster (REDIS_URL redis+cluster://) it must contain a non-empty hash tag, e.g. "{${prefix.replace(/[{}]/g, '') || 'fleet'}}", so that all of the fleet's keys live in one slot; got "${prefix}"`,
    );
  }
  return { redisUrl, redisCluster, prefix };
}

/** `LOG_LEVEL` and `LOG_FORMAT` (pretty on a terminal, else JSON). */
function readLogging(r: EnvReader, terminal: boolean): Pick<FleetConfig, 'logLevel' | 'logFormat'> {
  const logLevel = r.read('LOG_LEVEL') ?? 'info';
  if (!(LOG_LEVELS as readonly string[]).includes(logLevel)) {
    r.problems.push(`LOG_LEVEL: must be one of ${LOG_LEVELS.join(', ')}, got "${logLevel}"`);
  }
  const logFormat = r.read('LOG_FORMAT') ?? (terminal ? 'pretty' : 'json');
  if (!(LOG_FORMATS as readonly string[]).includes(logFormat)) {
    r.problems.push(`LOG_FORMAT: must be one of ${LOG_FORMATS.join(', ')}, got "${logFormat.slice(0, 40)}"`);
  }
  return { logLevel: logLevel as LogLevel, logFormat: logFormat as LogFormat };
}

type HttpSettings = Pick<
  FleetConfig,
  'httpHost' | 'boardUser' | 'boardPassword' | 'apiTokensFile' | 'endpointAllow' | 'httpTrustProxy' | 'metricsAuth'
>;

/** The HTTP role's variables, and what off loopback requires (board credentials, tokens, the allow-list). */
function readHttp(r: EnvReader): HttpSettings {
  const httpHost = r.read('FLEET_HTTP_HOST') ?? '127.0.0.1';
  const loopback = isLoopbackHost(httpHost);
  const boardUser = r.read('FLEET_BOARD_USER') ?? null;
  const boardPassword = r.read('FLEET_BOARD_PASSWORD') ?? null;
  if ((boardUser === null) !== (boardPassword === null)) {
    r.problems.push('FLEET_BOARD_USER / FLEET_BOARD_PASSWORD: set both or neither');
  } else if (boardUser === null && !loopback) {
    r.problems.push(`FLEET_BOARD_USER / FLEET_BOARD_PASSWORD: required when FLEET_HTTP_HOST is not loopback (it is "${httpHost}")`);
  }
  if (boardPassword !== null && !loopback && boardPassword.length < MIN_BOARD_PASSWORD_LENGTH) {
    // never echo the password, not even its length
    r.problems.push(`FLEET_BOARD_PASSWORD: must be at least ${MIN_BOARD_PASSWORD_LENGTH} characters when FLEET_HTTP_HOST is not loopback`);
  }
  const apiTokensFile = r.read('FLEET_API_TOKENS_FILE') ?? null;
  if (apiTokensFile === null && !loopback) {
    r.problems.push(
      `FLEET_API_TOKENS_FILE: required when FLEET_HTTP_HOST is not loopback (it is "${httpHost}"): create tokens with \`fleet token create\``,
    );
  }
  const allowRaw = r.read('FLEET_ENDPOINT_ALLOW');
  let endpointAllow: EndpointAllowList | null = null;
  if (allowRaw !== undefined) {
    const parsed = parseEndpointAllowList(allowRaw);
    r.problems.push(...parsed.problems);
    endpointAllow = parsed.list;
  } else if (!loopback) {
    r.problems.push(
      `FLEET_ENDPOINT_ALLOW: required when FLEET_HTTP_HOST is not loopback (it is "${httpHost}"): the host names, .suffixes and CIDR ranges endpoint URLs may name`,
    );
  }
  const metricsAuth = r.read('FLEET_METRICS_AUTH') ?? 'open';
  const httpTrustProxy = readTrustProxy(r);
  if (metricsAuth !== 'open' && metricsAuth !== 'read') {
    r.problems.push(`FLEET_METRICS_AUTH: must be "open" or "read", got "${metricsAuth.slice(0, 40)}"`);
  }
  return { httpHost, boardUser, boardPassword, apiTokensFile, endpointAllow, httpTrustProxy, metricsAuth: metricsAuth === 'read' ? 'read' : 'open' };
}

/** `FLEET_HTTP_TRUST_PROXY`: comma-separated addresses and CIDR ranges. */
function readTrustProxy(r: EnvReader): readonly string[] {
  const entries = (r.read('FLEET_HTTP_TRUST_PROXY') ?? '')
    .split(',')
    .map((e) => e.trim())
    .filter((e) => e !== '');
  for (const entry of entries) {
    const [address = '', bits, ...rest] = entry.split('/');
    const family = isIP(address);
    if (family === 0 || rest.length > 0 || (bits !== undefined && !(/^\d{1,3}$/.test(bits) && Number(bits) <= (family === 4 ? 32 : 128)))) {
      r.problems.push(`FLEET_HTTP_TRUST_PROXY: "${entry.slice(0, 60)}": must be an IP address or a CIDR range`);
    }
  }
  return Object.freeze(entries);
}

/** The `OTEL_*` variables this fleet honours (OTLP over HTTP only), and the bench's `FLEET_TRACE_BENCH` hook. */
function readTracing(read: (name: string) => string | undefined, problems: string[]): TracingSettings {
  const disabledRaw = read('OTEL_SDK_DISABLED')?.toLowerCase();
  if (disabledRaw !== undefined && disabledRaw !== 'true' && disabledRaw !== 'false') {
    problems.push(`OTEL_SDK_DISABLED: must be "true" or "false", got "${disabledRaw.slice(0, 40)}"`);
  }
  const exporters = (read('OTEL_TRACES_EXPORTER') ?? '')
    .split(',')
    .map((e) => e.trim().toLowerCase())
    .filter((e) => e !== '');
  const unsupported = exporters.filter((e) => e !== 'otlp' && e !== 'none');
  if (unsupported.length > 0) {
    problems.push(`OTEL_TRACES_EXPORTER: must be "otlp" or "none" (this fleet exports OTLP over HTTP), got "${unsupported.join(',').slice(0, 60)}"`);
  }
  const protocol = read('OTEL_EXPORTER_OTLP_TRACES_PROTOCOL') ?? read('OTEL_EXPORTER_OTLP_PROTOCOL');
  if (protocol !== undefined && protocol !== 'http/json' && protocol !== 'http/protobuf') {
    problems.push(
      `OTEL_EXPORTER_OTLP_PROTOCOL: this fleet exports OTLP over HTTP (JSON), so it must be "http/json" or "http/protobuf" (the same HTTP endpoint), got "${protocol.slice(0, 40)}"`,
    );
  }
  const endpoint = (name: string): string | undefined => {
    const raw = read(name);
    if (raw === undefined) return undefined;
    try {
      const u = new URL(raw);
      if (u.protocol === 'http:' || u.protocol === 'https:') return raw;
      problems.push(`${name}: scheme must be http or https (OTLP over HTTP), got "${u.protocol.replace(/:$/, '')}"`);
    } catch {
      // never echo the value: it may carry credentials
      problems.push(`${name}: must be an http(s) URL, got an unparsable value`);
    }
    return undefined;
  };
  const tracesEndpoint = endpoint('OTEL_EXPORTER_OTLP_TRACES_ENDPOINT');
  const baseEndpoint = endpoint('OTEL_EXPORTER_OTLP_ENDPOINT');
  const bench = read('FLEET_TRACE_BENCH');
  if (bench !== undefined && bench !== '0' && bench !== '1') problems.push(`FLEET_TRACE_BENCH: must be 0 or 1, got "${bench.slice(0, 40)}"`);
  const off = disabledRaw === 'true' || exporters.includes('none');
  const asked = tracesEndpoint !== undefined || baseEndpoint !== undefined || exporters.includes('otlp');
  return Object.freeze({
    enabled: bench === '1' || (!off && asked),
    serviceName: read('OTEL_SERVICE_NAME') ?? 'lifecycle-fleet',
    tracesUrl: tracesEndpoint ?? (baseEndpoint !== undefined ? `${baseEndpoint.replace(/\/+$/, '')}/v1/traces` : 'http://localhost:4318/v1/traces'),
    benchExporter: bench === '1',
  });
}

/** What `fleet watch` reads from the environment: where the fleet's HTTP API is, and the token it sends. */
export interface WatchClientConfig {
  /** `FLEET_URL` (default `http://127.0.0.1:3000`): the fleet's HTTP API; `--url` overrides it */
  readonly url: string;
  /**
   * `FLEET_TOKEN` (default unset: no Authorization header, which a fleet on loopback with no tokens file accepts): a
   * bearer token with the `read` scope. Only from the environment: a command-line value shows in `ps` and in the
   * shell's history.
   */
  readonly token: string | null;
}

/** The default of `FLEET_URL`: a fleet's HTTP surface on its default host and port. */
export const DEFAULT_FLEET_URL = 'http://127.0.0.1:3000';

/**
 * Reads `FLEET_URL` and `FLEET_TOKEN` for `fleet watch` (and checks a `--url` given instead), every problem in one
 * ConfigError; never echoes the token or a URL's credentials.
 */
export function loadWatchConfig(env: Env = process.env, urlOption?: string): WatchClientConfig {
  const r = new EnvReader(env);
  const name = urlOption !== undefined ? '--url' : 'FLEET_URL';
  const url = urlOption !== undefined ? urlOption.trim() : (r.url('FLEET_URL', ['http', 'https']) ?? DEFAULT_FLEET_URL);
  let parsed: URL | null = null;
  try {
    parsed = new URL(url);
  } catch {
    r.problems.push(`${name}: must be an http or https URL, got an unparsable value`);
  }
  if (parsed !== null && parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    r.problems.push(`${name}: scheme must be http or https, got "${parsed.protocol.replace(/:$/, '')}"`);
  }
  if (parsed !== null && (parsed.username !== '' || parsed.password !== '')) {
    r.problems.push(`${name}: must carry no credentials: give the token in FLEET_TOKEN`);
  }
  if (parsed !== null && (parsed.search !== '' || parsed.hash !== '')) r.problems.push(`${name}: must have no query or fragment`);
  const token = r.read('FLEET_TOKEN') ?? null;
  // a header value: visible ASCII only (a line break would end the header; fetch refuses one, with no name to it)
  if (token !== null && !/^[\x21-\x7e]+$/.test(token)) r.problems.push('FLEET_TOKEN: must be printable ASCII with no spaces');
  if (r.problems.length > 0) throw new ConfigError(r.problems);
  return Object.freeze({ url, token });
}
