/**
 * The HTTP server as the tests build it: the real `buildHttpServer` over a test's database, producer and Redis,
 * with quiet logs and its own metrics registry. `env` adds configuration; `overrides` replaces dependencies.
 */
import type { Queue } from 'bullmq';
import type { FastifyInstance } from 'fastify';
import type { RedisConnection } from '../../src/redis/connection';
import type { DataSource } from 'typeorm';
import { loadConfig } from '../../src/config';
import { buildHttpServer, type HttpDeps } from '../../src/http/server';
import { silentLogger } from '../../src/log';
import { FleetMetrics } from '../../src/metrics';
import type { LifecycleProducer } from '../../src/queues/producer';

export interface TestHttpParts {
  readonly prefix: string;
  readonly dataSource: DataSource;
  readonly producer: LifecycleProducer;
  readonly redis: RedisConnection;
  readonly maintenance: Queue;
}

export function testHttpServer(parts: TestHttpParts, env: Record<string, string> = {}, overrides: Partial<HttpDeps> = {}): Promise<FastifyInstance> {
  return buildHttpServer({
    config: loadConfig({ FLEET_PREFIX: parts.prefix, ...env }),
    dataSource: parts.dataSource,
    producer: parts.producer,
    redis: parts.redis,
    queues: [parts.producer.queue, parts.maintenance],
    metrics: new FleetMetrics({}, { defaultMetrics: false }),
    logger: silentLogger,
    ...overrides,
  });
}

/**
 * The routes Fastify has, as `METHOD /path/{param}`, read from its own route tree (`printRoutes`, one segment per
 * line, indented by depth). HEAD routes are Fastify's own twins of the GETs.
 */
export function routesOf(app: FastifyInstance): string[] {
  const stack: string[] = [];
  const routes: string[] = [];
  for (const line of app.printRoutes({ commonPrefix: false }).split('\n')) {
    const match = /^([│ ]*)[├└]── (.*?)(?: \(([A-Z, ]+)\))?$/.exec(line);
    if (match === null) continue;
    const depth = (match[1] ?? '').length / 4;
    stack.length = depth;
    const full = (stack[depth - 1] ?? '') + (match[2] ?? '');
    stack.push(full);
    for (const method of (match[3] ?? '').split(', ').filter((m) => m !== '' && m !== 'HEAD')) {
      routes.push(`${method} ${full.replace(/:([A-Za-z0-9_]+)/g, '{$1}')}`);
    }
  }
  return routes;
}
