/**
 * Which partition of the transition stream a deployment's entries go to (docs/contract.md, "The transition stream",
 * Partitions). Pure; written out in the contract so that a consumer in another language computes the same.
 */

/** The most partitions a fleet's stream may have (`FLEET_STREAM_PARTITIONS`). */
export const MAX_STREAM_PARTITIONS = 1024;

const FNV_OFFSET = 0x811c9dc5;
const FNV_PRIME = 0x01000193;

/** FNV-1a, 32 bits, over bytes. */
export function fnv1a32(bytes: Uint8Array): number {
  let hash = FNV_OFFSET;
  for (const byte of bytes) hash = Math.imul(hash ^ byte, FNV_PRIME) >>> 0;
  return hash;
}

const utf8 = new TextEncoder();

/**
 * The partition of a deployment's entries: FNV-1a 32-bit over the UTF-8 bytes of the lower-case deploymentId,
 * modulo `partitions`.
 */
export function partitionOf(deploymentId: string, partitions: number): number {
  if (!Number.isInteger(partitions) || partitions < 1) throw new RangeError(`partitions: must be a whole number of at least 1, got ${partitions}`);
  return fnv1a32(utf8.encode(deploymentId.toLowerCase())) % partitions;
}
