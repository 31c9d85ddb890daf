/**
 * Scenario 4: dispatch, `resolveEndpoint` answers per second: in-process (the pure function over loaded rows),
 * through Fastify's `inject` (routing, the row read, serialization; no socket) and over real loopback HTTP with
 * keep-alive against `node bin/fleet.js http` in a process of its own. Baselines on the same services: the row
 * read alone (`getDeployment` through the same DataSource) for the in-process figure, and `GET /healthz` (same
 * server, no database) for both HTTP figures: the framework's own floor. Every loop is bounded in count and time.
 */
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import IORedis from 'ioredis';
import { loadConfig } from '../../src/config';
import { buildHttpServer } from '../../src/http/server';
import { silentLogger } from '../../src/log';
import { FleetMetrics } from '../../src/metrics';
import { LifecycleProducer } from '../../src/queues/producer';
import { resolveEndpoint } from '../../src/services/dispatch/resolve-endpoint';
import { getDeployment, type DeploymentView } from '../../src/services/read-model/views';
import { MeasuredProcess } from '../lib/child';
import { inLanes, log, now, percentiles, round, type Percentiles } from '../lib/common';
import { openDataSource, type BenchServices } from '../lib/services';

const PUBLIC = 'https://public.example.com';
const LANES = 16;

export interface Rate {
  readonly perSec: number;
  readonly count: number;
  readonly latencyMs?: Percentiles;
}

export interface DispatchResult {
  readonly deployments: number;
  readonly lanes: number;
  readonly inProcess: { readonly resolveEndpoint: Rate; readonly baselineRowRead: Rate };
  readonly inject: { readonly endpoint: Rate; readonly baselineHealthz: Rate };
  readonly http: { readonly endpoint: Rate; readonly baselineHealthz: Rate };
  /** answers by source over the in-process run, to show the mix exercised every branch */
  readonly sources: Readonly<Record<string, number>>;
}

export interface DispatchOptions {
  readonly httpRequests: number;
  readonly maxSeconds: number;
}

/** `count` calls of `call` in LANES lanes, or until `maxSeconds`; per-call latency. */
async function measure(count: number, maxSeconds: number, call: (i: number) => Promise<void>): Promise<Rate> {
  const latencies: number[] = [];
  const started = now();
  const done = await inLanes(
    count,
    LANES,
    async (i) => {
      const t = now();
      await call(i);
      latencies.push(now() - t);
    },
    started + maxSeconds * 1000,
  );
  const seconds = (now() - started) / 1000;
  return { perSec: round(done / seconds), count: done, latencyMs: percentiles(latencies) };
}

function get(agent: http.Agent, port: number, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path, agent }, (res) => {
      if (res.statusCode !== 200) reject(new Error(`GET ${path}: ${res.statusCode ?? '?'}`));
      res.resume();
      res.on('end', () => resolve());
      res.on('error', reject);
    });
    req.on('error', reject);
  });
}

async function freePort(): Promise<number> {
  const server = http.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

export async function runDispatch(services: BenchServices, options: DispatchOptions): Promise<DispatchResult> {
  const dbUrl = await services.createDatabase('dispatch');
  const ds = await openDataSource(dbUrl, LANES + 2);
  const prefix = services.prefix('dispatch');
  const producer = new LifecycleProducer({ connection: services.redisUrl, prefix });
  const redis = new IORedis(services.redisUrl, { maxRetriesPerRequest: null });
  const config = loadConfig({ FLEET_PUBLIC_ENDPOINT_URL: PUBLIC, FLEET_PREFIX: prefix });
  try {
    // a quarter each: ready node_port fresh, ready node_port stale, ready cluster_dns, pending
    const ids = (
      await ds.query<Array<{ id: string }>>(
        `INSERT INTO deployments (id, name, state, version, endpoint_url, endpoint_kind, last_ready_at, state_changed_at)
         SELECT gen_random_uuid(), 'd-' || i, CASE WHEN i % 4 = 3 THEN 'pending' ELSE 'ready' END, 3,
                CASE WHEN i % 4 = 3 THEN NULL ELSE 'http://10.0.' || (i % 250) || '.1:' || (30000 + i) END,
                CASE i % 4 WHEN 0 THEN 'node_port' WHEN 1 THEN 'node_port' WHEN 2 THEN 'cluster_dns' END,
                CASE WHEN i % 4 = 1 THEN now() - interval '10 minutes' ELSE now() END, now()
           FROM generate_series(1, 1000) AS i
         RETURNING id`,
      )
    ).map((r) => r.id);
    const idAt = (i: number): string => ids[i % ids.length] ?? '';

    // in-process: the pure function over loaded rows, against the row read it needs
    const views: DeploymentView[] = [];
    for (const id of ids) {
      const view = await getDeployment(ds, id);
      if (view !== null) views.push(view);
    }
    const sources: Record<string, number> = {};
    const opts = { readyWindowS: config.readyWindowS, publicEndpointUrl: config.publicEndpointUrl };
    let calls = 0;
    const at = new Date();
    const started = now();
    while (now() - started < 500) {
      for (let i = 0; i < 10_000; i++) {
        const view = views[(calls + i) % views.length];
        if (view === undefined) continue;
        const answer = resolveEndpoint(view, at, opts);
        if (i < views.length && calls === 0) sources[`${answer.source}:${answer.reason}`] = (sources[`${answer.source}:${answer.reason}`] ?? 0) + 1;
      }
      calls += 10_000;
    }
    const resolveRate: Rate = { perSec: round(calls / ((now() - started) / 1000)), count: calls };
    const rowRead = await measure(options.httpRequests, options.maxSeconds, async (i) => {
      if ((await getDeployment(ds, idAt(i))) === null) throw new Error('row vanished');
    });
    log(`dispatch in-process: resolveEndpoint ${resolveRate.perSec}/s; row read ${rowRead.perSec}/s`);

    // inject: the real route, in this process, no socket
    const app = await buildHttpServer({
      config,
      dataSource: ds,
      producer,
      redis,
      queues: [producer.queue],
      metrics: new FleetMetrics({}, { defaultMetrics: false }),
      logger: silentLogger,
    });
    let inject: DispatchResult['inject'];
    try {
      await app.ready();
      const injectGet = async (url: string): Promise<void> => {
        const res = await app.inject({ method: 'GET', url });
        if (res.statusCode !== 200) throw new Error(`inject ${url}: ${res.statusCode}`);
      };
      await measure(200, options.maxSeconds, (i) => injectGet(`/api/deployments/${idAt(i)}/endpoint`)); // warm-up
      const endpoint = await measure(options.httpRequests, options.maxSeconds, (i) => injectGet(`/api/deployments/${idAt(i)}/endpoint`));
      const healthz = await measure(options.httpRequests, options.maxSeconds, () => injectGet('/healthz'));
      inject = { endpoint, baselineHealthz: healthz };
      log(`dispatch inject: endpoint ${endpoint.perSec}/s, /healthz ${healthz.perSec}/s`);
    } finally {
      await app.close();
    }

    // real HTTP, keep-alive, against `fleet http` in its own process
    const port = await freePort();
    const server = await MeasuredProcess.start({
      label: `${prefix}-http`,
      args: ['bin/fleet.js', 'http'],
      env: {
        REDIS_URL: services.redisUrl,
        DATABASE_URL: dbUrl,
        FLEET_PREFIX: prefix,
        FLEET_HTTP_PORT: String(port),
        FLEET_HTTP_HOST: '127.0.0.1',
        FLEET_PUBLIC_ENDPOINT_URL: PUBLIC,
        LOG_LEVEL: 'info',
      },
      ready: { kind: 'log', pattern: /http started/ },
    });
    const agent = new http.Agent({ keepAlive: true, maxSockets: LANES });
    let httpResult: DispatchResult['http'];
    try {
      await measure(200, options.maxSeconds, (i) => get(agent, port, `/api/deployments/${idAt(i)}/endpoint`)); // warm-up
      const endpoint = await measure(options.httpRequests, options.maxSeconds, (i) => get(agent, port, `/api/deployments/${idAt(i)}/endpoint`));
      const healthz = await measure(options.httpRequests, options.maxSeconds, () => get(agent, port, '/healthz'));
      httpResult = { endpoint, baselineHealthz: healthz };
      log(`dispatch http: endpoint ${endpoint.perSec}/s, /healthz ${healthz.perSec}/s`);
    } finally {
      agent.destroy();
      await server.stop();
    }
    return {
      deployments: ids.length,
      lanes: LANES,
      inProcess: { resolveEndpoint: resolveRate, baselineRowRead: rowRead },
      inject,
      http: httpResult,
      sources,
    };
  } finally {
    redis.disconnect();
    await producer.close();
    await ds.destroy();
  }
}
