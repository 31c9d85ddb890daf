/**
 * The transition service: load a consistent snapshot, let the pure machine decide, and write the decision
 * atomically (docs/architecture.md, "Optimistic locking, idempotency, the outbox") in ONE statement:
 *
 *   version-checked UPDATE of the deployment -> processed_events row (the eventId's claim) -> attempt rows ->
 *   state_transitions row -> outbox row
 *
 * A lone event is a batch of one: both paths read one snapshot (`TRANSITION_SQL.snapshot`), plan with the one
 * planner (batch-plan.ts) and write with the one statement (`TRANSITION_SQL.write`, src/entities/sql/
 * transition-write.ts). A statement is atomic on its own, so the optimistic first try is two round trips: the
 * snapshot read and the write, no transaction around them (bench/ found PostgreSQL's and the worker's CPU per
 * transition to go mostly to per-statement overhead). A lost version check means a concurrent writer won, and
 * nothing was written: reload, decide again, now holding the deployment's row lock in a transaction, with bounded
 * retries and jitter. An eventId already claimed by another delivery makes the whole statement fail on the claim's
 * primary key, so nothing of it stays, and the event is a duplicate. Noops record the eventId and write nothing
 * else; rejections write nothing at all. Stamps (heartbeat, readiness) are apart, in stamps.ts; the relay wake-up
 * after a commit in relay-wakeup.ts.
 */
import { context as activeContext, type Context } from '@opentelemetry/api';
import { ConflictError, isLockConflict, isTransient } from '../../errors';
import {
  Database,
  isClaimConflict,
  retryLockConflicts,
  TRANSITION_SQL,
  transitionSnapshotParams,
  transitionWriteParams,
  writesAnything,
  type HandedOffRow,
  type Session,
} from '../../entities/sql';
import { assertEndpointAllowed, type EndpointAllowList } from '../../events/endpoint-allow';
import type { ApplyItem, ApplyOptions, TransitionHooks, TransitionServiceOptions } from './options';
import { parseEvent, type LifecycleEvent } from '../../events/schemas';
import { silentLogger, type Logger } from '../../log';
import { DEFAULTS } from '../../config';
import { cutoffsAt, type LivenessLimits, type MachineEvent } from '../../machine';
import { sleep } from '../../util';
import { duplicateOf, eventIdConflict, sameEvent, toMachineEvent, type ApplyResult, type StateEvent } from './outcomes';
import { planBatch, snapshotKeys, splitBatch, verdictOf, writeReportOf, type BatchPlan, type PreparedEvent, type WriteReport } from './batch-plan';
import type { StampBuffer } from '../stamps';
import { RelayWakeup } from './relay-wakeup';
import { Stamps } from './stamps';
import { inSpan } from '../../telemetry';
import { endEventTrace, startBatchTrace, startEventTrace, type EventTrace } from './tracing';

/** Signals a lost version check; caught by the retry loop. */
class VersionCheckLost extends Error {}

export class TransitionService {
  private readonly db: Database;
  private readonly now: () => Date;
  private readonly maxConflictRetries: number;
  private readonly log: Logger;
  private readonly hooks: TransitionHooks;
  private readonly endpointAllow: EndpointAllowList | null;
  private readonly limits: LivenessLimits;
  private readonly stamps: Stamps;
  private readonly stampBuffer: StampBuffer | null;
  private readonly wakeup: RelayWakeup;

  constructor(options: TransitionServiceOptions) {
    this.db = new Database(options.dataSource);
    this.now = options.now ?? (() => new Date());
    this.maxConflictRetries = options.maxConflictRetries ?? 12;
    this.log = options.logger ?? silentLogger;
    this.hooks = options.hooks ?? {};
    this.endpointAllow = options.endpointAllow ?? null;
    this.limits = {
      orphanAfterS: options.orphanAfterS ?? DEFAULTS.orphanAfterS,
      progressDeadlineS: options.progressDeadlineS ?? DEFAULTS.progressDeadlineS,
    };
    this.stampBuffer = options.stampBuffer ?? null;
    this.stamps = new Stamps(this.db, this.now, this.stampBuffer);
    this.wakeup = new RelayWakeup(this.db, this.log, options.relay);
  }

  /**
   * Validates and applies one lifecycle event. Returns what happened (applied, noop, rejected); throws
   * `ValidationError` for bad input (nothing written), `NotYetError` when the deployment or attempt does not exist
   * yet, `ConflictError` when every bounded retry lost the version check, and infrastructure errors as they come.
   */
  async apply(name: string, data: unknown, options: ApplyOptions = {}): Promise<ApplyResult> {
    const event = parseEvent(name, data, options.fallbackEventId);
    // producers may write jobs to Redis without the SDK: the allow-list holds here too
    assertEndpointAllowed(event.data, this.endpointAllow);
    switch (event.name) {
      case 'attempt.heartbeat':
        return this.stamps.heartbeat(event);
      case 'deployment.readiness':
        return this.stamps.readiness(event);
      default:
        return this.transition(event, options.producedAt, options.traceContext);
    }
  }

  /**
   * Group commit (docs/architecture.md, "Group commit"): applies events that are in flight together in one snapshot
   * read, one write statement and one commit, and gives each exactly the outcome `apply` would have given it, had
   * the events been applied one at a time in the order given (for events of one deployment; events of different
   * deployments do not depend on each other). Returns one settled result per item, in order: a value where `apply`
   * returns, the error where it throws. An event that fails before it is decided (bad input, an orphan whose
   * buffered heartbeat cannot be written) fails alone; the others go on without it. Heartbeat and readiness stamps
   * take their own path, as in `apply`.
   */
  async applyMany(items: readonly ApplyItem[]): Promise<Array<PromiseSettledResult<ApplyResult>>> {
    const settled: Array<Promise<PromiseSettledResult<ApplyResult>>> = [];
    const preparing: Array<Promise<{ readonly prepared: PreparedEvent; readonly settle: (r: PromiseSettledResult<ApplyResult>) => void } | null>> =
      [];
    for (const item of items) {
      let event: LifecycleEvent;
      try {
        event = parseEvent(item.name, item.data, item.options?.fallbackEventId);
        assertEndpointAllowed(event.data, this.endpointAllow);
      } catch (err) {
        settled.push(Promise.resolve({ status: 'rejected', reason: err }));
        continue;
      }
      if (event.name === 'attempt.heartbeat' || event.name === 'deployment.readiness') {
        settled.push(settle(this.apply(item.name, item.data, item.options)));
        continue;
      }
      const trace = startEventTrace(event, item.options?.traceContext ?? activeContext.active());
      let resolve: (r: PromiseSettledResult<ApplyResult>) => void = () => undefined;
      const result = new Promise<PromiseSettledResult<ApplyResult>>((r) => (resolve = r));
      // an event whose preparation fails (an orphan's heartbeat flush while its Redis is away) fails alone, with
      // that error, as it would have on its own; the rest of the batch goes on without it
      preparing.push(
        this.prepare(event, item.options?.producedAt, trace).then(
          (prepared) => ({ prepared, settle: resolve }),
          (reason: unknown) => {
            resolve({ status: 'rejected', reason });
            return null;
          },
        ),
      );
      const ended = (r: PromiseSettledResult<ApplyResult>) => {
        endEventTrace(trace, r);
        return r;
      };
      settled.push(trace === null ? result : result.then(ended));
    }
    const ready = (await Promise.all(preparing)).filter((p) => p !== null);
    (await this.applyPrepared(ready.map((p) => p.prepared))).forEach((r, i) => ready[i]?.settle(r));
    return Promise.all(settled);
  }

  /** Applies prepared state events as batches: one batch, then (rarely) the events it had to leave for later. */
  private async applyPrepared(events: readonly PreparedEvent[]): Promise<Array<PromiseSettledResult<ApplyResult>>> {
    if (events.length === 0) return [];
    const { now, later } = splitBatch(events);
    const results = new Array<PromiseSettledResult<ApplyResult>>(events.length);
    const batch = now.map((i) => events[i] as PreparedEvent);
    // a batch of one goes the one-event path: its retries take the deployment's row lock
    const applied = batch.length === 1 ? [await settle(this.transitionOne(batch[0] as PreparedEvent))] : await this.applyBatch(batch);
    applied.forEach((r, k) => (results[now[k] as number] = r));
    if (later.length > 0) {
      (await this.applyPrepared(later.map((i) => events[i] as PreparedEvent))).forEach((r, k) => (results[later[k] as number] = r));
    }
    return results;
  }

  /** One batch: snapshot, decisions, one write. Events whose deployment's write lost are redone one at a time. */
  private async applyBatch(events: readonly PreparedEvent[]): Promise<Array<PromiseSettledResult<ApplyResult>>> {
    // the batch's statements serve every event in it: they go under a span of the batch's own, linked to each event's
    const batchTrace = startBatchTrace(
      events.map((e) => e.trace ?? null),
      events.length,
    );
    let written: { readonly plan: BatchPlan; readonly report: WriteReport };
    try {
      written = await this.db.session((s) =>
        this.readDecideWrite(s, events, batchTrace?.context ?? null, {
          before: (plan) => this.hooks.beforeBatchWrite?.(plan.events.map((p) => p.prepared.event)),
        }),
      );
    } catch (err) {
      batchTrace?.span.end();
      return this.batchFailed(events, err);
    }
    batchTrace?.span.end();
    const { plan, report } = written;
    const results: Array<Promise<PromiseSettledResult<ApplyResult>> | PromiseSettledResult<ApplyResult>> = [];
    const redo: Array<{ readonly index: number; readonly prepared: PreparedEvent }> = [];
    plan.events.forEach((p, index) => {
      const verdict = verdictOf(p, plan, report);
      switch (verdict.kind) {
        case 'settled':
          results.push({ status: 'fulfilled', value: verdict.result });
          break;
        case 'failed':
          results.push({ status: 'rejected', reason: verdict.error });
          break;
        case 'claimed_elsewhere':
          results.push(settle(this.claimedElsewhere(this.db, p.prepared.event)));
          break;
        case 'redo':
          redo.push({ index, prepared: p.prepared });
          results.push({ status: 'rejected', reason: new Error('redone') });
          break;
      }
    });
    if (plan.events.some((p) => p.outcome.kind === 'applied' && report.won.has(p.prepared.event.data.deploymentId))) {
      this.wakeup.committed(report.handoff);
    }
    if (redo.length > 0) {
      this.log.debug({ events: redo.length }, 'version check lost in a batch; applying those events one at a time');
      const redone = await this.oneByOne(redo.map((r) => r.prepared));
      redo.forEach((r, k) => (results[r.index] = redone[k] as PromiseSettledResult<ApplyResult>));
    }
    return Promise.all(results.map((r) => Promise.resolve(r)));
  }

  /**
   * A batch whose statements failed wrote nothing. On its data (an eventId claimed meanwhile by another delivery, a
   * lock conflict) or on something unforeseen, each event takes the one-event path, which knows how to tell each
   * case (and surfaces a bug on the one event that has it); on the connection or the server, every event fails
   * with that error, for the worker's retries.
   */
  private async batchFailed(events: readonly PreparedEvent[], err: unknown): Promise<Array<PromiseSettledResult<ApplyResult>>> {
    if (!fallsBackOneByOne(err)) return events.map(() => ({ status: 'rejected', reason: err }));
    if (isLockConflict(err)) {
      const what = 'the group-commit write, one event at a time';
      this.log.warn({ what, code: pgCode(err), events: events.length }, 'lock conflict: running it again');
    } else {
      this.log[isClaimConflict(err) ? 'debug' : 'warn']({ err, events: events.length }, 'batch write failed; applying its events one at a time');
    }
    return this.oneByOne(events);
  }

  /** The one-event path for each event: one deployment's events in order, deployments side by side. */
  private async oneByOne(events: readonly PreparedEvent[]): Promise<Array<PromiseSettledResult<ApplyResult>>> {
    const results = new Array<PromiseSettledResult<ApplyResult>>(events.length);
    const byDeployment = new Map<string, number[]>();
    events.forEach(({ event }, i) => {
      const list = byDeployment.get(event.data.deploymentId) ?? [];
      list.push(i);
      byDeployment.set(event.data.deploymentId, list);
    });
    await Promise.all(
      [...byDeployment.values()].map(async (indexes) => {
        for (const i of indexes) results[i] = await settle(this.transitionOne(events[i] as PreparedEvent));
      }),
    );
    return results;
  }

  private machineEventOf(event: StateEvent, producedAt: Date | undefined): MachineEvent {
    // when the event was declared: an orphan or expiry is judged as of then (the sweep sets the job's timestamp
    // to its tick, on the fleet clock), so that heartbeats that waited behind it in a backlog still count. Not capped
    // at our clock: a declaration is a trusted actor's (the sweep, `events:admin`), and the chaos workload dates its
    // own ahead on purpose (chaos/sender.ts, declaredAt)
    return toMachineEvent(event, cutoffsAt(producedAt ?? this.now(), this.limits));
  }

  private async transition(event: StateEvent, producedAt: Date | undefined, traceContext: Context | undefined): Promise<ApplyResult> {
    const trace = startEventTrace(event, traceContext ?? activeContext.active());
    const run = async () => this.transitionOne(await this.prepare(event, producedAt, trace));
    if (trace === null) return run();
    const result = await settle(run());
    endEventTrace(trace, result);
    if (result.status === 'rejected') throw result.reason;
    return result.value;
  }

  /**
   * An event made ready to be decided, on both paths. An orphan is judged by the liveness in PostgreSQL: the
   * attempt's latest heartbeat may still be in the buffer, so it goes to PostgreSQL first (a rare path; one extra
   * UPDATE), and fails the event when it cannot. Expiry is judged by the start alone.
   */
  private async prepare(event: StateEvent, producedAt: Date | undefined, trace: EventTrace | null): Promise<PreparedEvent> {
    if (event.name === 'attempt.orphaned' && this.stampBuffer !== null) {
      await this.stampBuffer.flushAttempt(event.data.attemptId, event.data.deploymentId);
    }
    return { event, machineEvent: this.machineEventOf(event, producedAt), trace };
  }

  private async transitionOne(prepared: PreparedEvent): Promise<ApplyResult> {
    const { event } = prepared;
    for (let attempt = 1; ; attempt++) {
      // Optimistic first: read, decide, write, two statements and no transaction. Once it has lost, take the
      // deployment's row lock before reading, in a transaction, so a hot deployment cannot starve one writer: the
      // version check still guards, and now it cannot lose.
      const lock = attempt > 1;
      try {
        // a lock conflict PostgreSQL broke undid the whole try (its write is one statement, or the locked retry's
        // transaction): read and decide again
        const { result, handoff } = await retryLockConflicts(
          () => (lock ? this.db.transaction((s) => this.tryOne(s, prepared, true)) : this.db.session((s) => this.tryOne(s, prepared, false))),
          { what: 'the one-event write', log: this.log, context: { deploymentId: event.data.deploymentId, eventId: event.eventId } },
        );
        // after the commit (the locked try's transaction commits when tryOne has returned)
        if (result.outcome === 'applied') this.wakeup.committed(handoff);
        return result;
      } catch (err) {
        if (isClaimConflict(err)) {
          // another delivery of this event (or another event with its id) claimed it between our read and our
          // write; ours wrote nothing
          return await this.claimedElsewhere(this.db, event);
        }
        if (!(err instanceof VersionCheckLost)) throw err;
        if (attempt >= this.maxConflictRetries) throw new ConflictError(event.data.deploymentId, attempt);
        this.log.debug({ deploymentId: event.data.deploymentId, eventId: event.eventId, attempt }, 'version conflict, retrying');
        await sleep(Math.random() * Math.min(50, 2 ** attempt));
      }
    }
  }

  /**
   * One try of one event, as a batch of one; with `lock`, in a transaction that first takes its deployment's row lock.
   * Returns its outcome and what its write handed over for the relay of this process.
   */
  private async tryOne(
    s: Session,
    prepared: PreparedEvent,
    lock: boolean,
  ): Promise<{ readonly result: ApplyResult; readonly handoff: readonly HandedOffRow[] | null }> {
    const { event, trace = null } = prepared;
    // a lone event's statements are children of its own transition span
    const traced = trace?.context ?? null;
    if (lock) await inSpan('sql lock', traced, () => s.run(TRANSITION_SQL.lockDeployment, [event.data.deploymentId]));
    const { plan, report } = await this.readDecideWrite(s, [prepared], traced, {
      before: async ({ events: [p] }) => {
        if (p?.outcome.kind === 'applied') await this.hooks.beforeUpdate?.(event);
        else if (p?.outcome.kind === 'noop_claim') await this.hooks.beforeClaim?.(event);
      },
      after: async ({ events: [p] }, { won }) => {
        if (p?.outcome.kind === 'applied') await this.hooks.afterWrite?.(event, won.has(event.data.deploymentId));
      },
    });
    const [planned] = plan.events;
    if (planned === undefined) throw new Error(`the plan of one event has none (${event.eventId})`);
    const verdict = verdictOf(planned, plan, report);
    switch (verdict.kind) {
      case 'settled':
        return { result: verdict.result, handoff: report.handoff };
      case 'failed':
        throw verdict.error;
      case 'redo':
        throw new VersionCheckLost(); // and nothing was written: everything hangs on the deployment's row
      case 'claimed_elsewhere':
        return { result: await this.claimedElsewhere(s, event), handoff: null };
    }
  }

  /**
   * The one way transitions are written, a lone event's and a batch's alike: one snapshot read, the planner's
   * decisions and, when they write anything, the one write statement (with `hooks` around it).
   */
  private async readDecideWrite(
    s: Session,
    events: readonly PreparedEvent[],
    traced: Context | null,
    hooks: { readonly before: (plan: BatchPlan) => unknown; readonly after?: (plan: BatchPlan, report: WriteReport) => Promise<void> },
  ): Promise<{ readonly plan: BatchPlan; readonly report: WriteReport }> {
    const keys = snapshotKeys(events);
    const read = () => s.run(TRANSITION_SQL.snapshot, transitionSnapshotParams(keys));
    const snapshot = (await inSpan('sql snapshot', traced, read)).rows[0];
    if (snapshot === undefined) throw new Error('the snapshot returned no row');
    const plan = planBatch(events, snapshot, this.now());
    if (!writesAnything(plan.write)) return { plan, report: writeReportOf(null) };
    await hooks.before(plan);
    const params = transitionWriteParams(plan.write, this.wakeup.wantsHandoff());
    const row = (await inSpan('sql write', traced, () => s.run(TRANSITION_SQL.write, params))).rows[0];
    if (row === undefined) throw new Error('the write returned no row');
    const report = writeReportOf(row);
    await hooks.after?.(plan, report);
    return { plan, report };
  }

  /**
   * The eventId was claimed by a delivery that committed first (two deliveries raced from one snapshot): a
   * duplicate, saying what that delivery did, or a different event's id.
   */
  private async claimedElsewhere(s: Session, event: LifecycleEvent): Promise<ApplyResult> {
    const held = (await s.run(TRANSITION_SQL.claimedBy, [event.eventId])).rows[0];
    if (held === undefined) {
      // the claim aged out of processed_events (7 days) between our conflict and this read: processed, long ago
      return { eventId: event.eventId, deploymentId: event.data.deploymentId, outcome: 'noop', reason: 'duplicate_event' };
    }
    if (!sameEvent(event, held.event_name, held.deployment_id, held.payload_sha256)) {
      return eventIdConflict(event, held.event_name, held.deployment_id);
    }
    return duplicateOf(event, held);
  }
}

function settle<T>(promise: Promise<T>): Promise<PromiseSettledResult<T>> {
  return promise.then(
    (value) => ({ status: 'fulfilled', value }),
    (reason: unknown) => ({ status: 'rejected', reason }),
  );
}

function pgCode(err: unknown): unknown {
  if (typeof err !== 'object' || err === null) return undefined;
  return (err as { code?: unknown }).code;
}

/**
 * A batch write that failed on its data (a constraint, a deadlock, a serialization failure) or on something
 * unforeseen is redone one event at a time; one that failed on the connection or the server fails every event
 * with that error, for the worker's retries.
 */
function fallsBackOneByOne(err: unknown): boolean {
  const code = pgCode(err);
  if (typeof code === 'string' && (code.startsWith('23') || code.startsWith('40'))) return true;
  return !isTransient(err);
}
