/**
 * The transition stream's partitions as /metrics reports them (docs/contract.md, "Metrics"): each partition's length,
 * and per consumer group its lag (entries not yet delivered plus delivered and not acknowledged) and the consumer
 * holding its lease. Read at scrape time: per partition one XLEN and one XINFO GROUPS, and one GET per group's lease,
 * sent at once (no pipeline, so that it works on a Redis Cluster, whose partitions live in different slots).
 */
import type { RedisConnection } from '../redis/connection';
import { leaseKey, leaseOwner } from './leases';
import { partitionKeys, readPartitions } from './partitions';

/** A partition at scrape time (the shape FleetMetrics's `streamPartitions` source takes). */
export interface PartitionStats {
  readonly partition: number;
  readonly length: number;
  readonly groups: ReadonlyArray<{
    readonly group: string;
    /** entries not yet delivered to the group plus those delivered and not acknowledged; null when Redis cannot tell */
    readonly lag: number | null;
    /** the consumer holding the group's lease on the partition, null when none does */
    readonly owner: string | null;
  }>;
}

/** Every partition of the stream at `baseKey` (as many as recorded), with its groups. */
export async function readPartitionStats(redis: RedisConnection, baseKey: string): Promise<PartitionStats[]> {
  const keys = partitionKeys(baseKey, await readPartitions(redis, baseKey));
  return Promise.all(
    keys.map(async (key, partition) => {
      const [length, groups] = await Promise.all([redis.xlen(key), xinfoGroups(redis, key)]);
      const withOwners = await Promise.all(
        groups.map(async (g) => {
          const token = await redis.get(leaseKey(key, g.name));
          const lag = g.lag === null ? null : g.lag + g.pending;
          return { group: g.name, lag, owner: token === null ? null : leaseOwner(token) };
        }),
      );
      return { partition, length, groups: withOwners };
    }),
  );
}

/** One consumer group on a stream key, as XINFO GROUPS tells it. */
export interface GroupInfo {
  readonly name: string;
  /** entries delivered and not acknowledged */
  readonly pending: number;
  /** entries not yet delivered (null when Redis cannot tell, e.g. after an XDEL) */
  readonly lag: number | null;
  readonly lastDeliveredId: string;
}

/** XINFO GROUPS, or none when the key has no stream yet. */
export async function xinfoGroups(redis: RedisConnection, key: string): Promise<GroupInfo[]> {
  let reply: unknown[];
  try {
    reply = (await redis.xinfo('GROUPS', key)) as unknown[];
  } catch (err) {
    if (err instanceof Error && /no such key/i.test(err.message)) return [];
    throw err;
  }
  return reply.map((raw) => {
    const flat = raw as unknown[];
    const f: Record<string, unknown> = {};
    for (let i = 0; i + 1 < flat.length; i += 2) f[String(flat[i])] = flat[i + 1];
    return {
      name: String(f.name),
      pending: Number(f.pending ?? 0),
      lag: f.lag === null || f.lag === undefined ? null : Number(f.lag),
      lastDeliveredId: typeof f['last-delivered-id'] === 'string' ? f['last-delivered-id'] : '0-0',
    };
  });
}
