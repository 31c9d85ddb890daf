/**
 * The services the tests run against: `REDIS_URL` and `DATABASE_URL`, set by `npm test`'s runner
 * (dev/with-services.ts) when it starts local ones, or by the caller for existing ones.
 */
export function testEnv(): { redisUrl: string; databaseUrl: string } {
  const redisUrl = process.env.REDIS_URL;
  const databaseUrl = process.env.DATABASE_URL;
  if (redisUrl === undefined || databaseUrl === undefined) {
    throw new Error('REDIS_URL and DATABASE_URL must be set: run the tests with `npm test`');
  }
  return { redisUrl, databaseUrl };
}
