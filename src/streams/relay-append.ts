/**
 * The relay's fenced append to the stream (docs/architecture.md, "the outbox"): a cycle's rows go out as one script
 * call per partition (APPEND_IF_TAIL), sent together, each of which appends only if its partition still ends with the
 * entry this relay appended last and the key's layout names the relay's number of partitions. A traced row gets a
 * `publish` span around its append.
 */
import { createHash } from 'node:crypto';
import { SpanKind, type Span } from '@opentelemetry/api';
import type { RedisConnection } from '../redis/connection';
import { failSpan, formatTraceparent, traceparentContext, tracer } from '../telemetry';
import { layoutKey, partitionOf } from './partitions';

/**
 * Appends a batch to the stream KEYS[1] only if the stream still ends with the entry the relay appended last
 * (ARGV[1]; `0-0` for an empty stream) and the key's layout (KEYS[2]) does not name another number of partitions
 * than the relay's (ARGV[3]). ARGV[2] is MAXLEN; then each entry is a field count followed by its fields. Returns the
 * new entry ids, or the error `TAIL_MOVED <actual tail>` or `REPARTITIONED <the layout's number>`. One round trip,
 * atomic.
 */
const APPEND_IF_TAIL = `
local layout = redis.call('HGET', KEYS[2], 'partitions')
if layout and layout ~= ARGV[3] then return redis.error_reply('REPARTITIONED ' .. layout) end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local tail = '0-0'
if #last > 0 then tail = last[1][1] end
if tail ~= ARGV[1] then return redis.error_reply('TAIL_MOVED ' .. tail) end
local ids = {}
local i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local args = {KEYS[1], 'MAXLEN', '~', ARGV[2], '*'}
  for j = 1, n do args[#args + 1] = ARGV[i + j] end
  ids[#ids + 1] = redis.call('XADD', unpack(args))
  i = i + n + 1
end
return ids
`;
const APPEND_IF_TAIL_SHA = createHash('sha1').update(APPEND_IF_TAIL).digest('hex');

/** One partition's part of a cycle: the append's arguments, the indexes of its rows in the cycle, their spans. */
export interface PartitionBatch {
  readonly args: string[];
  readonly rows: number[];
  readonly spans: Array<Span | null>;
}

/**
 * Per partition, its rows in id order: one append each. Its arguments start with the partition's tail as this relay
 * knows it, MAXLEN and the number of partitions; then each entry is a field count followed by its fields.
 */
export function partitionBatches(
  rows: ReadonlyArray<{ readonly fields: Record<string, string> }>,
  partitions: number,
  tails: ReadonlyMap<number, string>,
  maxLen: number,
  keyOf: (n: number) => string,
): Map<number, PartitionBatch> {
  const batches = new Map<number, PartitionBatch>();
  for (const [i, row] of rows.entries()) {
    const n = partitions === 1 ? 0 : partitionOf(row.fields.deploymentId ?? '', partitions);
    let batch = batches.get(n);
    if (batch === undefined) {
      batch = { args: [tails.get(n) ?? '0-0', String(maxLen), String(partitions)], rows: [], spans: [] };
      batches.set(n, batch);
    }
    const { fields, span } = startPublish(row.fields, keyOf(n));
    batch.spans.push(span);
    batch.rows.push(i);
    const flat = Object.entries(fields).flat();
    batch.args.push(String(flat.length), ...flat);
  }
  return batches;
}

/** What one partition's append returned: the new entries' ids, in the order of its rows. */
export interface Appended {
  readonly n: number;
  readonly batch: PartitionBatch;
  readonly ids: string[];
}

/** Sends every partition's append at once. Each row's span ends with its append (failed with it). */
export function appendBatches(
  redis: RedisConnection,
  batches: ReadonlyMap<number, PartitionBatch>,
  keyOf: (n: number) => string,
): Promise<Array<PromiseSettledResult<Appended>>> {
  return Promise.allSettled(
    [...batches].map(async ([n, batch]) => {
      try {
        const ids = await appendIfTail(redis, keyOf(n), batch.args);
        batch.spans.forEach((span, i) => span?.setAttribute('messaging.message.id', ids[i] ?? ''));
        return { n, batch, ids };
      } catch (err) {
        for (const span of batch.spans) if (span !== null) failSpan(span, err);
        throw err;
      } finally {
        for (const span of batch.spans) span?.end();
      }
    }),
  );
}

/** Runs APPEND_IF_TAIL by its SHA (the script is not resent every cycle), loading it when Redis lacks it. */
async function appendIfTail(redis: RedisConnection, key: string, args: readonly string[]): Promise<string[]> {
  try {
    return (await redis.evalsha(APPEND_IF_TAIL_SHA, 2, key, layoutKey(key), ...args)) as string[];
  } catch (err) {
    if (!(err instanceof Error && err.message.startsWith('NOSCRIPT'))) throw err;
    return (await redis.eval(APPEND_IF_TAIL, 2, key, layoutKey(key), ...args)) as string[];
  }
}

/**
 * A traced row (its fields carry the `traceparent` of its transition span) gets a `publish` span, child of that
 * span, around the append (one script call for the whole batch, so every entry's span covers the same call), and
 * its entry carries the publish span's context instead, so that a consumer's `handle transition` span is its child.
 * In a process that does not trace, the span is the API's no-op, whose context is the parent's: the field goes out
 * as it was written. An untraced row (tracing off where it was written) has no field and gets no span.
 */
function startPublish(fields: Record<string, string>, streamKey: string): { fields: Record<string, string>; span: Span | null } {
  const parent = traceparentContext(fields.traceparent);
  if (parent === null) return { fields, span: null };
  const span = tracer().startSpan(
    'publish',
    {
      kind: SpanKind.PRODUCER,
      attributes: {
        'messaging.system': 'redis',
        'messaging.operation.type': 'send',
        'messaging.destination.name': streamKey,
        'fleet.deployment.id': fields.deploymentId ?? '',
        'fleet.event.id': fields.eventId ?? '',
        'fleet.version': Number(fields.version ?? 0),
      },
    },
    parent,
  );
  return { fields: { ...fields, traceparent: formatTraceparent(span.spanContext()) ?? fields.traceparent ?? '' }, span };
}
