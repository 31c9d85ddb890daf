/**
 * The transition stream's partitions (docs/contract.md, "The transition stream", Partitions): which partition a
 * deployment's entries go to (`partitionOf`), each partition's key, and where the fleet records how many there are.
 * Pure, except `recordPartitions` and `readPartitions`, which write and read the record.
 */
import { ConfigError } from '../errors';
import type { RedisConnection } from '../queues/redis';
import { MAX_STREAM_PARTITIONS } from '../util/partition-of';
import { prefixHashTag } from '../util/redis-url';

export { fnv1a32, MAX_STREAM_PARTITIONS, partitionOf } from '../util/partition-of';

/**
 * The stream key of partition `n` of `partitions`, from the base key `<prefix>:transitions`:
 * - one partition: the base key itself (the stream of a fleet before partitions);
 * - a base key without a hash tag: `<base>:<n>`, e.g. `fleet:transitions:3`;
 * - a base key with a hash tag (a Redis Cluster's prefix, `{fleet}:transitions`): the tag becomes the partition's own,
 *   `{fleet:p3}:transitions:3`, so that partitions spread over the cluster's masters. What must share a slot does:
 *   a partition's stream and its consumers' lease keys (`<partition key>:lease:<group>`, checked and acted on in one
 *   script); the relay appends to each partition with a script of its own.
 */
export function partitionKey(baseKey: string, n: number, partitions: number): string {
  if (partitions === 1) return baseKey;
  const tag = prefixHashTag(baseKey);
  if (tag === null) return `${baseKey}:${n}`;
  return `${baseKey.replace(`{${tag}}`, `{${tag}:p${n}}`)}:${n}`;
}

/** Every partition's stream key, in partition order. */
export function partitionKeys(baseKey: string, partitions: number): string[] {
  return Array.from({ length: partitions }, (_, n) => partitionKey(baseKey, n, partitions));
}

/** Where the fleet records its number of partitions: `<prefix>:transitions:partitions` (in the prefix's slot). */
export function partitionsRecordKey(baseKey: string): string {
  return `${baseKey}:partitions`;
}

/**
 * Records P if nothing is recorded, and returns what is recorded. A fleet that ran before partitions existed has
 * entries at the base key and no record: that counts as 1. (An empty stream there is a consumer's group waiting for
 * a fleet that has not started yet: it moves to the partitions once they are recorded.)
 */
const RECORD_PARTITIONS = `
local recorded = redis.call('GET', KEYS[1])
if not recorded then
  if redis.call('XLEN', KEYS[2]) > 0 and ARGV[1] ~= '1' then return '1' end
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return recorded
`;

/**
 * Records the configured number of partitions where consumers read it, or refuses (ConfigError, naming both values)
 * when the fleet's stream was written with another number: changing it on a live fleet needs a procedure that is not
 * available yet.
 */
export async function recordPartitions(redis: RedisConnection, baseKey: string, partitions: number): Promise<void> {
  const recorded = String(await redis.eval(RECORD_PARTITIONS, 2, partitionsRecordKey(baseKey), baseKey, String(partitions)));
  if (recorded !== String(partitions)) {
    throw new ConfigError([
      `FLEET_STREAM_PARTITIONS: this fleet's stream ${baseKey} is written with ${recorded} partition(s) (recorded at ${partitionsRecordKey(baseKey)}), but ${partitions} are configured; changing the number of partitions of a live fleet is not supported yet: set FLEET_STREAM_PARTITIONS=${recorded}`,
    ]);
  }
}

/** The recorded number of partitions (1 when nothing is recorded: a fleet from before partitions). */
export async function readPartitions(redis: RedisConnection, baseKey: string): Promise<number> {
  const raw = await redis.get(partitionsRecordKey(baseKey));
  if (raw === null) return 1;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1 || n > MAX_STREAM_PARTITIONS) throw new Error(`${partitionsRecordKey(baseKey)}: not a number of partitions (1-${MAX_STREAM_PARTITIONS}): "${raw.slice(0, 40)}"`);
  return n;
}
