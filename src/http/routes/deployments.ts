/**
 * The read API (docs/contract.md, "HTTP"): deployments, their attempts and their transitions. Reads see the stamps
 * the process's stamp buffer holds and PostgreSQL does not yet.
 */
import type { FastifyPluginAsync } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import type { DataSource } from 'typeorm';
import { Database, deploymentExists } from '../../entities/sql';
import {
  deploymentPageSchema,
  deploymentViewSchema,
  getDeployment,
  listAttempts,
  listDeployments,
  listTransitions,
  type DeploymentView,
  type StampReadOptions,
} from '../../services/read-model/views';
import { attemptListSchema, deploymentIdParamsSchema, deploymentListQuerySchema, transitionPageSchema, transitionQuerySchema } from '../api-schemas';
import { HttpError } from '../http-error';
import { answer, BAD_ID, failure, NOT_FOUND, route, UNAVAILABLE } from '../route-options';

export interface DeploymentReads {
  readonly dataSource: DataSource;
  /** how reads see stamps not yet flushed */
  readonly stamps: StampReadOptions;
}

/** The deployment, or `404 not_found`. */
export async function deploymentOr404(reads: DeploymentReads, id: string): Promise<DeploymentView> {
  const deployment = await getDeployment(reads.dataSource, id, reads.stamps);
  if (deployment === null) throw new HttpError(404, 'not_found', `deployment ${id} not found`);
  return deployment;
}

export const deploymentRoutes: FastifyPluginAsync<DeploymentReads> = async (app, reads) => {
  const api = app.withTypeProvider<ZodTypeProvider>();
  const ds = reads.dataSource;
  const db = new Database(ds);
  const requireDeployment = async (id: string): Promise<void> => {
    if (!(await deploymentExists(db, id))) throw new HttpError(404, 'not_found', `deployment ${id} not found`);
  };

  api.get(
    '/api/deployments/:id',
    route('read', {
      summary: 'A deployment with its current attempt',
      description: 'Timestamps the stamp buffer holds and PostgreSQL does not yet are included.',
      params: deploymentIdParamsSchema,
      response: { 200: answer('the deployment', deploymentViewSchema), 400: BAD_ID, 404: NOT_FOUND, 503: UNAVAILABLE },
    }),
    async (request) => deploymentOr404(reads, request.params.id),
  );

  api.get(
    '/api/deployments',
    route('read', {
      summary: 'A page of deployments',
      description: 'In id order (stable while deployments are created); follow `nextCursor` for the next page.',
      querystring: deploymentListQuerySchema,
      response: {
        200: answer('a page', deploymentPageSchema),
        400: failure('invalid_query: names the first offending parameter and its rule'),
        503: UNAVAILABLE,
      },
    }),
    async (request) => {
      const { state, limit, cursor } = request.query;
      return listDeployments(ds, { state, limit, after: cursor, ...reads.stamps });
    },
  );

  api.get(
    '/api/deployments/:id/attempts',
    route('read', {
      summary: "A deployment's attempts",
      description: 'Every attempt of the deployment, newest first.',
      params: deploymentIdParamsSchema,
      response: { 200: answer('the attempts', attemptListSchema), 400: BAD_ID, 404: NOT_FOUND, 503: UNAVAILABLE },
    }),
    async (request) => {
      const { id } = request.params;
      await requireDeployment(id);
      return { items: await listAttempts(ds, id) };
    },
  );

  api.get(
    '/api/deployments/:id/transitions',
    route('read', {
      summary: "A deployment's transitions",
      description: "History after `afterVersion`, in version order: for consumers that fell behind the stream's retention.",
      params: deploymentIdParamsSchema,
      querystring: transitionQuerySchema,
      response: {
        200: answer('a page of history', transitionPageSchema),
        400: failure('invalid_id or invalid_query: names the offending parameter and its rule'),
        404: NOT_FOUND,
        503: UNAVAILABLE,
      },
    }),
    async (request) => {
      const { id } = request.params;
      const { afterVersion, limit } = request.query;
      await requireDeployment(id);
      const items = await listTransitions(ds, id, afterVersion, limit);
      const last = items[items.length - 1];
      return { items, nextAfterVersion: items.length === limit && last !== undefined ? last.version : null };
    },
  );
};
