/**
 * The accounting after the drain: what became of every event the generator intended, whether every deployment
 * ended where its script says, and the history checker over the database and the stream.
 */
import { createDataSource } from '../ormconfig';
import { jobIdFor } from '../src/queues/producer';
import type { AuditConsumer } from './audit';
import type { Fleet } from './fleet';
import { checkHistory, type HistoryReport, type SentEvent } from './history-checker';
import type { Tracked } from './sender';
import type { Script } from './workload';

export interface EventCounts {
  readonly applied: number;
  readonly noop: number;
  readonly rejected: number;
  readonly lost: number;
  readonly wrongOutcome: number;
}

/** Examples of what went wrong, at most 20. */
export class Samples {
  readonly list: string[] = [];
  add(line: () => string): void {
    if (this.list.length < 20) this.list.push(line());
  }
}

/**
 * Every intended event: decided (applied or noop) when processed_events has it, else rejected when its job failed
 * with the expected code (as the job says, or as a barrier saw it), else lost.
 */
export async function countEvents(
  fleet: Fleet,
  sent: ReadonlyMap<string, Tracked>,
  rejectionsSeen: ReadonlyMap<string, string>,
  samples: Samples,
): Promise<EventCounts> {
  const processed = new Map(
    (await fleet.pool.query<{ event_id: string; outcome: string }>(`SELECT event_id, outcome FROM processed_events`)).rows.map((r) => [
      r.event_id,
      r.outcome,
    ]),
  );
  const n = { applied: 0, noop: 0, rejected: 0, lost: 0, wrongOutcome: 0 };
  for (const [eventId, event] of sent) {
    const outcome = processed.get(eventId);
    if (outcome !== undefined) {
      if (event.expect.kind === 'rejected') n.wrongOutcome++;
      if (outcome === 'applied') n.applied++;
      else n.noop++;
      continue;
    }
    const job = await fleet.producer.queue.getJob(jobIdFor(eventId));
    const seen = rejectionsSeen.get(eventId);
    const state = job === undefined ? (seen === undefined ? 'missing' : 'failed') : await job.getState();
    const reason = job?.failedReason ?? seen ?? '';
    if (event.expect.kind === 'rejected' && state === 'failed' && reason.startsWith(`${event.expect.code}:`)) {
      n.rejected++;
      continue;
    }
    if (state === 'failed') n.wrongOutcome++;
    n.lost++;
    samples.add(() => `${eventId} ${event.name} ${event.data.deploymentId}: job ${state}${reason === '' ? '' : ` (${reason})`}`);
  }
  return n;
}

/** Deployments not in the state and current attempt their script ends in. */
export async function countWrongFinalStates(fleet: Fleet, scripts: readonly Script[], samples: Samples): Promise<number> {
  const { rows: finals } = await fleet.pool.query<{ id: string; state: string; current_attempt_id: string | null }>(
    `SELECT id, state, current_attempt_id FROM deployments`,
  );
  const finalById = new Map(finals.map((r) => [r.id, r]));
  let wrong = 0;
  for (const script of scripts) {
    const row = finalById.get(script.deploymentId);
    if (row === undefined || row.state !== script.final.state || row.current_attempt_id !== script.final.currentAttemptId) {
      wrong++;
      samples.add(
        () =>
          `${script.deploymentId}: ended ${row === undefined ? 'absent' : `${row.state}/${String(row.current_attempt_id)}`}, script says ${script.final.state}/${String(script.final.currentAttemptId)}`,
      );
    }
  }
  return wrong;
}

/** The history checker over the whole database, the stream (with the entries the audit read) and what was sent. */
export async function checkRunHistory(fleet: Fleet, sent: ReadonlyMap<string, Tracked>, audit: AuditConsumer): Promise<HistoryReport> {
  const checkDs = createDataSource({ url: fleet.databaseUrl, poolSize: 2, applicationName: 'lifecycle-fleet-chaos-check' });
  await checkDs.initialize();
  try {
    const events = new Map<string, SentEvent>([...sent].map(([id, e]) => [id, { name: e.name, data: e.data }]));
    return await checkHistory({
      dataSource: checkDs,
      stream: { redis: fleet.admin, key: fleet.streamKey, before: audit.entries },
      events,
      maxViolations: 20,
    });
  } finally {
    await checkDs.destroy();
  }
}
