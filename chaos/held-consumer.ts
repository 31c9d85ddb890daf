/**
 * The `consumer-held` fault: a consumer group made at the stream's end, whose handler hangs on the first entry it
 * gets; the entries behind it on that entry's partition (40 over all partitions, at least 10) are trimmed away (once
 * the audit, and the chaos consumer group, have read them); then the handler is let go. The consumer must stop with ResyncRequiredError, not go on past the
 * hole (it owns every partition: entries of the other partitions may still reach its handler before it stops).
 */
import type { RedisConnection } from '../src/redis/connection';
import { ResyncRequiredError } from '../src/errors';
import { compareIds, TransitionConsumer, type TransitionEntry } from '../src/streams/consumer';
import { partitionKey, partitionKeys, partitionOf } from '../src/streams/partitions';
import { sleep } from '../src/util';
import { KEEP_ALL, type AuditConsumer } from './audit';

/** Polls `check` every 100 ms until it gives a value, or gives undefined after `timeoutMs`. */
async function until<T>(check: () => T | undefined | Promise<T | undefined>, timeoutMs: number): Promise<T | undefined> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined || Date.now() > deadline) return value;
    await sleep(100);
  }
}

export interface HeldConsumerTarget {
  readonly redisUrl: string;
  readonly admin: RedisConnection;
  /** the stream's base key, and its partitions */
  readonly streamKey: string;
  readonly partitions: number;
  readonly audit: AuditConsumer;
  /** whether the run's other readers of the stream have read (and acknowledged) partition key `key` up to `id` */
  readonly readUpTo?: (key: string, id: string) => Promise<boolean>;
}

export interface HeldConsumerResult {
  readonly detail: string;
  /** it stopped with ResyncRequiredError, as it must */
  readonly resync: boolean;
  /** it went on past the hole */
  readonly skipped: boolean;
}

/** Holds a consumer (group `group`) on an entry, trims its partition past it, lets it go, and says what it did. */
export async function holdConsumerBehindTrim(target: HeldConsumerTarget, group: string): Promise<HeldConsumerResult> {
  const { admin, streamKey, partitions } = target;
  let release: () => void = () => undefined;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const handled: TransitionEntry[] = [];
  const held = new TransitionConsumer({
    redis: target.redisUrl,
    streamKey,
    group,
    consumer: 'held',
    batchSize: 1,
    blockMs: 200,
    versions: KEEP_ALL,
    handler: async (entry) => {
      handled.push(entry);
      if (handled.length === 1) await gate;
    },
  });
  /** how `run` ended, once it has */
  let ended: { readonly result: unknown } | undefined;
  void held.run().then(
    () => (ended = { result: 'stopped' }),
    (err: unknown) => (ended = { result: err }),
  );
  const plain = (detail: string): HeldConsumerResult => ({ detail, resync: false, skipped: false });
  try {
    const firstEntry = await until(() => handled[0], 15_000);
    if (firstEntry === undefined) return plain('no entry came to hold the consumer on');
    const first = firstEntry.streamId;
    const n = partitionOf(firstEntry.deploymentId, partitions);
    const key = partitionKey(streamKey, n, partitions);
    const on = partitions === 1 ? '' : ` on partition ${n}`;
    // on one of P partitions, a P-th of the traffic
    const trim = Math.max(10, Math.ceil(40 / partitions));
    const behind = await until(async () => {
      const next = await admin.xrange(key, `(${first}`, '+', 'COUNT', trim + 1);
      return next.length > trim ? next[trim]?.[0] : undefined;
    }, 30_000);
    if (behind === undefined) return plain(`too little traffic behind the held consumer${on}`);
    if ((await until(() => (target.audit.reached(n, behind) ? true : undefined), 20_000)) === undefined)
      return plain('the audit did not catch up; nothing trimmed');
    // the consumer group too, when it can (else it must stop with resync_required, which the report counts)
    const groupCaughtUp =
      target.readUpTo === undefined ||
      (await until(async () => ((await target.readUpTo?.(key, behind)) === true ? true : undefined), 20_000)) === true;
    const trimmed = await admin.xtrim(key, 'MINID', behind);
    release();
    // whichever comes first: the consumer ends, or it handles an entry of that partition past the hole
    const pastHole = (): boolean => handled.some((e) => partitionOf(e.deploymentId, partitions) === n && compareIds(e.streamId, first) > 0);
    const result = (await until(() => ended ?? (pastHole() ? { result: 'skipped' } : undefined), 15_000))?.result;
    const lagging = groupCaughtUp ? '' : ' (the consumer group had not read that far)';
    if (result instanceof ResyncRequiredError) {
      return {
        detail: `consumer held at ${first}${on}; ${trimmed} entries trimmed behind it${lagging}; it stopped with resync_required`,
        resync: true,
        skipped: false,
      };
    }
    const skipped = result === 'skipped';
    return {
      detail: `consumer held at ${first}${on}; ${trimmed} entries trimmed${lagging}; it ${skipped ? 'WENT ON PAST THE HOLE' : `ended with ${String(result)}`}`,
      resync: false,
      skipped,
    };
  } finally {
    release();
    await held.close();
    for (const key of partitionKeys(streamKey, partitions)) await admin.xgroup('DESTROY', key, group).catch(() => undefined);
  }
}
