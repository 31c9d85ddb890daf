/**
 * The services the tests run against: `REDIS_URL` and `DATABASE_URL`, set by `npm test`'s runner
 * (dev/with-services.ts) when it starts local ones, or by the caller for existing ones.
 */
export function testEnv(): { redisUrl: string; databaseUrl: string; adminDatabaseUrl: string } {
  const redisUrl = process.env.REDIS_URL;
  const databaseUrl = process.env.DATABASE_URL;
  if (redisUrl === undefined || databaseUrl === undefined) {
    throw new Error('REDIS_URL and DATABASE_URL must be set: run the tests with `npm test`');
  }
  // a superuser's URL for the tests that need one: the local servers' admin (the fleet's own role is no superuser),
  // else DATABASE_URL's role, which must then be one
  const adminDatabaseUrl = process.env.FLEET_TEST_ADMIN_DATABASE_URL ?? databaseUrl;
  return { redisUrl, databaseUrl, adminDatabaseUrl };
}
