/**
 * Where the stamp buffer keeps its stamps, and how a stamp's member is written (docs/architecture.md, "Heartbeats
 * between flushes").
 *
 * Keys live under the BullMQ prefix (`<prefix>:{stamps}:...`, so a Redis user confined to `<prefix>:*` reaches them),
 * and share one hash tag: the prefix's when it has one (Redis hashes on the first `{...}`; a cluster requires one), else
 * `{stamps}`. Either way they sit in one slot, with every other key of the prefix when it has a tag.
 */
import { UUID_PATTERN } from '../../util';

/** The two kinds of stamp. */
export type Kind = 'heartbeat' | 'readiness';

/** The Redis keys of a prefix's stamp buffer: each kind's absorbing set, the set a flush took, and the flush lock. */
export function stampKeys(prefix: string): {
  readonly heartbeat: string;
  readonly readiness: string;
  readonly heartbeatFlushing: string;
  readonly readinessFlushing: string;
  readonly lock: string;
} {
  return {
    heartbeat: `${prefix}:{stamps}:heartbeat`,
    readiness: `${prefix}:{stamps}:readiness`,
    heartbeatFlushing: `${prefix}:{stamps}:heartbeat:flushing`,
    readinessFlushing: `${prefix}:{stamps}:readiness:flushing`,
    lock: `${prefix}:{stamps}:flush-lock`,
  };
}

/** A heartbeat's member: both ids, because the write checks that the attempt belongs to the deployment. */
export function heartbeatMember(attemptId: string, deploymentId: string): string {
  return `${attemptId}:${deploymentId}`;
}

export function parseHeartbeatMember(member: string): { attemptId: string; deploymentId: string } | null {
  const [attemptId, deploymentId, ...rest] = member.split(':');
  if (attemptId === undefined || deploymentId === undefined || rest.length > 0) return null;
  return isUuid(attemptId) && isUuid(deploymentId) ? { attemptId, deploymentId } : null;
}

/** Members come from validated events, but the key is Redis's: one bad member must not fail a whole batch's cast. */
export const isUuid = (s: string): boolean => UUID_PATTERN.test(s);

export type StampKeys = ReturnType<typeof stampKeys>;
