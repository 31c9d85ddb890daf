import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { Deployment } from '../../src/entities';
import type { DeploymentState, EndpointKind } from '../../src/machine';
import { resolveEndpoint, type DispatchInput, type DispatchOptions } from '../../src/services/dispatch/resolve-endpoint';
import { getDeployment } from '../../src/services/read-model/views';
import { TransitionService } from '../../src/services/transitions';
import { ManualClock } from '../helpers/clock';
import { openTestDatabase, type TestDatabase } from '../helpers/db';

const NOW = new Date('2030-01-01T12:00:00.000Z');
const PUBLIC = 'https://public.example.com';
// as stored: endpoint URLs are stored (and served) as WHATWG URL normalises them
const PRIVATE = 'http://10.0.0.7:30080/';
const WINDOW_S = 120;
const options: DispatchOptions = { readyWindowS: WINDOW_S, publicEndpointUrl: PUBLIC };

const ago = (seconds: number, ms = 0): Date => new Date(NOW.getTime() - seconds * 1000 - ms);

function deployment(state: DeploymentState, kind: EndpointKind | null, lastReadyAt: Date | string | null): DispatchInput {
  return { state, endpoint: kind === null ? null : { url: PRIVATE, kind }, lastReadyAt };
}

describe('dispatch: resolveEndpoint', () => {
  it('serves the private endpoint of a ready node_port deployment while its stamp is fresh', () => {
    expect(resolveEndpoint(deployment('ready', 'node_port', ago(5)), NOW, options)).to.deep.equal({
      url: PRIVATE,
      source: 'private',
      reason: 'ready_heartbeat_fresh',
    });
  });

  it('is fresh at exactly the window edge and stale one millisecond past it', () => {
    expect(resolveEndpoint(deployment('ready', 'node_port', ago(WINDOW_S)), NOW, options)).to.deep.equal({
      url: PRIVATE,
      source: 'private',
      reason: 'ready_heartbeat_fresh',
    });
    expect(resolveEndpoint(deployment('ready', 'node_port', ago(WINDOW_S, 1)), NOW, options)).to.deep.equal({
      url: PUBLIC,
      source: 'public',
      reason: 'ready_heartbeat_stale',
    });
  });

  it('treats a missing stamp as stale', () => {
    expect(resolveEndpoint(deployment('ready', 'node_port', null), NOW, options)).to.deep.equal({
      url: PUBLIC,
      source: 'public',
      reason: 'no_heartbeat',
    });
  });

  it('serves a cluster_dns endpoint whatever its stamp: ancient, missing or fresh', () => {
    for (const stamp of [new Date(0), null, ago(1)]) {
      expect(resolveEndpoint(deployment('ready', 'cluster_dns', stamp), NOW, options)).to.deep.equal({
        url: PRIVATE,
        source: 'private',
        reason: 'cluster_dns',
      });
    }
  });

  it('serves public for every state but ready, even with a fresh stamp or cluster DNS', () => {
    for (const state of ['pending', 'deploying', 'failed', 'unknown'] as const) {
      for (const kind of ['node_port', 'cluster_dns'] as const) {
        expect(resolveEndpoint(deployment(state, kind, NOW), NOW, options), `${state}/${kind}`).to.deep.equal({
          url: PUBLIC,
          source: 'public',
          reason: 'not_ready',
        });
      }
    }
  });

  it('serves public for a ready deployment without an endpoint', () => {
    expect(resolveEndpoint(deployment('ready', null, NOW), NOW, options)).to.deep.equal({
      url: PUBLIC,
      source: 'public',
      reason: 'no_endpoint',
    });
  });

  it('answers source "none" with a null url wherever it would fall back and no public URL is configured', () => {
    const cases: Array<[DispatchInput, string]> = [
      [deployment('pending', 'node_port', NOW), 'not_ready'],
      [deployment('ready', null, NOW), 'no_endpoint'],
      [deployment('ready', 'node_port', null), 'no_heartbeat'],
      [deployment('ready', 'node_port', ago(WINDOW_S + 1)), 'ready_heartbeat_stale'],
    ];
    for (const [input, reason] of cases) {
      for (const opts of [{ readyWindowS: WINDOW_S }, { readyWindowS: WINDOW_S, publicEndpointUrl: null }]) {
        expect(resolveEndpoint(input, NOW, opts)).to.deep.equal({ url: null, source: 'none', reason });
      }
    }
    // private answers do not need the fallback
    expect(resolveEndpoint(deployment('ready', 'node_port', NOW), NOW, {}).source).to.equal('private');
  });

  it('defaults to a 120 s window and accepts ISO strings, the entity shape, and stamps in the future', () => {
    expect(resolveEndpoint(deployment('ready', 'node_port', ago(120).toISOString()), NOW).reason).to.equal('ready_heartbeat_fresh');
    expect(resolveEndpoint(deployment('ready', 'node_port', ago(121).toISOString()), NOW).reason).to.equal('ready_heartbeat_stale');
    expect(resolveEndpoint(deployment('ready', 'node_port', 'not a date'), NOW).reason).to.equal('no_heartbeat');
    expect(resolveEndpoint(deployment('ready', 'node_port', new Date(NOW.getTime() + 5000)), NOW).reason).to.equal('ready_heartbeat_fresh');
    const entityShape: DispatchInput = { state: 'ready', endpointUrl: PRIVATE, endpointKind: 'node_port', lastReadyAt: ago(10) };
    expect(resolveEndpoint(entityShape, NOW, { readyWindowS: 5, publicEndpointUrl: PUBLIC })).to.deep.equal({
      url: PUBLIC,
      source: 'public',
      reason: 'ready_heartbeat_stale',
    });
    expect(resolveEndpoint({ ...entityShape, endpointUrl: null, endpointKind: null }, NOW, options).reason).to.equal('no_endpoint');
  });

  describe('with rows from PostgreSQL', () => {
    let db: TestDatabase;
    before(async () => {
      db = await openTestDatabase(4);
    });
    after(async () => {
      await db?.close();
    });

    it('resolves the read model and the entity the same way, around the edge of the window', async () => {
      const t0 = new Date('2030-01-01T00:00:00.000Z');
      const clock = new ManualClock(t0);
      const service = new TransitionService({ dataSource: db.dataSource, now: clock.now });
      const deploymentId = randomUUID();
      const attemptId = randomUUID();
      const apply = (name: string, data: Record<string, unknown>) => service.apply(name, { ...data, eventId: `${name}-${randomUUID()}` });
      await apply('deployment.create', { deploymentId, name: 'web' });
      await apply('attempt.create', { deploymentId, attemptId });
      await apply('attempt.start', { deploymentId, attemptId });
      const endpoint = { url: 'http://127.0.0.1:30080', kind: 'node_port' };
      await apply('attempt.end', { deploymentId, attemptId, outcome: 'succeeded', endpoint }); // stamps at t0

      const view = await getDeployment(db.dataSource, deploymentId);
      const entity = await db.dataSource.getRepository(Deployment).findOneByOrFail({ id: deploymentId });
      expect(view?.lastReadyAt).to.equal(t0.toISOString());
      if (view === null) throw new Error('unreachable');
      for (const [seconds, source] of [
        [0, 'private'],
        [WINDOW_S, 'private'],
        [WINDOW_S + 0.001, 'public'],
      ] as const) {
        const now = clock.at(t0, seconds);
        expect(resolveEndpoint(view, now, options).source, `view at +${seconds}s`).to.equal(source);
        expect(resolveEndpoint(entity, now, options).source, `entity at +${seconds}s`).to.equal(source);
      }
    });
  });
});
