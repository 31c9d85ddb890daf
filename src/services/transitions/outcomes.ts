/**
 * What applying an event can come to, and the pure pieces around a decision: the machine's view of an event, and
 * how an eventId claimed by another event reads.
 */
import { payloadDigest, type LifecycleEvent } from '../../events/schemas';
import type { DeploymentState, NoopReason, RejectionCode } from '../../machine';

/**
 * Outcomes of heartbeat and readiness stamps, which change no state. `buffered`: absorbed by the stamp buffer, to
 * be written (or dropped as not running / not ready / not found) by its next flush.
 */
export type StampNoopReason = 'stamped' | 'buffered' | 'not_running' | 'not_ready' | 'not_found';

export type ApplyResult =
  | {
      readonly outcome: 'applied';
      readonly eventId: string;
      readonly deploymentId: string;
      readonly attemptId: string | null;
      readonly from: DeploymentState | null;
      readonly to: DeploymentState;
      readonly version: number;
      readonly reason: string;
      readonly transitionId: string;
    }
  | {
      readonly outcome: 'noop';
      readonly eventId: string;
      readonly deploymentId: string;
      readonly reason: NoopReason | StampNoopReason | 'duplicate_event';
      /** for `duplicate_event`: what the first delivery of this eventId did */
      readonly previous?: { readonly outcome: string; readonly reason: string; readonly version: number | null };
    }
  | {
      readonly outcome: 'rejected';
      readonly eventId: string;
      readonly deploymentId: string;
      readonly code: RejectionCode;
      readonly message: string;
    };

// The events the machine decides on, and its view of one: derived from the event catalog (src/events/catalog.ts).
export { toMachineEvent, type StateEvent } from '../../events/schemas';

/**
 * A processed row is this event when name, deployment and payload agree (rows from before the digest: name and
 * deployment). Rows from before issue 28 hashed the endpoint URL as sent, not normalised: the same event sent again,
 * as sent then, has that digest as its `digestAsSent`.
 */
export function sameEvent(event: LifecycleEvent, name: string, deploymentId: string | null, digest: string | null): boolean {
  const samePayload = digest === null || digest === payloadDigest(event.data) || digest === event.digestAsSent;
  return name === event.name && deploymentId === event.data.deploymentId && samePayload;
}

/** What an earlier delivery of the event did (its `processed_events` row), for `duplicate_event`'s `previous`. */
export interface PreviousProcessing {
  readonly outcome: string;
  readonly reason: string;
  readonly version: number | null;
}

/** Another delivery of this event was processed first: the noop `duplicate_event`, saying what that one did. */
export function duplicateOf(event: LifecycleEvent, previous: PreviousProcessing): ApplyResult {
  return {
    eventId: event.eventId,
    deploymentId: event.data.deploymentId,
    outcome: 'noop',
    reason: 'duplicate_event',
    previous: { outcome: previous.outcome, reason: previous.reason, version: previous.version },
  };
}

/**
 * The eventId was processed before as another event: another name, another deployment, or another payload. Not a
 * duplicate (that would drop this event silently): refused, so the producer learns to send it with an id of its own.
 */
export function eventIdConflict(event: LifecycleEvent, claimedBy: string, claimedFor: string | null): ApplyResult {
  const other =
    claimedBy !== event.name
      ? `a ${claimedBy} event`
      : claimedFor !== event.data.deploymentId
        ? `a ${claimedBy} event of deployment ${claimedFor ?? '?'}`
        : `a ${claimedBy} event with another payload`;
  return {
    outcome: 'rejected',
    eventId: event.eventId,
    deploymentId: event.data.deploymentId,
    code: 'event_id_conflict',
    message: `eventId "${event.eventId}" was already used by ${other}; send this event with an eventId of its own`,
  };
}
