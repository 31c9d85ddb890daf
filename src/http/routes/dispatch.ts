/** Dispatch over HTTP (docs/contract.md, "Dispatch"): the endpoint to hand out for a deployment now, and why. */
import type { FastifyPluginAsync } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import type { FleetConfig } from '../../config';
import type { FleetMetrics } from '../../metrics';
import { resolveEndpoint, resolvedEndpointSchema } from '../../services/dispatch/resolve-endpoint';
import { deploymentIdParamsSchema } from '../api-schemas';
import { answer, BAD_ID, NOT_FOUND, route, UNAVAILABLE } from '../route-options';
import { deploymentOr404, type DeploymentReads } from './deployments';

export interface DispatchRouteOptions extends DeploymentReads {
  readonly config: Pick<FleetConfig, 'readyWindowS' | 'publicEndpointUrl' | 'endpointAllow'>;
  readonly metrics: FleetMetrics;
  /** the clock dispatch judges freshness by */
  readonly now: () => Date;
}

export const dispatchRoutes: FastifyPluginAsync<DispatchRouteOptions> = async (app, options) => {
  const { config, metrics, now } = options;
  app.withTypeProvider<ZodTypeProvider>().get(
    '/api/deployments/:id/endpoint',
    route('read', {
      summary: 'Dispatch: the endpoint to hand out now',
      description: 'The private endpoint while it may be served, else the public fallback (`none` when unset), and why.',
      params: deploymentIdParamsSchema,
      response: { 200: answer('the endpoint', resolvedEndpointSchema), 400: BAD_ID, 404: NOT_FOUND, 503: UNAVAILABLE },
    }),
    async (request) => {
      const deployment = await deploymentOr404(options, request.params.id);
      const resolved = resolveEndpoint(deployment, now(), {
        readyWindowS: config.readyWindowS,
        publicEndpointUrl: config.publicEndpointUrl,
        endpointAllow: config.endpointAllow,
      });
      metrics.dispatched(resolved.source, resolved.reason);
      return resolved;
    },
  );
};
