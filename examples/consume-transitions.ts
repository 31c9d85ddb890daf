/**
 * A service that reacts to deployment transitions through a consumer group.
 *
 *   REDIS_URL=redis://127.0.0.1:6379 node dist/examples/consume-transitions.js [group] [consumer]
 *
 * Run two of them with the same group and different consumer names: each transition is handled by one of them;
 * kill one with SIGKILL and the other claims what it had read but not acknowledged (after 30 s idle).
 */
import { ResyncRequiredError, TransitionConsumer } from '../src/client'; // lifecycle-fleet/client, as a service imports it

const redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const prefix = process.env.FLEET_PREFIX ?? 'fleet';
const [group = 'example', consumerName = `example-${process.pid}`] = process.argv.slice(2);

const consumer = new TransitionConsumer({
  redis: redisUrl,
  streamKey: `${prefix}:transitions`,
  group,
  consumer: consumerName,
  startId: '$', // a new group sees only new transitions; '0' replays what the stream retains
  handler: async (t) => {
    // Acknowledged only when this returns; throwing retries the same entry (order per deployment holds).
    console.log(`${t.deploymentId} v${t.version}: ${t.from || '(new)'} -> ${t.to} (${t.reason})`);
  },
});

process.once('SIGINT', () => void consumer.close());
process.once('SIGTERM', () => void consumer.close());

consumer.run().catch((err: unknown) => {
  if (err instanceof ResyncRequiredError) {
    // The group fell behind the stream's retention: read what was missed from the history API, then restart.
    console.error(err.message);
    process.exitCode = 3;
    return;
  }
  console.error(err);
  process.exitCode = 1;
});
