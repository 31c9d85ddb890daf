/**
 * Reads for operators and other services: deployments with their current attempt, attempts, history. The
 * statements and the entity-typed records they return are in src/entities/sql/read.ts; this turns records into
 * the API's JSON views (ISO timestamps, the endpoint as one object, history in the stream's field names). Each view
 * is a zod schema, its type derived from it: the HTTP API's OpenAPI document (/openapi.json) is generated from them.
 *
 * With a stamp buffer, a deployment's `lastReadyAt` and its current attempt's `lastHeartbeatAt` are the later of
 * PostgreSQL's and the buffered one (one Redis round trip per read), so a stamp is visible, and dispatch serves it,
 * as soon as it is absorbed rather than at the next flush. Only what the flush would write is overlaid: readiness
 * on a `ready` deployment, a heartbeat on a `running` attempt. When Redis does not answer within the buffer's
 * `readTimeoutMs`, the read answers from PostgreSQL alone (logged at debug): a stamp then looks as old as its last
 * flush, which errs towards the public endpoint, never towards serving an endpoint nobody saw ready.
 */
import type { DataSource } from 'typeorm';
import { z } from 'zod';
import {
  Database,
  findAttempts,
  findDeployment,
  findDeployments,
  findTransitions,
  type AttemptRecord,
  type DeploymentWithAttempt,
  type StateTransitionRecord,
} from '../../entities/sql';
import type { Logger } from '../../log';
import { ATTEMPT_STATUSES, DEPLOYMENT_STATES, ENDPOINT_KINDS, type DeploymentState } from '../../machine';
import type { StampBuffer } from '../stamps';

/** How a read sees stamps not yet flushed (default: PostgreSQL's alone). */
export interface StampReadOptions {
  /** the process's stamp buffer: overlay its buffered stamps */
  readonly stampBuffer?: StampBuffer | null;
  /** where a failed overlay is logged (debug) */
  readonly logger?: Logger;
}

const isoTime = z.iso.datetime();

/** An attempt as the API shows it (`GET /api/deployments/:id/attempts`, a deployment's `currentAttempt`). */
export const attemptViewSchema = z
  .object({
    id: z.uuid(),
    number: z.number().int().min(1).describe("1 for a deployment's first attempt"),
    status: z.enum(ATTEMPT_STATUSES),
    startedAt: isoTime.nullable(),
    endedAt: isoTime.nullable(),
    lastHeartbeatAt: isoTime.nullable(),
    reason: z.string().nullable(),
  })
  .meta({ id: 'Attempt' });
export type AttemptView = z.output<typeof attemptViewSchema>;

/** A deployment with its current attempt (`GET /api/deployments/:id`, the items of a page). */
export const deploymentViewSchema = z
  .object({
    id: z.uuid(),
    name: z.string(),
    state: z.enum(DEPLOYMENT_STATES),
    version: z.number().int().min(1).describe('one more with every transition'),
    endpoint: z.object({ url: z.string(), kind: z.enum(ENDPOINT_KINDS) }).nullable(),
    lastReadyAt: isoTime.nullable(),
    stateChangedAt: isoTime,
    createdAt: isoTime,
    updatedAt: isoTime,
    currentAttempt: attemptViewSchema.nullable(),
  })
  .meta({ id: 'Deployment' });
export type DeploymentView = z.output<typeof deploymentViewSchema>;

/** One transition of a deployment's history, in the stream entry's field names. */
export const transitionViewSchema = z
  .object({
    transitionId: z.string().regex(/^\d+$/).describe("the transition's id: a whole number, as a string (a bigint)"),
    attemptId: z.uuid().nullable(),
    from: z.enum(DEPLOYMENT_STATES).nullable(),
    to: z.enum(DEPLOYMENT_STATES),
    version: z.number().int().min(1),
    reason: z.string(),
    eventId: z.string(),
    actor: z.string().describe("who caused it: an API token's name, `sweep`, or the producer's `actor`"),
    at: isoTime,
  })
  .meta({ id: 'Transition' });
export type TransitionView = z.output<typeof transitionViewSchema>;

const iso = (d: Date | null): string | null => (d === null ? null : d.toISOString());

function attemptView(a: AttemptRecord): AttemptView {
  return {
    id: a.id,
    number: a.number,
    status: a.status,
    startedAt: iso(a.startedAt),
    endedAt: iso(a.endedAt),
    lastHeartbeatAt: iso(a.lastHeartbeatAt),
    reason: a.reason,
  };
}

function deploymentView({ deployment: d, currentAttempt }: DeploymentWithAttempt): DeploymentView {
  return {
    id: d.id,
    name: d.name,
    state: d.state,
    version: d.version,
    endpoint: d.endpointUrl !== null && d.endpointKind !== null ? { url: d.endpointUrl, kind: d.endpointKind } : null,
    lastReadyAt: iso(d.lastReadyAt),
    stateChangedAt: d.stateChangedAt.toISOString(),
    createdAt: d.createdAt.toISOString(),
    updatedAt: d.updatedAt.toISOString(),
    currentAttempt: currentAttempt === null ? null : attemptView(currentAttempt),
  };
}

function transitionView(t: StateTransitionRecord): TransitionView {
  return {
    transitionId: t.id,
    attemptId: t.attemptId,
    from: t.fromState,
    to: t.toState,
    version: t.version,
    reason: t.reason,
    eventId: t.eventId,
    actor: t.actor,
    at: t.createdAt.toISOString(),
  };
}

/** The later of two ISO stamps (or a Date from the buffer), null when neither. */
function later(stored: string | null, buffered: Date | undefined): string | null {
  if (buffered === undefined) return stored;
  return stored !== null && Date.parse(stored) >= buffered.getTime() ? stored : buffered.toISOString();
}

/** Overlays buffered stamps on deployment views: one Redis round trip, or none when Redis does not answer. */
async function withBufferedStamps(views: DeploymentView[], options: StampReadOptions): Promise<DeploymentView[]> {
  const buffer = options.stampBuffer;
  if (buffer == null || views.length === 0) return views;
  const ready = views.filter((v) => v.state === 'ready').map((v) => v.id);
  const running = views.flatMap((v) => (v.currentAttempt?.status === 'running' ? [{ attemptId: v.currentAttempt.id, deploymentId: v.id }] : []));
  if (ready.length === 0 && running.length === 0) return views;
  let latest: Awaited<ReturnType<StampBuffer['latest']>>;
  try {
    latest = await buffer.latest({ readiness: ready, heartbeats: running });
  } catch (err) {
    options.logger?.debug({ err }, 'buffered stamps unreadable: answering with the stamps in PostgreSQL');
    return views;
  }
  return views.map((v) => ({
    ...v,
    lastReadyAt: v.state === 'ready' ? later(v.lastReadyAt, latest.readiness.get(v.id)) : v.lastReadyAt,
    currentAttempt:
      v.currentAttempt?.status === 'running'
        ? { ...v.currentAttempt, lastHeartbeatAt: later(v.currentAttempt.lastHeartbeatAt, latest.heartbeats.get(v.currentAttempt.id)) }
        : v.currentAttempt,
  }));
}

export async function getDeployment(ds: DataSource, id: string, options: StampReadOptions = {}): Promise<DeploymentView | null> {
  const found = await findDeployment(new Database(ds), id);
  if (found === null) return null;
  const [view] = await withBufferedStamps([deploymentView(found)], options);
  return view ?? null;
}

/** A page of deployments (`GET /api/deployments`). */
export const deploymentPageSchema = z
  .object({
    items: z.array(deploymentViewSchema),
    nextCursor: z.uuid().nullable().describe('pass as `cursor` for the next page; null on the last page'),
  })
  .meta({ id: 'DeploymentPage' });
export type DeploymentPage = z.output<typeof deploymentPageSchema>;

/** A page of deployments in id order (keyset paging: stable under concurrent inserts), optionally by state. */
export async function listDeployments(
  ds: DataSource,
  options: { state?: DeploymentState | undefined; limit: number; after?: string | undefined } & StampReadOptions,
): Promise<DeploymentPage> {
  const found = await findDeployments(new Database(ds), options);
  const items = await withBufferedStamps(found.slice(0, options.limit).map(deploymentView), options);
  return { items, nextCursor: found.length > options.limit ? (items[items.length - 1]?.id ?? null) : null };
}

export async function listAttempts(ds: DataSource, deploymentId: string): Promise<AttemptView[]> {
  return (await findAttempts(new Database(ds), deploymentId)).map(attemptView);
}

/** History after `afterVersion` in version order, at most `limit` rows. */
export async function listTransitions(ds: DataSource, deploymentId: string, afterVersion = 0, limit = 100): Promise<TransitionView[]> {
  return (await findTransitions(new Database(ds), deploymentId, afterVersion, limit)).map(transitionView);
}
