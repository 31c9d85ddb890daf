/** The history checker's reading of PostgreSQL: the rows it checks, grouped, and where violations are collected. */
import type { DataSource } from 'typeorm';
import type { AttemptStatus, DeploymentState } from '../src/machine';
import type { Violation, ViolationKind } from './history-checker';

export interface DeploymentRow {
  id: string;
  name: string;
  state: DeploymentState;
  version: number;
  current_attempt_id: string | null;
}
export interface AttemptRow {
  id: string;
  deployment_id: string;
  status: AttemptStatus;
}
export interface TransitionRow {
  id: string;
  deployment_id: string;
  attempt_id: string | null;
  from_state: DeploymentState | null;
  to_state: DeploymentState;
  version: number;
  reason: string;
  event_id: string;
  created_at: Date;
}
export interface ProcessedRow {
  event_id: string;
  event_name: string;
  deployment_id: string;
  outcome: string;
  reason: string;
  version: number | null;
}

export class Collector {
  readonly counts: Partial<Record<ViolationKind, number>> = {};
  readonly list: Violation[] = [];
  constructor(private readonly max: number) {}
  add(v: Violation): void {
    this.counts[v.kind] = (this.counts[v.kind] ?? 0) + 1;
    if (this.list.length < this.max) this.list.push(v);
  }
  count(kind: ViolationKind): number {
    return this.counts[kind] ?? 0;
  }
}

export function groupBy<T>(rows: readonly T[], key: (row: T) => string): Map<string, T[]> {
  const out = new Map<string, T[]>();
  for (const row of rows) {
    const k = key(row);
    const list = out.get(k);
    if (list === undefined) out.set(k, [row]);
    else list.push(row);
  }
  return out;
}

/** Everything the checker reads from PostgreSQL, in one go, grouped by deployment. */
export interface HistoryRows {
  /** by id */
  readonly deployments: readonly DeploymentRow[];
  /** by deployment */
  readonly attempts: ReadonlyMap<string, readonly AttemptRow[]>;
  /** in (deployment, version, id) order */
  readonly allTransitions: readonly TransitionRow[];
  /** by deployment, in version order */
  readonly transitions: ReadonlyMap<string, readonly TransitionRow[]>;
  readonly allProcessed: readonly ProcessedRow[];
  readonly processedById: ReadonlyMap<string, ProcessedRow>;
  /** by deployment */
  readonly processed: ReadonlyMap<string, readonly ProcessedRow[]>;
}

/** Reads deployments, attempts, history and processed events (only of `scope`'s deployments, when given). */
export async function readHistoryRows(ds: DataSource, scope: readonly string[] | null): Promise<HistoryRows> {
  const where = (column: string) => (scope === null ? '' : `WHERE ${column} = ANY($1)`);
  const params = scope === null ? [] : [scope];
  const deployments = await ds.query<DeploymentRow[]>(
    `SELECT id, name, state, version, current_attempt_id FROM deployments ${where('id')} ORDER BY id`,
    params,
  );
  const attempts = groupBy(
    await ds.query<AttemptRow[]>(`SELECT id, deployment_id, status FROM attempts ${where('deployment_id')}`, params),
    (r) => r.deployment_id,
  );
  const allTransitions = await ds.query<TransitionRow[]>(
    `SELECT id::text AS id, deployment_id, attempt_id, from_state, to_state, version, reason, event_id, created_at
       FROM state_transitions ${where('deployment_id')} ORDER BY deployment_id, version, id`,
    params,
  );
  const allProcessed = await ds.query<ProcessedRow[]>(
    `SELECT event_id, event_name, deployment_id, outcome, reason, version FROM processed_events ${where('deployment_id')}`,
    params,
  );
  return {
    deployments,
    attempts,
    allTransitions,
    transitions: groupBy(allTransitions, (r) => r.deployment_id),
    allProcessed,
    processedById: new Map(allProcessed.map((p) => [p.event_id, p])),
    processed: groupBy(allProcessed, (r) => r.deployment_id),
  };
}
