/**
 * The `consumer-held` fault: a consumer group made at the stream's end, whose handler hangs on the first entry it
 * gets; 40 entries behind it are trimmed away (once the audit has read them); then the handler is let go. The
 * consumer must stop with ResyncRequiredError, not go on past the hole.
 */
import type { RedisConnection } from '../src/queues/redis';
import { ResyncRequiredError } from '../src/errors';
import { TransitionConsumer, type TransitionEntry } from '../src/streams/consumer';
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
  readonly streamKey: string;
  readonly audit: AuditConsumer;
}

export interface HeldConsumerResult {
  readonly detail: string;
  /** it stopped with ResyncRequiredError, as it must */
  readonly resync: boolean;
  /** it went on past the hole */
  readonly skipped: boolean;
}

/** Holds a consumer (group `group`) on an entry, trims the stream past it, lets it go, and says what it did. */
export async function holdConsumerBehindTrim(target: HeldConsumerTarget, group: string): Promise<HeldConsumerResult> {
  const { admin, streamKey } = target;
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
    const first = await until(() => handled[0]?.streamId, 15_000);
    if (first === undefined) return plain('no entry came to hold the consumer on');
    const behind = await until(async () => {
      const next = await admin.xrange(streamKey, `(${first}`, '+', 'COUNT', 41);
      return next.length >= 41 ? next[40]?.[0] : undefined;
    }, 20_000);
    if (behind === undefined) return plain('too little traffic behind the held consumer');
    if ((await until(() => (target.audit.reached(behind) ? true : undefined), 20_000)) === undefined) return plain('the audit did not catch up; nothing trimmed');
    const trimmed = await admin.xtrim(streamKey, 'MINID', behind);
    release();
    // whichever comes first: the consumer ends, or it handles an entry past the hole
    const result = (await until(() => ended ?? (handled.length > 1 ? { result: 'skipped' } : undefined), 15_000))?.result;
    if (result instanceof ResyncRequiredError) {
      return { detail: `consumer held at ${first}; ${trimmed} entries trimmed behind it; it stopped with resync_required`, resync: true, skipped: false };
    }
    const skipped = result === 'skipped';
    return { detail: `consumer held at ${first}; ${trimmed} entries trimmed; it ${skipped ? 'WENT ON PAST THE HOLE' : `ended with ${String(result)}`}`, resync: false, skipped };
  } finally {
    release();
    await held.close();
    await admin.xgroup('DESTROY', streamKey, group).catch(() => undefined);
  }
}
