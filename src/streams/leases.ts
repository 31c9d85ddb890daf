/**
 * Partition ownership within a consumer group (docs/architecture.md, "The stream consumer", Leases): the keys, the
 * scripts that take, renew, check and give up a lease, and the fair share each live member aims for. The scripts
 * touch one slot each: a partition's stream and its lease key share it (see `partitionKey`), the membership set lives
 * in the base key's slot.
 */

/** The lease on a partition for a group: `<partition key>:lease:<group>`, holding the owner's token, with a TTL. */
export function leaseKey(partitionKey: string, group: string): string {
  return `${partitionKey}:lease:${group}`;
}

/**
 * The consumer named in a lease's token (`<consumer>:<instance>:<holding>`, written by `TransitionConsumer`): the
 * token without its last two parts, so that a consumer name may contain colons.
 */
export function leaseOwner(token: string): string {
  const parts = token.split(':');
  return parts.length < 3 ? token : parts.slice(0, -2).join(':');
}

/** The group's live members: `<base key>:members:<group>`, a sorted set of consumer names scored by expiry. */
export function membersKey(baseKey: string, group: string): string {
  return `${baseKey}:members:${group}`;
}

/**
 * Heartbeat: ARGV[1] TTL ms, ARGV[2] the member. Drops expired members (by Redis's clock, so hosts' clocks do not
 * matter), adds or refreshes this one unless ARGV[3] is '0' (leaving), and returns the live members (in expiry
 * order: sort them by name before use).
 */
export const HEARTBEAT = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '0' then
  redis.call('ZREM', KEYS[1], ARGV[2])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 3)
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
`;

/**
 * Takes the lease KEYS[1] with the token ARGV[1] for ARGV[3] ms if it is free, or still held by this consumer
 * instance (ARGV[2], its tokens' prefix: a holding whose worker stopped, e.g. at its deadline during an outage,
 * which no other consumer can have taken meanwhile): 1, else 0.
 */
export const ACQUIRE = `
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, #ARGV[2]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[3]))
return 1
`;

/** Renews the lease KEYS[1] for ARGV[2] ms if it still holds the token ARGV[1]: 1, else 0. */
export const RENEW = `
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
`;

/** Gives up the lease KEYS[1] if it still holds the token ARGV[1]. */
export const RELEASE = `
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
`;

/**
 * Acknowledges entry ARGV[3] of stream KEYS[1] for group ARGV[2] only while the lease KEYS[2] holds the token
 * ARGV[1] (one atomic step): the XACK's reply, or -1 when the lease is another's or gone.
 */
export const FENCED_ACK = `
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
return redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
`;

/**
 * Claims entries ARGV[4..] of stream KEYS[1] for group ARGV[2], consumer ARGV[3], only while the lease KEYS[2] holds
 * the token ARGV[1]: XCLAIM's reply (entries the stream no longer holds are left out), or -1.
 */
export const FENCED_CLAIM = `
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
return redis.call('XCLAIM', KEYS[1], ARGV[2], ARGV[3], 0, unpack(ARGV, 4))
`;

/**
 * How many partitions `me` aims to own: P split evenly over the live members (sorted by name), the first `P mod m` members
 * taking one more. With fewer partitions than members each aims for one, so an owner keeps its partition when
 * another consumer joins (the others are hot standbys) rather than hand it to whichever name sorts first. A consumer
 * not (yet) among the members aims for none.
 */
export function fairShare(members: readonly string[], me: string, partitions: number): number {
  const index = members.indexOf(me);
  if (index < 0) return 0;
  const m = members.length;
  if (partitions < m) return 1;
  return Math.floor(partitions / m) + (index < partitions % m ? 1 : 0);
}

/**
 * The order in which `me` tries partitions: first those `n ≡ index (mod m)` (each member's own, so that members
 * joining at once do not race for the same ones), then the rest.
 */
export function preferredPartitions(members: readonly string[], me: string, partitions: number): number[] {
  const index = Math.max(0, members.indexOf(me));
  const m = Math.max(1, members.length);
  const all = Array.from({ length: partitions }, (_, n) => n);
  return [...all.filter((n) => n % m === index), ...all.filter((n) => n % m !== index)];
}
