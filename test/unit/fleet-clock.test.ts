import { expect } from 'chai';
import { FleetClock, type RedisTimeSource } from '../../src/redis/fleet-clock';

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
  it("reports local time plus the offset to Redis, from the round trip's midpoint", async () => {
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
    expect(clock.uncertaintyMs, 'half the round trip of the sample in use').to.equal(2);
    // the tight sample ages out once `keep` newer ones came (these agree with it: 3 ms apart, within 4 / 2 + 10 / 2)
    redis.roundTripMs = 10;
    redis.redisAheadMs = -120_000 + 3;
    await clock.sample();
    expect(clock.offset).to.be.closeTo(-120_000, 1);
    await clock.sample();
    expect(clock.offset).to.be.closeTo(-120_000 + 3, 1);
    expect(clock.uncertaintyMs).to.equal(5);
  });

  it('starts the samples over when a sample cannot be right together with the one in use (a clock jumped)', async () => {
    const redis = new ScriptedRedis();
    const clock = new FleetClock({ redis, local: redis.local });
    redis.roundTripMs = 2;
    for (let i = 0; i < 4; i++) await clock.sample();
    // Redis 60 s ahead, answered slowly: offset 60,000 ± 100 against 0 ± 1, so the old samples are dropped
    redis.redisAheadMs = 60_000;
    redis.roundTripMs = 200;
    await clock.sample();
    expect(clock.offset).to.be.closeTo(60_000, 1);
    // and back 60 s by a sample that still overlaps the one in use by its own round trip: no jump, the tighter stays
    redis.redisAheadMs = 60_000 - 150;
    redis.roundTripMs = 400;
    await clock.sample();
    expect(clock.offset, '150 ms apart, within 200 / 2 + 400 / 2').to.be.closeTo(60_000, 1);
    redis.redisAheadMs = 60_000 - 301;
    await clock.sample();
    expect(clock.offset, '301 ms apart, beyond 200 / 2 + 400 / 2').to.be.closeTo(60_000 - 301, 1);
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

  it("fails the start with Redis's error when Redis does not answer, like every component", async () => {
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
