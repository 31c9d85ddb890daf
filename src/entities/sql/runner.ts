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
 * A session on a pg client (the relay's dedicated connection, or a pooled one). `logQuery`, when given, sees every
 * statement before it runs: the pool's sessions pass TypeORM's logger, so its `logging` option covers them too.
 */
export function sessionOf(client: ClientBase, logQuery?: (text: string, params: unknown[]) => void): Session {
  return {
    async run<Row>(statement: Statement<Row>, params: readonly unknown[] = []): Promise<Result<Row>> {
      logQuery?.(statement.text, [...params]);
      // unnamed: the simple protocol without parameters (pg's rule), else the unnamed statement, planned per call
      const result =
        statement.name === ''
          ? await client.query({ text: statement.text, values: [...params] })
          : await client.query({ name: statement.name, text: statement.text, values: [...params] });
      return { rows: result.rows as Row[], affected: result.rowCount ?? 0 };
    },
  };
}

export class Database implements Session {
  constructor(readonly dataSource: DataSource) {}

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
        sessionOf(client, (text, params) => {
          logger.logQuery(text, params, q);
        }),
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
