/**
 * Dispatch (docs/architecture.md, "Heartbeats, orphans, deadlines, dispatch"): which endpoint to hand out for a deployment
 * right now. A pure function of the deployment, the time and the configuration; it reads no clock and does no I/O.
 *
 *   not ready                 -> public
 *   ready, cluster_dns        -> private, whatever the heartbeat (the cluster already drops unready pods)
 *   ready, node_port          -> private only while last_ready_at >= now - window (a null stamp is stale)
 *   ready, no endpoint        -> public
 *   "public" with FLEET_PUBLIC_ENDPOINT_URL unset -> source "none", url null
 *
 * `lastReadyAt` is whatever the caller read: the HTTP route passes the read model's view, which overlays a readiness
 * stamp still in the stamp buffer (read-model/views.ts), so a buffered stamp is served at once, not at the next flush.
 */
import { z } from 'zod';
import { servableEndpoint, type EndpointAllowList } from '../../events/endpoint-allow';
import type { DeploymentState, EndpointKind } from '../../machine';

/** Default readiness staleness window (FLEET_READY_WINDOW_S). */
export const DEFAULT_READY_WINDOW_S = 120;

/**
 * Why dispatch answered as it did. Stable codes: consumers and dashboards may match on them.
 * - `ready_heartbeat_fresh`: node_port endpoint whose readiness stamp is within the window (private)
 * - `cluster_dns`: cluster DNS endpoint, served regardless of the stamp (private)
 * - `not_ready`: the deployment is not `ready`
 * - `no_endpoint`: ready, but it has no private endpoint
 * - `no_heartbeat`: node_port endpoint never stamped (or the stamp is unreadable)
 * - `ready_heartbeat_stale`: node_port endpoint whose stamp is older than the window
 * - `endpoint_not_allowed`: the stored endpoint's host is outside FLEET_ENDPOINT_ALLOW (stored before the list was
 *   set or narrowed), or its URL breaks the endpoint URL rules (stored before issue 28): never handed to builds
 */
export const DISPATCH_REASONS = [
  'ready_heartbeat_fresh',
  'cluster_dns',
  'not_ready',
  'no_endpoint',
  'no_heartbeat',
  'ready_heartbeat_stale',
  'endpoint_not_allowed',
] as const;
export type DispatchReason = (typeof DISPATCH_REASONS)[number];

export const DISPATCH_SOURCES = ['private', 'public', 'none'] as const;
export type DispatchSource = (typeof DISPATCH_SOURCES)[number];

/** The answer (docs/contract.md, `GET /api/deployments/:id/endpoint`). `url` is null exactly when `source` is "none". */
export const resolvedEndpointSchema = z
  .object({
    url: z.string().nullable().describe('null exactly when `source` is "none"'),
    source: z.enum(DISPATCH_SOURCES),
    reason: z.enum(DISPATCH_REASONS),
  })
  .meta({ id: 'ResolvedEndpoint' });
export type ResolvedEndpoint = z.output<typeof resolvedEndpointSchema>;

interface DispatchCommon {
  readonly state: DeploymentState;
  /** the readiness stamp: a Date (entity, raw row) or an ISO string (read model); null when never stamped */
  readonly lastReadyAt: Date | string | null;
}

/**
 * What dispatch needs of a deployment, in either of the shapes the project already has: the read model's
 * `DeploymentView` (`endpoint: {url, kind} | null`) or the `Deployment` entity / a camel-cased row
 * (`endpointUrl`, `endpointKind`).
 */
export type DispatchInput =
  | (DispatchCommon & { readonly endpoint: { readonly url: string; readonly kind: EndpointKind } | null })
  | (DispatchCommon & { readonly endpointUrl: string | null; readonly endpointKind: EndpointKind | null });

export interface DispatchOptions {
  /** FLEET_READY_WINDOW_S (default 120): how old a node_port readiness stamp may be and still be served */
  readonly readyWindowS?: number;
  /** FLEET_PUBLIC_ENDPOINT_URL (default unset): the fallback; when unset the fallback is `source: "none"` */
  readonly publicEndpointUrl?: string | null;
  /** FLEET_ENDPOINT_ALLOW (default: any): a private endpoint outside it is not served */
  readonly endpointAllow?: EndpointAllowList | null;
}

export function resolveEndpoint(deployment: DispatchInput, now: Date, options: DispatchOptions = {}): ResolvedEndpoint {
  const fallback = (reason: DispatchReason): ResolvedEndpoint => {
    const url = options.publicEndpointUrl ?? null;
    return url === null ? { url: null, source: 'none', reason } : { url, source: 'public', reason };
  };

  if (deployment.state !== 'ready') return fallback('not_ready');
  const endpoint = endpointOf(deployment);
  if (endpoint === null) return fallback('no_endpoint');
  // the stored URL as a new one would be stored (normalised), or not at all
  const servable = servableEndpoint(endpoint.url, options.endpointAllow ?? null);
  if ('refused' in servable) return fallback('endpoint_not_allowed');
  if (endpoint.kind === 'cluster_dns') return { url: servable.url, source: 'private', reason: 'cluster_dns' };

  const stampedAt = timeOf(deployment.lastReadyAt);
  if (stampedAt === null) return fallback('no_heartbeat');
  const windowMs = (options.readyWindowS ?? DEFAULT_READY_WINDOW_S) * 1000;
  // At exactly the window's edge the stamp is still fresh (>=).
  if (stampedAt >= now.getTime() - windowMs) return { url: servable.url, source: 'private', reason: 'ready_heartbeat_fresh' };
  return fallback('ready_heartbeat_stale');
}

function endpointOf(d: DispatchInput): { url: string; kind: EndpointKind } | null {
  if ('endpoint' in d) return d.endpoint;
  return d.endpointUrl !== null && d.endpointKind !== null ? { url: d.endpointUrl, kind: d.endpointKind } : null;
}

function timeOf(value: Date | string | null): number | null {
  if (value === null) return null;
  const ms = value instanceof Date ? value.getTime() : Date.parse(value);
  return Number.isNaN(ms) ? null : ms;
}
