/**
 * `GET /api/summary` (docs/contract.md, "HTTP"): deployments per state and the ones needing a person, as of now; the
 * page at /ui starts from it and corrects its live counts with it.
 */
import type { FastifyPluginAsync } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import type { DataSource } from 'typeorm';
import { ATTENTION_LIMIT, getSummary, summaryViewSchema } from '../../services/read-model/summary';
import { answer, route, UNAVAILABLE } from '../route-options';

export interface SummaryReads {
  readonly dataSource: DataSource;
  /** the server's clock: `at`, and how far back a failure is listed */
  readonly now: () => Date;
}

export const summaryRoutes: FastifyPluginAsync<SummaryReads> = async (app, { dataSource, now }) => {
  app.withTypeProvider<ZodTypeProvider>().get(
    '/api/summary',
    route('read', {
      summary: 'Deployments per state, and those needing a person',
      description: `One read: how many deployments are in each state, and at most ${ATTENTION_LIMIT} deployments needing a person (every \`unknown\` one, and those that failed in the last 24 hours), newest first. Follow \`GET /api/watch\` from here for what changes.`,
      response: { 200: answer('the summary', summaryViewSchema), 503: UNAVAILABLE },
    }),
    async () => getSummary(dataSource, now()),
  );
};
