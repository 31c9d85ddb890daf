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
