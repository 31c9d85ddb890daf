/**
 * How a `TransitionConsumer` handles the entries of a partition it owns (docs/architecture.md, "The stream consumer"):
 * in stream order, each only while the partition's lease holds; a version already seen is dropped (the stream is
 * at-least-once); a failing handler is retried in place, so later entries of its deployment never overtake it; one
 * handler call at a time per consumer; each entry acknowledged under the lease.
 */
import { context, SpanKind, trace } from '@opentelemetry/api';
import type { RedisConnection } from '../redis/connection';
import type { Logger } from '../log';
import { failSpan, traceparentContext, tracer } from '../telemetry';
import { memoryVersionStore, type ConsumerContext, type TransitionConsumerOptions, type VersionStore } from './consumer-options';
import type { Owned, PartitionOwnership, Session } from './consumer-ownership';
import { FENCED_ACK } from './leases';
import type { TransitionEntry } from './stream-entry';

/** The handling of one consumer's entries, and what it counts. */
export class EntryHandling {
  private readonly redis: RedisConnection;
  private readonly options: TransitionConsumerOptions;
  private readonly log: Logger;
  private readonly versions: VersionStore;
  /** the end of the last handler call queued: calls run one at a time */
  private handlerTurn: Promise<void> = Promise.resolve();
  /** entries handled (not dropped) since start */
  handled = 0;
  /** entries dropped as already seen */
  dropped = 0;
  /** the last version this consumer handled per deployment, since start (handed to the caller on a resync) */
  private readonly lastVersions = new Map<string, number>();

  constructor(
    private readonly consumer: ConsumerContext,
    private readonly leases: Pick<PartitionOwnership, 'holds' | 'lose'>,
  ) {
    ({ redis: this.redis, options: this.options, log: this.log } = consumer);
    this.versions = consumer.options.versions ?? memoryVersionStore();
  }

  private get stopped(): boolean {
    return this.consumer.isStopped();
  }

  /** The last version this consumer handled per deployment since it started (a copy). */
  lastHandledVersions(): Map<string, number> {
    return new Map(this.lastVersions);
  }

  /**
   * Handles a batch of one partition in order, each entry only while the lease holds (checked before each handler
   * call), each acknowledged under the lease (FENCED_ACK). Stops at the first entry it may not handle: that one and
   * the rest stay pending for the partition's next owner.
   */
  async handleAll(session: Session, o: Owned, entries: readonly TransitionEntry[]): Promise<void> {
    for (const entry of entries) {
      if (!this.leases.holds(session, o)) return;
      const seen = await this.versions.get(entry.deploymentId);
      if (seen !== undefined && entry.version <= seen) {
        this.dropped++;
      } else {
        // closed, or the lease lost, while the handler kept failing: leave the entry pending
        if (!(await this.handleWithRetry(session, o, entry))) return;
        await this.versions.set(entry.deploymentId, entry.version);
        this.lastVersions.set(entry.deploymentId, entry.version);
        this.handled++;
      }
      const acked = Number(await this.redis.eval(FENCED_ACK, 2, o.key, o.leaseKey, o.token, this.options.group, entry.streamId));
      if (acked < 0) {
        this.leases.lose(o, 'its lease was taken');
        return;
      }
    }
  }

  /**
   * Retries a failing handler in place (250 ms doubling to 10 s) so that later entries of the deployment never
   * overtake it. Returns false only when closed, or the lease lost, before the handler succeeded.
   */
  private async handleWithRetry(session: Session, o: Owned, entry: TransitionEntry): Promise<boolean> {
    // a traced entry's handler runs in a span that continues the event's trace (the API's no-op when this process
    // registered no OpenTelemetry SDK); an untraced one's runs as it is
    const parent = traceparentContext(entry.traceparent);
    if (parent === null) return this.retrying(session, o, entry);
    const span = tracer().startSpan(
      'handle transition',
      {
        kind: SpanKind.CONSUMER,
        attributes: {
          'messaging.system': 'redis',
          'messaging.operation.type': 'process',
          'messaging.destination.name': o.key,
          'messaging.consumer.group.name': this.options.group,
          'messaging.message.id': entry.streamId,
          'fleet.deployment.id': entry.deploymentId,
          'fleet.event.id': entry.eventId,
          'fleet.version': entry.version,
        },
      },
      parent,
    );
    try {
      const done = await context.with(trace.setSpan(parent, span), () =>
        this.retrying(session, o, entry, (err) => span.recordException(err instanceof Error ? err : String(err))),
      );
      if (!done) failSpan(span, new Error('closed before the handler succeeded'));
      return done;
    } finally {
      span.end();
    }
  }

  private async retrying(session: Session, o: Owned, entry: TransitionEntry, onFailure?: (err: unknown) => void): Promise<boolean> {
    for (let attempt = 0; ; attempt++) {
      // one handler call at a time per consumer, as with one stream: its partitions take turns (the lease is checked
      // once it is this entry's turn, right before the call)
      const outcome = await this.oneAtATime(async () => {
        if (!this.leases.holds(session, o)) return 'stop' as const;
        try {
          await this.options.handler(entry);
          return 'done' as const;
        } catch (err) {
          return { err };
        }
      });
      if (outcome === 'stop') return false;
      if (outcome === 'done') return true;
      onFailure?.(outcome.err);
      if (this.stopped) return false;
      const delay = Math.min(10_000, 250 * 2 ** attempt);
      this.log.warn({ err: outcome.err, deploymentId: entry.deploymentId, version: entry.version, delayMs: delay }, 'handler failed; retrying');
      // the backoff lets the other partitions' entries go on; this partition's wait behind this entry
      await this.consumer.pause(delay);
      if (this.stopped) return false;
    }
  }

  /** Runs `fn` after every call queued before it has finished (FIFO). */
  private async oneAtATime<T>(fn: () => Promise<T>): Promise<T> {
    const before = this.handlerTurn;
    let done: () => void = () => undefined;
    this.handlerTurn = new Promise<void>((resolve) => (done = resolve));
    await before;
    try {
      return await fn();
    } finally {
      done();
    }
  }
}
