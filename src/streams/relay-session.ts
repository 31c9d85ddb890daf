/**
 * The relay's one session with PostgreSQL (docs/architecture.md, "the outbox"): a dedicated connection that holds the
 * relays' advisory lock while its relay leads, LISTENs for commits and hand-over requests, and runs every statement of
 * the relay, so that a leader that lost its lock cannot go on marking rows.
 */
import { Client, type Notification } from 'pg';
import { ADMIN_SQL, OUTBOX_SQL, RELAY_LOCK_KEY, sessionOf, type Session } from '../entities/sql';
import { describeServer } from '../redis/connection';

/**
 * Opens the session: `onError` when it is lost, `onNotification` for each NOTIFY it listens to. A server that takes
 * no writes (in recovery, or read-only: a standby, or a demoted primary, behind the URL after a failover) is no place
 * to lead from, although its advisory locks work: the session is closed again and the error is PostgreSQL's own for
 * a refused write (25006, transient), for the relay to try again later.
 */
export async function connectRelaySession(
  databaseUrl: string,
  onError: (err: Error) => void,
  onNotification: (message: Notification) => void,
): Promise<Client> {
  const client = new Client({
    connectionString: databaseUrl,
    application_name: 'lifecycle-fleet-relay',
    connectionTimeoutMillis: 5000,
    // a partitioned leader must notice, and lose its session (and lock), in seconds, not at TCP's leisure
    keepAlive: true,
    keepAliveInitialDelayMillis: 5000,
    statement_timeout: 30_000,
    query_timeout: 35_000,
  });
  client.on('error', onError);
  client.on('notification', onNotification);
  await client.connect();
  try {
    if (await isReadOnly(sessionOf(client))) throw readOnlyServer(databaseUrl);
  } catch (err) {
    await client.end().catch(() => undefined);
    throw err;
  }
  return client;
}

/** The refusal of a server that takes no writes, under PostgreSQL's code for a refused write (25006): transient, as that is. */
function readOnlyServer(databaseUrl: string): Error {
  const message = `${describeServer('PostgreSQL', databaseUrl)} takes no writes (in recovery, or read-only): the outbox relay leads only from a primary`;
  return Object.assign(new Error(message), { code: '25006' });
}

/** Whether the session's server takes no writes: in recovery, or read-only. */
export async function isReadOnly(session: Session): Promise<boolean> {
  const result = await session.run(ADMIN_SQL.readOnly);
  return result.rows[0]?.read_only !== false;
}

/**
 * Tries to take the relays' lock on the session and, when it did, makes the session ready to lead: LISTEN for
 * commits, server-side keepalives, asynchronous commit of the relay's own writes. Whether this relay leads now.
 */
export async function takeRelayLock(session: Session): Promise<boolean> {
  const result = await session.run(OUTBOX_SQL.tryLock, [RELAY_LOCK_KEY]);
  if (result.rows[0]?.locked === true) {
    await session.run(OUTBOX_SQL.listen);
    // the server side notices a vanished leader too, and frees the lock for a standby
    await session.run(OUTBOX_SQL.keepalives);
    // The relay's own writes (marks, reconcile, prune) do not wait for their WAL flush: a mark lost in a
    // PostgreSQL crash only republishes its rows (duplicates are allowed; gaps are not), and the next leader
    // reconciles again. Waiting for the fsync of every mark held up the next batch by its duration.
    await session.run(OUTBOX_SQL.asyncCommit);
    return true;
  }
  return false;
}
