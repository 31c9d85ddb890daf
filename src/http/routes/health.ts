/** Liveness, readiness and metrics (docs/contract.md, "HTTP"): open, except /metrics with FLEET_METRICS_AUTH=read. */
import type { FastifyPluginAsync } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import type { DataSource } from 'typeorm';
import type { FleetConfig } from '../../config';
import { migrationsApplied } from '../../entities/schema/migrate';
import { ADMIN_SQL, Database } from '../../entities/sql';
import type { Logger } from '../../log';
import type { FleetMetrics } from '../../metrics';
import type { RedisConnection } from '../../redis/connection';
import { rejectAfter } from '../../util';
import { healthSchema, metricsTextSchema, readinessSchema } from '../api-schemas';
import { answer, route } from '../route-options';

export interface HealthRouteOptions {
  readonly config: Pick<FleetConfig, 'metricsAuth'>;
  readonly dataSource: DataSource;
  readonly redis: RedisConnection;
  readonly metrics: FleetMetrics;
  readonly logger: Logger;
}

export const healthRoutes: FastifyPluginAsync<HealthRouteOptions> = async (app, options) => {
  const api = app.withTypeProvider<ZodTypeProvider>();
  const db = new Database(options.dataSource);
  /** One check of /readyz: ok when it answers true within 2 s. */
  const check = async (name: string, fn: () => Promise<boolean>): Promise<'ok' | 'failing'> => {
    try {
      return (await rejectAfter(fn(), 2000, name)) ? 'ok' : 'failing';
    } catch (err) {
      // the details go to the log, not to an unauthenticated caller (they may name hosts or users)
      options.logger.warn({ err, check: name }, 'readiness check failed');
      return 'failing';
    }
  };

  api.get(
    '/healthz',
    route(null, { summary: 'Liveness', description: 'The process answers.', response: { 200: answer('alive', healthSchema) } }),
    async () => ({ status: 'ok' as const }),
  );
  api.get(
    '/readyz',
    route(null, {
      summary: 'Readiness',
      description: 'Redis and PostgreSQL answer within 2 s and the migrations are applied.',
      response: { 200: answer('ready', readinessSchema), 503: answer('not ready: `checks` says which failed', readinessSchema) },
    }),
    async (_request, reply) => {
      const [redis, postgres, migrations] = await Promise.all([
        check('redis', async () => (await options.redis.ping()) === 'PONG'),
        check('postgres', async () => (await db.run(ADMIN_SQL.ping)).rows.length === 1),
        check('migrations', () => migrationsApplied(options.dataSource)),
      ]);
      const checks = { redis, postgres, migrations };
      const ok = Object.values(checks).every((v) => v === 'ok');
      return reply.status(ok ? 200 : 503).send({ status: ok ? 'ok' : 'unavailable', checks });
    },
  );
  api.get(
    '/metrics',
    route(options.config.metricsAuth === 'read' ? 'read' : null, {
      summary: 'Prometheus metrics',
      description: 'The text exposition format. Needs `read` when FLEET_METRICS_AUTH=read.',
      response: { 200: { description: 'the metrics', content: { 'text/plain': { schema: metricsTextSchema } } } },
    }),
    async (_request, reply) => reply.type(options.metrics.contentType).send(await options.metrics.text()),
  );
};
