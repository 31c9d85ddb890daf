/**
 * The project's error classes: few, each with a stable `code` and readonly context. Workers and the HTTP layer
 * map them to BullMQ and HTTP semantics in one place each.
 */

export abstract class FleetError extends Error {
  abstract readonly code: string;
  /** true when trying the same thing later may succeed */
  abstract readonly retryable: boolean;
}

/** The environment is invalid; lists every problem at once. */
export class ConfigError extends FleetError {
  readonly code = 'invalid_config';
  readonly retryable = false;
  constructor(readonly problems: readonly string[]) {
    super(`invalid configuration:\n  - ${problems.join('\n  - ')}`);
    this.name = 'ConfigError';
  }
}

export interface FieldIssue {
  /** dotted path of the offending field, `(root)` for the payload itself */
  readonly field: string;
  /** the rule it broke, in words */
  readonly rule: string;
}

/** An event or payload that can never be applied: unknown name, wrong shape. Never retried. */
export class ValidationError extends FleetError {
  readonly retryable = false;
  constructor(
    readonly code: 'invalid_payload' | 'unknown_event',
    readonly issues: readonly FieldIssue[],
  ) {
    super(`${code}: ${issues.map((i) => `${i.field}: ${i.rule}`).join('; ')}`);
    this.name = 'ValidationError';
  }
}

/**
 * An eventId (so a BullMQ jobId) already belongs to a different event: another event name, or another payload.
 * The new event was not enqueued; nothing changed. Send it with an eventId of its own.
 */
export class EventIdConflictError extends FleetError {
  readonly code = 'event_id_conflict';
  readonly retryable = false;
  constructor(
    readonly eventId: string,
    /** what holds the id: the earlier job's event name and its BullMQ state */
    readonly existing: { readonly name: string; readonly state: string },
    readonly differs: 'name' | 'payload',
  ) {
    super(
      `event_id_conflict: eventId "${eventId}" is already taken by a ${existing.name} job (${existing.state})` +
        (differs === 'payload' ? ' with a different payload' : '') +
        '; this event was not enqueued: give it an eventId of its own',
    );
    this.name = 'EventIdConflictError';
  }
}

/** What the event names does not exist yet (its create may still be in flight). Retried with backoff. */
export class NotYetError extends FleetError {
  readonly retryable = true;
  constructor(
    readonly code: 'deployment_not_found' | 'attempt_not_found',
    readonly deploymentId: string,
    readonly attemptId?: string,
  ) {
    super(
      code === 'deployment_not_found'
        ? `deployment_not_found: deployment ${deploymentId} does not exist (yet)`
        : `attempt_not_found: deployment ${deploymentId} has no attempt ${attemptId ?? ''} (yet)`,
    );
    this.name = 'NotYetError';
  }
}

/** Concurrent writers kept winning the version check; every bounded in-process retry lost. Retried later. */
export class ConflictError extends FleetError {
  readonly code = 'version_conflict';
  readonly retryable = true;
  constructor(
    readonly deploymentId: string,
    readonly tries: number,
  ) {
    super(`version_conflict: deployment ${deploymentId} changed under ${tries} consecutive tries`);
    this.name = 'ConflictError';
  }
}

/**
 * A durable enqueue (`durable` in the SDK, FLEET_DURABLE_ENQUEUE at the HTTP intake) whose job did not reach the
 * asked number of replicas in time (Redis `WAIT`). The job IS on the master: it is not lost unless the master fails
 * before a replica has it. Retrying with the same eventId is safe (the job id is the eventId): it adds nothing, and
 * waits for the replicas again.
 */
export class DurabilityError extends FleetError {
  readonly code = 'not_durable';
  readonly retryable = true;
  constructor(
    readonly eventId: string,
    readonly replicas: number,
    readonly acknowledged: number,
    readonly timeoutMs: number,
  ) {
    super(
      `not_durable: event ${eventId} is on the Redis master but reached ${acknowledged} of ${replicas} replica(s) within ${timeoutMs} ms; ` +
        'it may be lost if the master fails now: retry with the same eventId',
    );
    this.name = 'DurabilityError';
  }
}

/**
 * A stream consumer's position is older than what the stream still holds (like a Kubernetes watch's 410 Gone):
 * entries were trimmed before it read them. Resync from the history API, then start again from `$`.
 */
export class ResyncRequiredError extends FleetError {
  readonly code = 'resync_required';
  readonly retryable = false;
  readonly hint = 'GET /api/deployments/:id/transitions?afterVersion=<last version you have>';
  constructor(
    readonly streamKey: string,
    readonly from: string,
    readonly firstRetained: string,
    /** the last version the consumer handled per deployment before it stopped: where each resync starts */
    readonly lastVersions: ReadonlyMap<string, number> = new Map(),
  ) {
    super(
      `resync_required: ${streamKey} no longer holds the entries after ${from} (it now starts at ${firstRetained}); ` +
        'read GET /api/deployments/:id/transitions?afterVersion=<last version you have>, then consume from $',
    );
    this.name = 'ResyncRequiredError';
  }
}

/**
 * A start a stream reader without a group cannot take (`fleet tail --from`, a watch's `after` or `Last-Event-ID`): a
 * malformed cursor (`bad_cursor`), or one of a layout it cannot follow from (`repartitioned`: the stream was
 * repartitioned since in a way its entries cannot be read in each deployment's order from there).
 */
export class CursorError extends FleetError {
  readonly code = 'cursor_refused';
  readonly retryable = false;
  constructor(
    readonly reason: 'bad_cursor' | 'repartitioned',
    message: string,
  ) {
    super(message);
    this.name = 'CursorError';
  }
}

/**
 * The stream was repartitioned more than once between two of a reader's looks (a reader without a group: `fleet
 * tail`, the watch's): the entries of the layouts in between cannot be read in each deployment's order any more.
 */
export class LayoutMissedError extends FleetError {
  readonly code = 'layout_missed';
  readonly retryable = false;
  constructor(
    readonly streamKey: string,
    readonly missed: number,
    reader: string,
  ) {
    super(
      `the stream ${streamKey} was repartitioned ${missed} times since ${reader} last looked: the entries of the layouts in between cannot be read in each deployment's order; start it again`,
    );
    this.name = 'LayoutMissedError';
  }
}

const TRANSIENT_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENOTFOUND',
  'EAI_AGAIN',
  // PostgreSQL SQLSTATEs: connection exceptions, shutdown, serialization, deadlock, too many connections,
  // statement timeout (57014), idle-in-transaction timeout (25P03) and a read-only server (25006)
  '08000',
  '08001',
  '08003',
  '08004',
  '08006',
  '08P01',
  '57P01',
  '57P02',
  '57P03',
  '40001',
  '40P01',
  '53300',
  '57014',
  '25P03',
  // read_only_sql_transaction: a write that reached a server in recovery or read-only (a standby, or a demoted
  // primary, left behind the URL for a while after a failover): the event is fine, the server is the wrong one for now
  '25006',
]);

/** PostgreSQL's SQLSTATEs for a conflict it broke by aborting one side: deadlock_detected, serialization_failure. */
const LOCK_CONFLICT_CODES: ReadonlySet<string> = new Set(['40P01', '40001']);

/**
 * True when PostgreSQL aborted the statement (or its transaction) to break a lock conflict: a deadlock it detected
 * (40P01) or a serialization failure (40001). The server is there and answered; what failed was undone whole, and
 * doing it again normally succeeds. Retryable (`isTransient`), but never an outage: the writes retry it in-process
 * (`retryLockConflicts`, src/entities/sql/runner.ts) and nothing reports it as a server away.
 */
export function isLockConflict(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false;
  const e = err as { code?: unknown; driverError?: { code?: unknown }; cause?: unknown };
  const code = e.code ?? e.driverError?.code;
  if (typeof code === 'string' && LOCK_CONFLICT_CODES.has(code)) return true;
  return e.cause !== undefined && e.cause !== err && isLockConflict(e.cause);
}

/**
 * True when an error from PostgreSQL, Redis or the network means "try again later" rather than "this can never
 * work". Unknown errors are not transient: a bug must surface, not loop.
 */
export function isTransient(err: unknown): boolean {
  if (err instanceof FleetError) return err.retryable;
  if (!(err instanceof Error)) return false;
  // TypeORM releases a query runner whose connection failed; the next statement on it reports this instead
  if (err.name === 'QueryRunnerAlreadyReleasedError') return true;
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'string' && TRANSIENT_CODES.has(code)) return true;
  const message = err.message;
  return (
    /Command timed out|Connection terminated|connection is closed|Connection is closed|terminating connection|timeout exceeded when trying to connect|Client has encountered a connection error|the database system is (starting up|shutting down|in recovery)|Stream isn't writeable|MaxRetriesPerRequestError|Reached the max retries per request|None of startup nodes is available|Failed to refresh slots cache|Cluster isn't ready|Too many Cluster redirections|^CLUSTERDOWN|^TRYAGAIN|^LOADING|^READONLY|^MASTERDOWN/i.test(
      message,
    ) ||
    (err.cause !== undefined && err.cause !== err && isTransient(err.cause))
  );
}

/**
 * The database's schema is newer than this version of the fleet can run against: a newer release contracted it and
 * says so (`fleet_schema_requires()` names a migration this version does not know). `fleet worker`, `fleet http`
 * and `fleet start` exit with code 6 (docs/contract.md, "Exit codes"): upgrade this process to the newer release.
 */
export class SchemaTooNewError extends FleetError {
  readonly code = 'schema_too_new';
  readonly retryable = false;
  constructor(
    /** the migration the schema requires its readers to know */
    readonly requires: string,
    /** the newest migration this version knows */
    readonly newestKnown: string,
  ) {
    super(
      `the database schema is newer than this version of lifecycle-fleet supports: it requires migration ${requires}, ` +
        `and this version knows migrations up to ${newestKnown}; run the newer release`,
    );
    this.name = 'SchemaTooNewError';
  }
}
