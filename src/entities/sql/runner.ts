/**
 * The one way the product runs SQL: named prepared statements on a pg connection. Each statement is parsed and
 * planned once per connection instead of on every call, which bench/ measured to be about 40% of PostgreSQL's CPU
 * per transition. TypeORM's `query` has no prepared statements, so the runner talks to the pool's pg client
 * directly (a TypeORM query runner's connection is that client); the relay's dedicated session is a pg client too.
 * The stamp flush's batch statements are the exception, planned per call (`plannedPerCall` in statement.ts).
 *
 * - `Session`: one connection; run statements on it (for LISTEN, advisory locks and transactions).
 * - `Database`: the pool; `run` borrows a connection for one statement, `session` for a few, `transaction` for a
 *   READ COMMITTED transaction.
 */
import type { ClientBase, PoolClient } from 'pg';
import type { DataSource } from 'typeorm';
import { isLockConflict } from '../../errors';
import type { Logger } from '../../log';
import { sleep } from '../../util';
import { plain, type Statement } from './statement';

export interface Result<Row> {
  readonly rows: Row[];
  /** rows inserted, updated or deleted (or returned, for a SELECT) */
  readonly affected: number;
}

export interface Session {
  run<Row>(statement: Statement<Row>, params?: readonly unknown[]): Promise<Result<Row>>;
}

/**
 * How much longer than the server's `statement_timeout` a pooled statement's answer is awaited. Past that the server
 * is not there to enforce its limit (its host died or was cut off without closing the connection, a failover moved
 * the address away from it): the connection is destroyed, so the statement fails as an outage (`Connection
 * terminated`, retried like one) and the pool drops the connection, instead of holding its job (and its worker
 * slot) until TCP gives up, which can take minutes after a partition heals.
 */
export const ANSWER_MARGIN_MS = 5000;

/**
 * A session on a pg client (the relay's dedicated connection, or a pooled one). `logQuery`, when given, sees every
 * statement before it runs: the pool's sessions pass TypeORM's logger, so its `logging` option covers them too.
 * `deadlineMs` > 0: a statement not answered within it destroys the connection (`ANSWER_MARGIN_MS`).
 */
export function sessionOf(client: ClientBase, logQuery?: (text: string, params: unknown[]) => void, deadlineMs = 0): Session {
  return {
    async run<Row>(statement: Statement<Row>, params: readonly unknown[] = []): Promise<Result<Row>> {
      logQuery?.(statement.text, [...params]);
      // unnamed: the simple protocol without parameters (pg's rule), else the unnamed statement, planned per call
      const query =
        statement.name === ''
          ? client.query({ text: statement.text, values: [...params] })
          : client.query({ name: statement.name, text: statement.text, values: [...params] });
      const result = deadlineMs > 0 ? await answeredWithin(client, query, deadlineMs) : await query;
      return { rows: result.rows as Row[], affected: result.rowCount ?? 0 };
    },
  };
}

/** `query`'s answer; when none comes within `ms`, the client's connection is destroyed (and `query` fails with it). */
async function answeredWithin<T>(client: ClientBase, query: Promise<T>, ms: number): Promise<T> {
  const timer = setTimeout(() => {
    (client as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream?.destroy();
  }, ms);
  try {
    return await query;
  } finally {
    clearTimeout(timer);
  }
}

/** The pool's statement deadline: its `statement_timeout` plus `ANSWER_MARGIN_MS` (0: none, with no timeout). */
function deadlineOf(dataSource: DataSource): number {
  const timeout = Number((dataSource.options as { extra?: { statement_timeout?: unknown } }).extra?.statement_timeout ?? 0);
  return Number.isFinite(timeout) && timeout > 0 ? timeout + ANSWER_MARGIN_MS : 0;
}

export class Database implements Session {
  private readonly deadlineMs: number;

  constructor(readonly dataSource: DataSource) {
    this.deadlineMs = deadlineOf(dataSource);
  }

  /** Runs one statement on a pooled connection (autocommit: the statement is its own transaction). */
  async run<Row>(statement: Statement<Row>, params: readonly unknown[] = []): Promise<Result<Row>> {
    return this.session((s) => s.run(statement, params));
  }

  /** Runs `fn` with one pooled connection, released afterwards (statements autocommit). */
  async session<T>(fn: (session: Session) => Promise<T>): Promise<T> {
    const q = this.dataSource.createQueryRunner();
    try {
      const client = (await q.connect()) as PoolClient;
      const logger = this.dataSource.logger;
      return await fn(
        sessionOf(
          client,
          (text, params) => {
            logger.logQuery(text, params, q);
          },
          this.deadlineMs,
        ),
      );
    } finally {
      await q.release();
    }
  }

  /**
   * Runs `fn` in a READ COMMITTED transaction on a connection of its own. The isolation level is set by the BEGIN
   * itself (one round trip; TypeORM's startTransaction(level) spends two), and is explicit so that a server whose
   * default_transaction_isolation differs does not change how the version check behaves.
   */
  async transaction<T>(fn: (session: Session) => Promise<T>): Promise<T> {
    return this.session(async (s) => {
      await s.run(BEGIN);
      try {
        const result = await fn(s);
        await s.run(COMMIT);
        return result;
      } catch (err) {
        await s.run(ROLLBACK).catch(() => undefined);
        throw err;
      }
    });
  }
}

const BEGIN = plain('BEGIN ISOLATION LEVEL READ COMMITTED');
const COMMIT = plain('COMMIT');
const ROLLBACK = plain('ROLLBACK');

/** How `retryLockConflicts` runs its work again. */
export interface LockConflictRetry {
  /** what the work is, for the log line (`the heartbeat flush`) */
  readonly what: string;
  readonly log: Logger;
  /** more fields for the log line (the event's or the shard's ids) */
  readonly context?: Readonly<Record<string, unknown>>;
  /** runs in all, the first included (default 3) */
  readonly tries?: number;
}

/**
 * Runs `work` again when PostgreSQL aborted it for a lock conflict (`isLockConflict`: a deadlock it broke, or a
 * serialization failure), up to `tries` runs in all, after a short random pause in which the other side finishes.
 * Only for work that such an abort undoes whole: one autocommit statement, or one transaction. Each retry is a warn
 * line. The one lock order (lock-order.ts) leaves no row-lock cycle among the writers of deployments and attempts;
 * waits outside it (a claim INSERT on an uncommitted duplicate, ON CONFLICT, the one-event path's FOR UPDATE) can
 * still take part in a deadlock, so this retry is a safety net. The last failure is thrown; it is still no outage
 * (`isLockConflict`).
 */
export async function retryLockConflicts<T>(work: () => Promise<T>, retry: LockConflictRetry): Promise<T> {
  const tries = retry.tries ?? 3;
  for (let run = 1; ; run++) {
    try {
      return await work();
    } catch (err) {
      if (!isLockConflict(err) || run >= tries) throw err;
      const code = (err as { code?: unknown }).code;
      retry.log.warn({ ...retry.context, what: retry.what, code, run, tries }, 'lock conflict: running it again');
      await sleep(Math.random() * 10 * 2 ** run);
    }
  }
}
