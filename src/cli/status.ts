import type { DataSource } from 'typeorm';
import { getDeployment, listTransitions, type DeploymentView, type TransitionView } from '../services/read-model/views';
import { printable } from '../util';

export interface DeploymentStatus {
  readonly deployment: DeploymentView;
  readonly recentTransitions: readonly TransitionView[];
  /** the same, as lines for a terminal (stored text with its control characters escaped) */
  readonly text: string;
}

/** A deployment with its current attempt and its last ten transitions; null when absent. */
export async function readDeploymentStatus(ds: DataSource, id: string): Promise<DeploymentStatus | null> {
  const deployment = await getDeployment(ds, id);
  if (deployment === null) return null;
  const recentTransitions = await listTransitions(ds, id, Math.max(0, deployment.version - 10));
  const a = deployment.currentAttempt;
  const lines = [
    `${deployment.name} (${deployment.id})`,
    `  state     ${deployment.state} (version ${deployment.version}, since ${deployment.stateChangedAt})`,
    `  endpoint  ${deployment.endpoint === null ? '-' : `${deployment.endpoint.url} [${deployment.endpoint.kind}]`}`,
    `  ready at  ${deployment.lastReadyAt ?? '-'}`,
    `  attempt   ${a === null ? '-' : `#${a.number} ${a.id} ${a.status}${a.reason === null ? '' : ` (${a.reason})`}`}`,
    '  history',
    ...recentTransitions.map((t) => `    v${t.version}  ${t.at}  ${t.from ?? '(new)'} -> ${t.to}  ${t.reason}  [${t.eventId}]`),
  ];
  // each line on its own: a stored newline is escaped, never a line of its own
  return { deployment, recentTransitions, text: `${lines.map((line) => printable(line)).join('\n')}\n` };
}
