/** Setup straight through the transition service (no queue): events that must apply, and a running attempt. */
import { randomUUID } from 'node:crypto';
import type { TransitionService } from '../../src/services/transitions';

/**
 * Applies an event with a fresh free-form eventId (`<name>.<random UUID>` is a derived id naming another subject,
 * which events that happen once per subject may not carry); throws unless it was applied.
 */
export async function applied(service: TransitionService, name: string, data: Record<string, unknown>) {
  const result = await service.apply(name, { ...data, eventId: `${name}-${randomUUID()}` });
  if (result.outcome !== 'applied') throw new Error(`${name}: ${JSON.stringify(result)}`);
  return result;
}

/** A new deployment whose attempt is running, started at the service's clock. */
export async function runningAttempt(service: TransitionService): Promise<{ deploymentId: string; attemptId: string }> {
  const ids = { deploymentId: randomUUID(), attemptId: randomUUID() };
  await applied(service, 'deployment.create', { deploymentId: ids.deploymentId, name: 'web' });
  await applied(service, 'attempt.create', ids);
  await applied(service, 'attempt.start', ids);
  return ids;
}

/** each deployment's attempt that `applyVersions` created last (random ids: one map serves every test) */
const openAttempts = new Map<string, string>();

/**
 * Applies versions `from`..`to` of a deployment, one transition each: v1 creates it, then an even version creates an
 * attempt and an odd one cancels it. Calls may continue one another (1-2, then 3-4, ...).
 */
export async function applyVersions(service: TransitionService, deploymentId: string, from: number, to: number): Promise<void> {
  for (let v = from; v <= to; v++) {
    if (v === 1) {
      await applied(service, 'deployment.create', { deploymentId, name: 'web' });
    } else if (v % 2 === 0) {
      const attemptId = randomUUID();
      openAttempts.set(deploymentId, attemptId);
      await applied(service, 'attempt.create', { deploymentId, attemptId });
    } else {
      await applied(service, 'attempt.cancel', { deploymentId, attemptId: openAttempts.get(deploymentId) });
    }
  }
}
