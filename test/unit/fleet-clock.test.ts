import { expect } from 'chai';
import { FleetClock, type RedisTimeSource } from '../../src/queues/fleet-clock';

/** A Redis whose TIME the test scripts: each call takes `roundTripMs` of local time and answers `redisMs`. */
class ScriptedRedis implements RedisTimeSource {
  localMs = 1_000_000;
  redisAheadMs = 0;
  roundTripMs = 2;
  away = false;
  calls = 0;
  readonly local = (): number => this.localMs;

  async time(): Promise<Array<number | string>> {
    this.calls++;
    if (this.away) throw new Error('Connection is closed.');
    // the server reads its clock halfway through the round trip
    this.localMs += this.roundTripMs / 2;
    const redisMs = this.localMs + this.redisAheadMs;
    this.localMs += this.roundTripMs / 2;
    return [String(Math.floor(redisMs / 1000)), String(Math.round((redisMs % 1000) * 1000))];
  }
}

describe('FleetClock: Redis time, estimated from TIME', () => {
  it('reports local time plus the offset to Redis, from the round trip\'s midpoint', async () => {
    const redis = new ScriptedRedis();
    redis.redisAheadMs = 300_000;
    redis.roundTripMs = 40;
    const clock = new FleetClock({ redis, local: redis.local });
    await clock.start();
    clock.close();
    expect(clock.offset).to.be.closeTo(300_000, 1);
    expect(clock.now().getTime()).to.be.closeTo(redis.localMs + 300_000, 1);
  });

  it('keeps the sample with the smallest round trip of the last few', async () => {
    const redis = new ScriptedRedis();
    const clock = new FleetClock({ redis, local: redis.local, keep: 3 });
    redis.roundTripMs = 4;
    redis.redisAheadMs = -120_000;
    await clock.sample();
    // a slow round trip that disagrees by 450 ms: its midpoint is less certain, so the tight sample stays in use
    redis.roundTripMs = 1800;
    redis.redisAheadMs = -120_000 + 450;
    await clock.sample();
    expect(clock.offset).to.be.closeTo(-120_000, 1);
    // the tight sample ages out after `keep` newer ones
    redis.roundTripMs = 10;
    redis.redisAheadMs = -119_000;
    await clock.sample();
    await clock.sample();
    await clock.sample();
    expect(clock.offset).to.be.closeTo(-119_000, 1);
  });

  it('never goes backwards, even when a sample moves the offset back', async () => {
    const redis = new ScriptedRedis();
    const clock = new FleetClock({ redis, local: redis.local, keep: 1 });
    redis.redisAheadMs = 5000;
    await clock.sample();
    const before = clock.now().getTime();
    redis.redisAheadMs = 3000; // 2 s back
    await clock.sample();
    expect(clock.now().getTime()).to.equal(before);
    redis.localMs += 1000;
    expect(clock.now().getTime(), 'held still until the new offset catches up').to.equal(before);
    redis.localMs += 1500;
    expect(clock.now().getTime()).to.be.greaterThan(before);
  });

  it('fails the start with Redis\'s error when Redis does not answer, like every component', async () => {
    const redis = new ScriptedRedis();
    redis.away = true;
    const clock = new FleetClock({ redis, local: redis.local });
    let failed: unknown = null;
    await clock.start(5).catch((err: unknown) => (failed = err));
    expect((failed as Error | null)?.message).to.equal('Connection is closed.');
    expect(clock.offset).to.equal(null);
  });

  it('keeps the last offset while Redis does not answer', async () => {
    const redis = new ScriptedRedis();
    redis.redisAheadMs = 60_000;
    const clock = new FleetClock({ redis, local: redis.local });
    await clock.start();
    expect(clock.offset).to.be.closeTo(60_000, 1);
    redis.away = true;
    redis.redisAheadMs = 0;
    expect(await clock.sample()).to.equal(false);
    expect(clock.offset).to.be.closeTo(60_000, 1);
    redis.localMs += 10_000;
    expect(clock.now().getTime()).to.be.closeTo(redis.localMs + 60_000, 1);
    clock.close();
  });

  it('start() asks again while the answers are too slow to trust, and close() ends that wait', async () => {
    const redis = new ScriptedRedis();
    redis.roundTripMs = 5000;
    const clock = new FleetClock({ redis, local: redis.local });
    let started = false;
    const starting = clock.start(5).then(() => (started = true));
    await new Promise((resolve) => setTimeout(resolve, 30));
    expect(started, 'no time before the first trusted sample').to.equal(false);
    expect(redis.calls).to.be.greaterThan(1);
    expect(clock.offset).to.equal(null);
    clock.close();
    await starting;
    expect(clock.offset).to.equal(null);
  });
});
