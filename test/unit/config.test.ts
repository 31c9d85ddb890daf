import { expect } from 'chai';
import { loadConfig, loadWatchConfig } from '../../src/config';
import { ConfigError } from '../../src/errors';

describe('configuration', () => {
  it('has the documented defaults and is frozen', () => {
    const config = loadConfig({}, false);
    expect(config).to.deep.equal({
      redisUrl: null,
      redisCluster: false,
      databaseUrl: null,
      prefix: 'fleet',
      publicEndpointUrl: null,
      readyWindowS: 120,
      sweepEveryS: 30,
      orphanAfterS: 90,
      progressDeadlineS: 1800,
      streamMaxLen: 1_000_000,
      streamPartitions: 1,
      httpPort: 3000,
      httpHost: '127.0.0.1',
      boardUser: null,
      boardPassword: null,
      concurrency: 16,
      batchMax: 32,
      probeConcurrency: 64,
      durableReplicas: 0,
      durableTimeoutMs: 1000,
      logLevel: 'info',
      logFormat: 'json',
      apiTokensFile: null,
      endpointAllow: null,
      eventsRateLimit: 100,
      metricsAuth: 'open',
      httpTrustProxy: [],
      tracing: { enabled: false, serviceName: 'lifecycle-fleet', tracesUrl: 'http://localhost:4318/v1/traces', benchExporter: false },
    });
    expect(Object.isFrozen(config)).to.equal(true);
  });

  describe('tracing (the standard OTEL_* variables)', () => {
    const tracing = (env: Record<string, string>) => loadConfig(env).tracing;

    it('is on when an OTLP endpoint is set or OTEL_TRACES_EXPORTER=otlp, sending to the traces endpoint', () => {
      expect(tracing({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:4318/' })).to.include({
        enabled: true,
        tracesUrl: 'http://127.0.0.1:4318/v1/traces',
      });
      expect(
        tracing({ OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: 'http://127.0.0.1:9999/t', OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:4318' }),
      ).to.include({
        enabled: true,
        tracesUrl: 'http://127.0.0.1:9999/t',
      });
      expect(tracing({ OTEL_TRACES_EXPORTER: 'otlp', OTEL_SERVICE_NAME: 'fleet-eu' })).to.include({
        enabled: true,
        serviceName: 'fleet-eu',
        tracesUrl: 'http://localhost:4318/v1/traces',
      });
    });

    it('OTEL_SDK_DISABLED=true and OTEL_TRACES_EXPORTER=none win over an endpoint', () => {
      expect(tracing({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:4318', OTEL_SDK_DISABLED: 'true' }).enabled).to.equal(false);
      expect(tracing({ OTEL_EXPORTER_OTLP_ENDPOINT: 'http://127.0.0.1:4318', OTEL_TRACES_EXPORTER: 'none' }).enabled).to.equal(false);
      expect(tracing({ OTEL_SERVICE_NAME: 'named-but-off' }).enabled).to.equal(false);
    });

    it('names the variable and the rule for what it cannot honour, never echoing an endpoint', () => {
      try {
        loadConfig({
          OTEL_TRACES_EXPORTER: 'zipkin',
          OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc',
          OTEL_EXPORTER_OTLP_ENDPOINT: 'ftp://user:s3cret@collector',
          OTEL_SDK_DISABLED: 'yes',
          FLEET_TRACE_BENCH: '2',
        });
        expect.fail('loadConfig accepted them');
      } catch (err) {
        expect(err).to.be.instanceOf(ConfigError);
        const { problems } = err as ConfigError;
        expect(problems.map((p) => p.split(':')[0])).to.deep.equal([
          'OTEL_SDK_DISABLED',
          'OTEL_TRACES_EXPORTER',
          'OTEL_EXPORTER_OTLP_PROTOCOL',
          'OTEL_EXPORTER_OTLP_ENDPOINT',
          'FLEET_TRACE_BENCH',
        ]);
        expect(problems.join('\n')).not.to.contain('s3cret');
      }
    });
  });

  it('reads every variable', () => {
    const config = loadConfig({
      REDIS_URL: 'rediss://user:pw@redis.internal:6380/2',
      DATABASE_URL: 'postgresql://fleet:pw@db:5432/fleet?sslmode=require',
      FLEET_PREFIX: '{fleet}',
      FLEET_PUBLIC_ENDPOINT_URL: 'https://builds.example.com',
      FLEET_READY_WINDOW_S: '60',
      FLEET_SWEEP_EVERY_S: '10',
      FLEET_ORPHAN_AFTER_S: '45',
      FLEET_PROGRESS_DEADLINE_S: '600',
      FLEET_STREAM_MAXLEN: '5000',
      FLEET_HTTP_PORT: '8080',
      FLEET_HTTP_HOST: '0.0.0.0',
      FLEET_BOARD_USER: 'ops',
      FLEET_BOARD_PASSWORD: 'secret-secret',
      FLEET_CONCURRENCY: '4',
      FLEET_BATCH_MAX: '1',
      FLEET_PROBE_CONCURRENCY: '200',
      LOG_LEVEL: 'debug',
      LOG_FORMAT: 'pretty',
      FLEET_API_TOKENS_FILE: '/etc/fleet/tokens.json',
      FLEET_ENDPOINT_ALLOW: '.nodes.example.com,10.0.0.0/8',
      FLEET_EVENTS_RATE_LIMIT: '50',
      FLEET_METRICS_AUTH: 'read',
    });
    expect(config).to.deep.include({
      prefix: '{fleet}',
      readyWindowS: 60,
      sweepEveryS: 10,
      httpHost: '0.0.0.0',
      concurrency: 4,
      batchMax: 1,
      probeConcurrency: 200,
      apiTokensFile: '/etc/fleet/tokens.json',
      eventsRateLimit: 50,
      metricsAuth: 'read',
      logFormat: 'pretty',
    });
    expect(config.endpointAllow?.entries).to.deep.equal(['.nodes.example.com', '10.0.0.0/8']);
  });

  it('lists every problem in one error, naming each variable, without echoing secrets', () => {
    let error: unknown;
    try {
      loadConfig({
        REDIS_URL: 'http://user:hunter2@x',
        FLEET_CONCURRENCY: 'many',
        FLEET_BATCH_MAX: '0',
        FLEET_PROBE_CONCURRENCY: '0',
        FLEET_HTTP_PORT: '70000',
        FLEET_PREFIX: 'a:b',
        LOG_LEVEL: 'loud',
        LOG_FORMAT: 'xml',
        FLEET_HTTP_HOST: '0.0.0.0',
        FLEET_READY_WINDOW_S: '30',
      });
    } catch (err) {
      error = err;
    }
    expect(error).to.be.instanceOf(ConfigError);
    const problems = (error as ConfigError).problems;
    expect(problems.map((p) => p.split(':')[0])).to.have.members([
      'REDIS_URL',
      'FLEET_CONCURRENCY',
      'FLEET_BATCH_MAX',
      'FLEET_PROBE_CONCURRENCY',
      'FLEET_HTTP_PORT',
      'FLEET_PREFIX',
      'LOG_LEVEL',
      'LOG_FORMAT',
      'FLEET_BOARD_USER / FLEET_BOARD_PASSWORD',
      'FLEET_API_TOKENS_FILE',
      'FLEET_ENDPOINT_ALLOW',
      'FLEET_READY_WINDOW_S',
    ]);
    expect((error as Error).message).not.to.contain('hunter2');
  });

  it('LOG_FORMAT: pretty on a terminal, json off one, either when asked, and nothing else', () => {
    expect(loadConfig({}, true).logFormat).to.equal('pretty');
    expect(loadConfig({}, false).logFormat).to.equal('json');
    expect(loadConfig({ LOG_FORMAT: 'json' }, true).logFormat).to.equal('json');
    expect(loadConfig({ LOG_FORMAT: ' pretty ' }, false).logFormat).to.equal('pretty');
    expect(loadConfig({ LOG_FORMAT: '' }, true).logFormat).to.equal('pretty'); // blank counts as unset
    for (const bad of ['JSON', 'text', 'pretty,json']) {
      expect(() => loadConfig({ LOG_FORMAT: bad }, true)).to.throw(ConfigError, `LOG_FORMAT: must be one of pretty, json, got "${bad}"`);
    }
  });

  describe('a Redis Cluster REDIS_URL', () => {
    const problemsOf = (env: Record<string, string>): string[] => {
      try {
        loadConfig(env);
      } catch (err) {
        if (err instanceof ConfigError) return [...err.problems];
        throw err;
      }
      return [];
    };

    it('takes seed nodes, defaults the prefix to {fleet} and keeps a hash-tag prefix', () => {
      const config = loadConfig({ REDIS_URL: 'redis+cluster://fleet:pw@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/' });
      expect(config).to.deep.include({ redisCluster: true, prefix: '{fleet}' });
      expect(loadConfig({ REDIS_URL: 'rediss+cluster://h:7000', FLEET_PREFIX: 'acme-{builds}' }).prefix).to.equal('acme-{builds}');
      expect(loadConfig({ REDIS_URL: 'redis://h:6379' }).redisCluster).to.equal(false);
    });

    it('refuses a prefix without a hash tag, naming FLEET_PREFIX and the rule', () => {
      for (const prefix of ['fleet', '{}fleet', 'fleet{', 'a}b{']) {
        const problems = problemsOf({ REDIS_URL: 'redis+cluster://h:7000', FLEET_PREFIX: prefix });
        expect(problems, prefix).to.have.length(1);
        expect(problems[0]).to.match(/^FLEET_PREFIX: .*hash tag/);
      }
    });

    it('refuses a malformed node list, naming REDIS_URL, without echoing the password', () => {
      for (const url of [
        'redis+cluster://u:hunter2@h1:7000,h2',
        'redis+cluster://u:hunter2@h1:70000',
        'redis+cluster://u:hunter2@h1:7000/2',
        'redis+cluster://',
      ]) {
        const problems = problemsOf({ REDIS_URL: url });
        expect(problems, url).to.have.length(1);
        expect(problems[0]).to.match(/^REDIS_URL: a cluster URL/);
        expect(problems[0]).not.to.contain('hunter2');
      }
    });
  });
});

describe("fleet watch's configuration (FLEET_URL, FLEET_TOKEN, --url)", () => {
  const problems = (env: Record<string, string>, url?: string): string[] => {
    try {
      loadWatchConfig(env, url);
      return [];
    } catch (err) {
      if (err instanceof ConfigError) return [...err.problems];
      throw err;
    }
  };

  it('defaults to the fleet on loopback, without a token; --url wins over FLEET_URL', () => {
    expect(loadWatchConfig({})).to.deep.equal({ url: 'http://127.0.0.1:3000', token: null });
    expect(loadWatchConfig({ FLEET_URL: 'https://fleet.example.com/ops/', FLEET_TOKEN: ' lft_abc ' })).to.deep.equal({
      url: 'https://fleet.example.com/ops/',
      token: 'lft_abc',
    });
    expect(loadWatchConfig({ FLEET_URL: 'https://a.example.com' }, 'http://b.example.com:8080').url).to.equal('http://b.example.com:8080');
  });

  it('refuses a URL that is not http(s), carries credentials, a query or a fragment, and a token with spaces, never echoing secrets', () => {
    expect(problems({ FLEET_URL: 'ftp://h' })).to.deep.equal(['FLEET_URL: scheme must be http or https, got "ftp"']);
    expect(problems({}, 'not a url')).to.deep.equal(['--url: must be an http or https URL, got an unparsable value']);
    expect(problems({}, 'http://ops:hunter2@h/')).to.deep.equal(['--url: must carry no credentials: give the token in FLEET_TOKEN']);
    expect(problems({ FLEET_URL: 'http://h/?a=1' })).to.deep.equal(['FLEET_URL: must have no query or fragment']);
    const token = problems({ FLEET_TOKEN: 'lft_a b\nInjected: 1' });
    expect(token).to.deep.equal(['FLEET_TOKEN: must be printable ASCII with no spaces']);
  });
});
