/**
 * The transition stream's partitions (docs/contract.md, "The transition stream", Partitions): which partition a
 * deployment's entries go to (`partitionOf`), each partition's key, where the fleet records how many there are, and
 * each key's layout (what a repartition leaves behind: `layoutKey`). Pure, except the functions that read and write
 * the record and the layouts.
 */
import { ConfigError } from '../errors';
import type { RedisConnection } from '../redis/connection';
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

/** What the record says now, recording `partitions` first if nothing is recorded (RECORD_PARTITIONS). */
export async function recordOrRead(redis: RedisConnection, baseKey: string, partitions: number): Promise<number> {
  return parseRecord(baseKey, String(await redis.eval(RECORD_PARTITIONS, 2, partitionsRecordKey(baseKey), baseKey, String(partitions))));
}

/**
 * Records the configured number of partitions where consumers read it, or refuses (ConfigError, naming both values)
 * when the fleet's stream is written with another number: a process starts only with the recorded one. The number
 * of a live fleet changes only through `fleet streams repartition --to N` (`repartition` in ./repartition.ts).
 */
export async function recordPartitions(redis: RedisConnection, baseKey: string, partitions: number): Promise<void> {
  const recorded = await recordOrRead(redis, baseKey, partitions);
  if (recorded !== partitions) {
    throw new ConfigError([
      `FLEET_STREAM_PARTITIONS: this fleet's stream ${baseKey} is written with ${recorded} partition(s) (recorded at ${partitionsRecordKey(baseKey)}), but ${partitions} are configured: set FLEET_STREAM_PARTITIONS=${recorded}; to change the number of partitions of a live fleet, run \`fleet streams repartition --to ${partitions}\` first (docs/contract.md, "Changing the number of partitions")`,
    ]);
  }
}

/**
 * How many times `fleet streams repartition` changed the record: `<prefix>:transitions:repartitions` (in the
 * record's slot; absent: never). A reader without a group that sees it grow by more than one between two looks missed
 * a whole layout, whose entries it cannot put in order any more.
 */
export function repartitionsKey(baseKey: string): string {
  return `${baseKey}:repartitions`;
}

/** The record and the count of repartitions, read together. */
export async function readRecord(redis: RedisConnection, baseKey: string): Promise<{ partitions: number; repartitions: number }> {
  const [raw, count] = await redis.mget(partitionsRecordKey(baseKey), repartitionsKey(baseKey));
  return { partitions: raw == null ? 1 : parseRecord(baseKey, raw), repartitions: Number(count ?? 0) };
}

/** The recorded number of partitions (1 when nothing is recorded: a fleet from before partitions). */
export async function readPartitions(redis: RedisConnection, baseKey: string): Promise<number> {
  const raw = await redis.get(partitionsRecordKey(baseKey));
  return raw === null ? 1 : parseRecord(baseKey, raw);
}

function parseRecord(baseKey: string, raw: string): number {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1 || n > MAX_STREAM_PARTITIONS)
    throw new Error(`${partitionsRecordKey(baseKey)}: not a number of partitions (1-${MAX_STREAM_PARTITIONS}): "${raw.slice(0, 40)}"`);
  return n;
}

/**
 * A partition key's layout: `<partition key>:layout`, a hash in the key's slot, written by `fleet streams
 * repartition` for every key of the old and the new layout, absent on a fleet never repartitioned. Fields:
 * - `partitions`: the number of partitions the key is written under from now on; the relay appends to the key only
 *   with that number (a relay left with the old number, one that lost its lock mid-append, is fenced off);
 * - `since`, `entries`: on a key of the new layout that already held entries (P = 4 -> 8: `<base>:0..3`; or a key of
 *   a layout from before), the id of its last entry and the count of entries ever added to it at the switch. What is
 *   up to `since` belongs to an earlier layout and was read and acknowledged by every group before the switch: a
 *   group made there later starts after it, a reader never reads before it, the relay never republishes it.
 */
export function layoutKey(partitionKey: string): string {
  return `${partitionKey}:layout`;
}

/** A key's layout as `fleet streams repartition` left it (every field null on a key never repartitioned). */
export interface PartitionLayout {
  readonly partitions: number | null;
  readonly since: string | null;
  readonly entries: number | null;
}

export async function readLayout(redis: RedisConnection, partitionKey: string): Promise<PartitionLayout> {
  const [partitions, since, entries] = await redis.hmget(layoutKey(partitionKey), 'partitions', 'since', 'entries');
  return {
    partitions: partitions === null ? null : Number(partitions),
    since: since ?? null,
    entries: entries === null ? null : Number(entries),
  };
}

/**
 * Where a reader of a partition key starts, given where it asked to (`$`, `0` or a stream id): never before the
 * key's layout boundary (`since`), whose entries belong to an earlier layout. `entriesRead` is the count of entries
 * up to the start when known (for XGROUP CREATE's ENTRIESREAD): 0 from the beginning, the layout's count at its
 * boundary, null otherwise.
 */
export async function readerStart(redis: RedisConnection, partitionKey: string, asked: string): Promise<{ id: string; entriesRead: number | null }> {
  const fromStart = asked === '0' || asked === '0-0';
  if (asked === '$') return { id: asked, entriesRead: null };
  const { since, entries } = await readLayout(redis, partitionKey);
  if (since !== null && (fromStart || compareIds(asked, since) < 0)) return { id: since, entriesRead: entries };
  return { id: asked, entriesRead: fromStart ? 0 : null };
}

/** The greatest sequence number of a stream id (Redis's are unsigned 64-bit). */
const MAX_SEQ = 18446744073709551615n;

/**
 * The stream id just before `id` (`ms-seq`, or `ms` for `ms-0`): no id lies strictly between the two, so a reader
 * positioned there reads `id` next. `0-0` has none before it and stays `0-0`.
 */
export function idBefore(id: string): string {
  const [ms = 0n, seq = 0n] = id.split('-').map((p) => BigInt(p));
  if (seq > 0n) return `${ms}-${seq - 1n}`;
  return ms > 0n ? `${ms - 1n}-${MAX_SEQ}` : '0-0';
}

/** Orders Redis stream ids (`ms-seq`, or `ms`). */
export function compareIds(a: string, b: string): number {
  const [am = 0n, as = 0n] = a.split('-').map((p) => BigInt(p));
  const [bm = 0n, bs = 0n] = b.split('-').map((p) => BigInt(p));
  return am === bm ? (as === bs ? 0 : as < bs ? -1 : 1) : am < bm ? -1 : 1;
}
