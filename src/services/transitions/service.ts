/**
 * The transition service: load a consistent snapshot, let the pure machine decide, and write the decision
 * atomically (docs/architecture.md, "Optimistic locking, idempotency, the outbox") in ONE statement:
 *
 *   version-checked UPDATE of the deployment -> processed_events row (the eventId's claim) -> attempt rows ->
 *   state_transitions row -> outbox row
 *
 * (the statement is built in src/entities/sql/transitions.ts). A statement is atomic on its own, so the optimistic
 * first try is two round trips: the snapshot read and the write, no transaction around them (bench/ found
 * PostgreSQL's and the worker's CPU per transition to go mostly to per-statement overhead). Zero rows from the
 * version check means a concurrent writer won, and nothing was written: reload, decide again, now holding the
 * deployment's row lock in a transaction, with bounded retries and jitter. An eventId already claimed by another
 * delivery makes the whole statement fail on the claim's primary key, so nothing of it stays, and the event is a
 * duplicate. Noops record the eventId and write nothing else; rejections write nothing at all. Stamps (heartbeat,
 * readiness) are apart, in stamps.ts; the relay wake-up after a commit in relay-wakeup.ts.
 */
import type { DataSource } from 'typeorm';
import { context as activeContext, type Context } from '@opentelemetry/api';
import { ConflictError, isLockConflict, isTransient, NotYetError } from '../../errors';
import {
  BATCH_SQL,
  batchWriteParams,
  Database,
  isClaimConflict,
  retryLockConflicts,
  TRANSITION_SQL,
  transitionWrite,
  type Session,
} from '../../entities/sql';
import { assertEndpointAllowed, type EndpointAllowList } from '../../events/endpoint-allow';
import { DEFAULT_ACTOR, parseEvent, payloadDigest, type LifecycleEvent } from '../../events/schemas';
import { silentLogger, type Logger } from '../../log';
import { DEFAULTS } from '../../config';
import { cutoffsAt, decide, TIME_DEPENDENT_NOOPS, type Decision, type LivenessLimits, type MachineEvent } from '../../machine';
import { sleep } from '../../util';
import { duplicateOf, eventIdConflict, sameEvent, snapshotOf, toMachineEvent, type ApplyResult, type StateEvent } from './outcomes';
import { attemptIdOf, planBatch, snapshotKeys, type PreparedEvent } from './batch-plan';
import type { StampBuffer } from '../stamp-buffer';
import { RelayWakeup, type LocalRelay } from './relay-wakeup';
import { Stamps } from './stamps';
import { inSpan } from '../../telemetry';
import { endEventTrace, startBatchTrace, startEventTrace, type EventTrace } from './tracing';

/**
 * Test hooks. They observe the production path and may delay it (to stage an interleaving) or throw (to stage a
 * failure at that point); they never switch the service onto another path.
 */
export interface TransitionHooks {
  /** after the snapshot was read and decided, before the version-checked write */
  readonly beforeUpdate?: (event: LifecycleEvent) => void | Promise<void>;
  /** after the write statement returned (on the optimistic try it has committed; on a locked retry, before COMMIT) */
  readonly afterWrite?: (event: LifecycleEvent, written: boolean) => void | Promise<void>;
  /** after a noop was decided, before its eventId's claim (the one-event path) */
  readonly beforeClaim?: (event: LifecycleEvent) => void | Promise<void>;
  /** group commit: after a batch's snapshot was read and decided, before its write (the events it decided) */
  readonly beforeBatchWrite?: (events: readonly LifecycleEvent[]) => void | Promise<void>;
}

/** One event of `applyMany`. */
export interface ApplyItem {
  readonly name: string;
  readonly data: unknown;
  readonly options?: ApplyOptions;
}

export interface ApplyOptions {
  /** used as the eventId when the payload carries none (the BullMQ jobId) */
  readonly fallbackEventId?: string;
  /**
   * when the event was produced (the job's timestamp): the time an orphan or expiry is judged as of. Stamps do not
   * use it: they record the service's clock when they are processed.
   */
  readonly producedAt?: Date;
  /**
   * The trace context the event continues (the job's, under BullMQ's worker span): the event gets a `transition
   * <name>` span under it, and its outbox row that span's `traceparent`. Default: the active context. Under no
   * span (tracing off), nothing is traced.
   */
  readonly traceContext?: Context;
}

export interface TransitionServiceOptions {
  readonly dataSource: DataSource;
  /** the clock; default `() => new Date()` */
  readonly now?: () => Date;
  /** version-check losses retried in-process before giving up with `ConflictError` (default 12) */
  readonly maxConflictRetries?: number;
  readonly logger?: Logger;
  readonly hooks?: TransitionHooks;
  /**
   * The outbox relay of this process, if it runs one: while it is the active relay, a commit wakes it directly
   * instead of with a NOTIFY (relay-wakeup.ts).
   */
  readonly relay?: LocalRelay;
  /** FLEET_ENDPOINT_ALLOW: an endpoint outside it fails the event as invalid (default: any endpoint) */
  readonly endpointAllow?: EndpointAllowList | null;
  /**
   * FLEET_ORPHAN_AFTER_S (default 90): `attempt.orphaned` applies only while the attempt's liveness is older than
   * the time the event was produced minus this (a heartbeat since makes it a noop `alive`)
   */
  readonly orphanAfterS?: number;
  /** FLEET_PROGRESS_DEADLINE_S (default 1800): likewise for `attempt.expired`, with the attempt's start (`not_due`) */
  readonly progressDeadlineS?: number;
  /**
   * The process's stamp buffer (default none: each stamp is one UPDATE). With it, heartbeat and readiness events
   * only absorb into Redis and complete as the noop `buffered`, and `attempt.orphaned` first writes the attempt's
   * buffered heartbeat to PostgreSQL, so an attempt whose latest heartbeat is still in Redis is never orphaned.
   */
  readonly stampBuffer?: StampBuffer;
}

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
    const preparing: Array<Promise<{ readonly prepared: PreparedEvent; readonly settle: (r: PromiseSettledResult<ApplyResult>) => void } | null>> = [];
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
    if (events.length === 1) return [await settle(this.transitionOne(events[0] as PreparedEvent))];
    // An eventId, and an attempt id, belong to one event and one deployment per batch: a second delivery of an
    // eventId, or another deployment naming the same attempt, waits for the next batch (decided after this one
    // has committed, as one at a time would). What waits holds back every later event that could depend on it:
    // those of its deployment, of its eventId and of its attempt.
    const now: number[] = [];
    const later: number[] = [];
    const eventIds = new Set<string>();
    const attemptOwner = new Map<string, string>();
    const held = { deployments: new Set<string>(), eventIds: new Set<string>(), attempts: new Set<string>() };
    events.forEach(({ event }, i) => {
      const deploymentId = event.data.deploymentId;
      const attemptId = attemptIdOf(event);
      const owner = attemptId === null ? undefined : attemptOwner.get(attemptId);
      if (
        held.deployments.has(deploymentId) ||
        held.eventIds.has(event.eventId) ||
        (attemptId !== null && held.attempts.has(attemptId)) ||
        eventIds.has(event.eventId) ||
        (owner !== undefined && owner !== deploymentId)
      ) {
        held.deployments.add(deploymentId);
        held.eventIds.add(event.eventId);
        if (attemptId !== null) held.attempts.add(attemptId);
        later.push(i);
        return;
      }
      eventIds.add(event.eventId);
      if (attemptId !== null) attemptOwner.set(attemptId, deploymentId);
      now.push(i);
    });
    const results = new Array<PromiseSettledResult<ApplyResult>>(events.length);
    const batch = now.map((i) => events[i] as PreparedEvent);
    const applied = batch.length === 1 ? [await settle(this.transitionOne(batch[0] as PreparedEvent))] : await this.applyBatch(batch);
    applied.forEach((r, k) => (results[now[k] as number] = r));
    if (later.length > 0) {
      (await this.applyPrepared(later.map((i) => events[i] as PreparedEvent))).forEach((r, k) => (results[later[k] as number] = r));
    }
    return results;
  }

  /** One batch: snapshot, decisions, one write. Events whose deployment's write lost are redone one at a time. */
  private async applyBatch(events: readonly PreparedEvent[]): Promise<Array<PromiseSettledResult<ApplyResult>>> {
    const keys = snapshotKeys(events);
    // the batch's statements serve every event in it: they go under a span of the batch's own, linked to each event's
    const batchTrace = startBatchTrace(events.map((e) => e.trace ?? null), events.length);
    const traced = batchTrace?.context ?? null;
    let outcome;
    try {
      outcome = await this.db.session(async (s) => {
        const snapshot = (
          await inSpan('sql snapshot', traced, () => s.run(BATCH_SQL.snapshot, [keys.deployments, keys.attempts, keys.eventIds, keys.numbering]))
        ).rows[0];
        if (snapshot === undefined) throw new Error('batch snapshot returned no row');
        const plan = planBatch(events, snapshot, this.now());
        if (plan.writes.size === 0 && plan.write.noopClaims.eventId.length === 0) return { plan, row: null };
        await this.hooks.beforeBatchWrite?.(plan.events.map((p) => p.prepared.event));
        const row = (await inSpan('sql write', traced, () => s.run(BATCH_SQL.write, batchWriteParams(plan.write)))).rows[0];
        if (row === undefined) throw new Error('batch write returned no row');
        return { plan, row };
      });
    } catch (err) {
      batchTrace?.span.end();
      if (!fallsBackOneByOne(err)) return events.map(() => ({ status: 'rejected', reason: err }));
      // an eventId claimed meanwhile by another delivery (the statement failed on the claim), a lock conflict, or
      // anything unforeseen: nothing of the batch was written; each event takes the one-event path, which knows
      // how to tell each case (and surfaces a bug on the one event that has it)
      if (isLockConflict(err)) {
        const what = 'the group-commit write, one event at a time';
        this.log.warn({ what, code: pgCode(err), events: events.length }, 'lock conflict: running it again');
      } else {
        this.log[isClaimConflict(err) ? 'debug' : 'warn']({ err, events: events.length }, 'batch write failed; applying its events one at a time');
      }
      return this.oneByOne(events);
    }
    batchTrace?.span.end();
    const { plan, row } = outcome;
    const won = new Set(row?.won ?? []);
    const claimed = new Set(row?.noop_claimed ?? []);
    const transitions = row?.transitions ?? {};
    const results: Array<Promise<PromiseSettledResult<ApplyResult>> | PromiseSettledResult<ApplyResult>> = [];
    const redo: Array<{ readonly index: number; readonly prepared: PreparedEvent }> = [];
    let applied = false;
    plan.events.forEach((p, index) => {
      const deploymentId = p.prepared.event.data.deploymentId;
      if (plan.writes.has(deploymentId) && !won.has(deploymentId) && (p.dirty || p.outcome.kind === 'applied')) {
        // its deployment's version check lost to a concurrent writer: decided on what is no longer there
        redo.push({ index, prepared: p.prepared });
        results.push({ status: 'rejected', reason: new Error('redone') });
        return;
      }
      switch (p.outcome.kind) {
        case 'done':
          results.push({ status: 'fulfilled', value: p.outcome.result });
          break;
        case 'deferred':
          results.push({ status: 'rejected', reason: p.outcome.error });
          break;
        case 'noop_claim':
          results.push(
            claimed.has(p.prepared.event.eventId)
              ? { status: 'fulfilled', value: p.outcome.result }
              : settle(this.claimedElsewhere(this.db, p.prepared.event)),
          );
          break;
        case 'applied': {
          const transitionId = transitions[p.prepared.event.eventId];
          if (transitionId === undefined) throw new Error(`batch write returned no history row for ${p.prepared.event.eventId}`);
          applied = true;
          results.push({ status: 'fulfilled', value: { ...p.outcome.result, transitionId } });
          break;
        }
      }
    });
    if (applied) this.wakeup.committed();
    if (redo.length > 0) {
      this.log.debug({ events: redo.length }, 'version check lost in a batch; applying those events one at a time');
      const redone = await this.oneByOne(redo.map((r) => r.prepared));
      redo.forEach((r, k) => (results[r.index] = redone[k] as PromiseSettledResult<ApplyResult>));
    }
    return Promise.all(results.map((r) => Promise.resolve(r)));
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

  private async transitionOne({ event, machineEvent, trace = null }: PreparedEvent): Promise<ApplyResult> {
    for (let attempt = 1; ; attempt++) {
      // Optimistic first: read, decide, write, two statements and no transaction. Once it has lost, take the
      // deployment's row lock before reading, in a transaction, so a hot deployment cannot starve one writer: the
      // version check still guards, and now it cannot lose.
      const lock = attempt > 1;
      try {
        // a lock conflict PostgreSQL broke undid the whole try (its write is one statement, or the locked retry's
        // transaction): read and decide again
        const result = await retryLockConflicts(
          () =>
            lock
              ? this.db.transaction((s) => this.decideAndWrite(s, event, machineEvent, true, trace))
              : this.db.session((s) => this.decideAndWrite(s, event, machineEvent, false, trace)),
          { what: 'the one-event write', log: this.log, context: { deploymentId: event.data.deploymentId, eventId: event.eventId } },
        );
        if (result.outcome === 'applied') this.wakeup.committed();
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

  private async decideAndWrite(
    s: Session,
    event: StateEvent,
    machineEvent: MachineEvent,
    lock: boolean,
    trace: EventTrace | null,
  ): Promise<ApplyResult> {
    const { deploymentId } = event.data;
    const attemptId = 'attemptId' in event.data ? event.data.attemptId : null;
    const base = { eventId: event.eventId, deploymentId };
    // a lone event's statements are children of its own transition span
    const traced = trace?.context ?? null;

    if (lock) await inSpan('sql lock', traced, () => s.run(TRANSITION_SQL.lockDeployment, [deploymentId]));
    const row = (await inSpan('sql snapshot', traced, () => s.run(TRANSITION_SQL.snapshot, [deploymentId, attemptId, event.eventId]))).rows[0];
    if (row === undefined) throw new Error('snapshot query returned no row');
    if (row.p_event_name !== null && !sameEvent(event, row.p_event_name, row.p_deployment_id, row.p_payload_sha256)) {
      return eventIdConflict(event, row.p_event_name, row.p_deployment_id);
    }
    if (row.p_outcome !== null) return duplicateOf(event, { outcome: row.p_outcome, reason: row.p_reason ?? '', version: row.p_version });
    if (row.a_id !== null && row.a_deployment_id !== deploymentId) {
      return { ...base, outcome: 'rejected', code: 'id_conflict', message: `attempt ${row.a_id} belongs to another deployment` };
    }

    const snapshot = snapshotOf(row);
    const now = this.now();
    const decision = decide(snapshot, machineEvent, now);
    const version = snapshot.deployment?.version ?? null;
    switch (decision.kind) {
      case 'deferred':
        throw new NotYetError(decision.why, deploymentId, attemptId ?? undefined);
      case 'rejected':
        return { ...base, outcome: 'rejected', code: decision.code, message: decision.message };
      case 'noop': {
        // a noop that only says "not yet" is no decision about the event: it stays free to apply later
        if (TIME_DEPENDENT_NOOPS.has(decision.why)) return { ...base, outcome: 'noop', reason: decision.why };
        const claim = [event.eventId, event.name, deploymentId, decision.why, version, payloadDigest(event.data), now];
        await this.hooks.beforeClaim?.(event);
        if ((await s.run(TRANSITION_SQL.claimNoop, claim)).affected !== 1) return this.claimedElsewhere(s, event);
        return { ...base, outcome: 'noop', reason: decision.why };
      }
      case 'applied':
        return this.write(s, event, attemptId, version, decision, now, trace);
    }
  }

  private async write(
    s: Session,
    event: StateEvent,
    attemptId: string | null,
    fromVersion: number | null,
    decision: Extract<Decision, { kind: 'applied' }>,
    now: Date,
    trace: EventTrace | null,
  ): Promise<ApplyResult> {
    const { deploymentId } = event.data;
    const { statement, params } = transitionWrite({
      traceparent: trace?.traceparent ?? null,
      deploymentId,
      eventId: event.eventId,
      eventName: event.name,
      ...(event.name === 'deployment.create' ? { deploymentName: event.data.name } : {}),
      attemptId,
      actor: event.data.actor ?? DEFAULT_ACTOR,
      payloadSha256: payloadDigest(event.data),
      fromVersion,
      decision,
      now,
    });
    await this.hooks.beforeUpdate?.(event);
    const row = (await inSpan('sql write', trace?.context ?? null, () => s.run(statement, params))).rows[0];
    if (row === undefined) throw new Error('transition write returned no row');
    await this.hooks.afterWrite?.(event, row.written === 1);
    if (row.written !== 1) throw new VersionCheckLost(); // and nothing was written: everything hangs on `dep`
    if (row.transition_id === null) throw new Error('state_transitions insert returned no id');
    return {
      outcome: 'applied',
      eventId: event.eventId,
      deploymentId,
      attemptId,
      from: decision.from,
      to: decision.to,
      version: (fromVersion ?? 0) + 1,
      reason: decision.reason,
      transitionId: row.transition_id,
    };
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
