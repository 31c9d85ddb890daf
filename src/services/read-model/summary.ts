/**
 * The fleet at a glance (`GET /api/summary`; the page at /ui starts from it and corrects its live counts with it):
 * deployments per state, and the ones needing a person. The statement is src/entities/sql/summary.ts.
 */
import type { DataSource } from 'typeorm';
import { z } from 'zod';
import { Database, findSummary } from '../../entities/sql';
import { DEPLOYMENT_STATES } from '../../machine';

/** How far back a failure still needs a person: a day. */
export const ATTENTION_FAILED_WITHIN_MS = 24 * 60 * 60 * 1000;
/** The attention list's length at most (the counts say how many there are). */
export const ATTENTION_LIMIT = 100;

const isoTime = z.iso.datetime();

export const summaryViewSchema = z
  .object({
    counts: z
      .object(
        Object.fromEntries(DEPLOYMENT_STATES.map((s) => [s, z.number().int().min(0)])) as Record<(typeof DEPLOYMENT_STATES)[number], z.ZodNumber>,
      )
      .describe('how many deployments are in each state (every state, zero included)'),
    attention: z
      .array(
        z.object({
          deploymentId: z.uuid(),
          name: z.string(),
          state: z.enum(['unknown', 'failed']),
          since: isoTime.describe('when it entered that state'),
        }),
      )
      .describe(
        `the deployments needing a person, newest first, at most ${ATTENTION_LIMIT}: every \`unknown\` one, and those \`failed\` since \`failedSince\``,
      ),
    failedSince: isoTime.describe('`at` less a day: failures from then on are listed'),
    at: isoTime.describe("when this was read (the server's clock)"),
  })
  .meta({ id: 'Summary' });
export type SummaryView = z.output<typeof summaryViewSchema>;

/** The summary as of `now`. */
export async function getSummary(ds: DataSource, now: Date): Promise<SummaryView> {
  const failedSince = new Date(now.getTime() - ATTENTION_FAILED_WITHIN_MS);
  const { counts, attention } = await findSummary(new Database(ds), { failedSince, limit: ATTENTION_LIMIT });
  return {
    counts: { ...counts },
    attention: attention.map((a) => ({ deploymentId: a.deploymentId, name: a.name, state: a.state, since: a.since.toISOString() })),
    failedSince: failedSince.toISOString(),
    at: now.toISOString(),
  };
}
