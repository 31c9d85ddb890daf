/**
 * The fleet's one clock: Redis's. Every time the fleet writes or compares (heartbeat and readiness stamps, the
 * sweep's tick and cutoffs, probe stamps, transitions, dispatch's window check) is read from a `FleetClock`, so hosts
 * whose own clocks disagree by minutes still agree on what time it is (docs/architecture.md, "Whose clock").
 *
 * The clock estimates `offset = redisTime - localTime` from Redis's `TIME`, at the midpoint of the round trip, and
 * keeps the sample with the smallest round trip of the last few (the tightest bound on the error: at most half that
 * round trip). A sample that cannot be right together with the one in use (their offsets differ by more than half
 * their two round trips) says that a clock jumped, Redis's (a failover to a host whose clock differs) or ours: the
 * samples start over from it, so the bound holds from that sample on. It samples at start and then every `everyMs`. Local time is the process's monotonic clock anchored
 * once at start (`performance.timeOrigin + performance.now()`), so a step of the host's wall clock (NTP, an operator)
 * changes nothing until the next sample says so. `now()` never goes backwards within a process: a sample that moves
 * the offset back holds the time still until it catches up. While Redis does not answer, the last offset stays.
 */
import type { Logger } from '../log';
import { silentLogger } from '../log';

/** Redis's `TIME` reply: seconds and microseconds, as ioredis returns them. */
export interface RedisTimeSource {
  time(): Promise<Array<number | string>>;
}

export interface FleetClockOptions {
  /** where `TIME` is asked (a connection that fails fast while Redis is away, so a sample never hangs) */
  readonly redis: RedisTimeSource;
  /** between samples (default 30 s) */
  readonly everyMs?: number;
  /** samples kept; the one with the smallest round trip is used (default 5) */
  readonly keep?: number;
  /** a sample whose round trip takes longer is discarded (default 2000 ms: its midpoint could be off by 1 s) */
  readonly maxRoundTripMs?: number;
  /** the local clock, ms since the epoch (default: monotonic, anchored at process start); for tests */
  readonly local?: () => number;
  readonly logger?: Logger;
}

interface Sample {
  readonly offsetMs: number;
  readonly roundTripMs: number;
}

const monotonicLocal = () => performance.timeOrigin + performance.now();

/** Whether two samples can both be right: the intervals offset ± round trip / 2 overlap. */
function agree(a: Sample, b: Sample): boolean {
  return Math.abs(a.offsetMs - b.offsetMs) <= (a.roundTripMs + b.roundTripMs) / 2;
}

export class FleetClock {
  private readonly redis: RedisTimeSource;
  private readonly everyMs: number;
  private readonly keep: number;
  private readonly maxRoundTripMs: number;
  private readonly local: () => number;
  private readonly log: Logger;
  private samples: Sample[] = [];
  private offsetMs: number | null = null;
  private lastMs = -Infinity;
  private timer: NodeJS.Timeout | null = null;
  private closed = false;
  private away = false;

  constructor(options: FleetClockOptions) {
    this.redis = options.redis;
    this.everyMs = options.everyMs ?? 30_000;
    this.keep = Math.max(1, options.keep ?? 5);
    this.maxRoundTripMs = options.maxRoundTripMs ?? 2000;
    this.local = options.local ?? monotonicLocal;
    this.log = options.logger ?? silentLogger;
  }

  /**
   * Takes the first sample (a process cannot decide times before it knows the offset), then samples every `everyMs`
   * until `close()`. A Redis that does not answer fails the start with its error, as it fails every other
   * component's start; an answer too slow to trust is asked again after `retryMs`.
   */
  async start(retryMs = 1000): Promise<void> {
    while (!this.closed && !(await this.take())) {
      await new Promise<void>((resolve) => setTimeout(resolve, retryMs).unref());
    }
    if (this.closed || this.timer !== null) return;
    this.timer = setInterval(() => void this.sample(), this.everyMs);
    this.timer.unref();
  }

  /** The fleet's time: local time plus the offset to Redis; never earlier than a time it returned before. */
  readonly now = (): Date => {
    const ms = this.local() + (this.offsetMs ?? 0);
    if (ms > this.lastMs) this.lastMs = ms;
    return new Date(Math.floor(this.lastMs));
  };

  /** Redis's time minus this host's, ms (null before the first sample). */
  get offset(): number | null {
    return this.offsetMs;
  }

  /**
   * How far `now()` may be from Redis's time, ms: half the round trip of the sample the offset comes from (the
   * answer was made somewhere within it). Null before the first sample.
   */
  get uncertaintyMs(): number | null {
    const best = this.best();
    return best === null ? null : best.roundTripMs / 2;
  }

  /**
   * Asks Redis for its time once and folds the answer in. True when it answered in time; a failure keeps the last
   * offset (and is logged once per outage).
   */
  async sample(): Promise<boolean> {
    try {
      const taken = await this.take();
      this.away = false;
      return taken;
    } catch (err) {
      if (!this.away) this.log.warn({ reason: (err as Error).message }, 'fleet clock: Redis TIME did not answer; keeping the last offset');
      this.away = true;
      return false;
    }
  }

  /** One sample: true when folded in, false when too slow to trust; throws Redis's error. */
  private async take(): Promise<boolean> {
    const sent = this.local();
    const reply = await this.redis.time();
    const received = this.local();
    const roundTripMs = received - sent;
    if (roundTripMs > this.maxRoundTripMs) return false;
    const redisMs = Number(reply[0]) * 1000 + Number(reply[1]) / 1000;
    if (!Number.isFinite(redisMs)) return false;
    const sample: Sample = { offsetMs: redisMs - (sent + roundTripMs / 2), roundTripMs };
    const kept = this.best();
    // The true offset lies within half a round trip of each sample's: when this one and the one in use cannot both
    // be right, a clock jumped, and the samples before this one say nothing any more (the smallest round trip of
    // them would keep the old offset for up to `keep - 1` more samples).
    const jumped = kept !== null && !agree(kept, sample);
    this.samples = jumped ? [sample] : [...this.samples, sample].slice(-this.keep);
    const best = this.best() ?? sample;
    if (this.offsetMs !== null && Math.abs(best.offsetMs - this.offsetMs) > 1000) {
      const fields = { fromMs: Math.round(this.offsetMs), toMs: Math.round(best.offsetMs), roundTripMs: Math.round(roundTripMs) };
      if (jumped)
        this.log.warn(
          fields,
          "fleet clock: Redis's time jumped against ours by more than 1 s (a failover to a host whose clock differs?); sampling anew from here",
        );
      else this.log.warn(fields, 'fleet clock: the offset to Redis moved by more than 1 s');
    }
    this.offsetMs = best.offsetMs;
    return true;
  }

  /** the kept sample with the smallest round trip */
  private best(): Sample | null {
    return this.samples.reduce<Sample | null>((a, b) => (a === null || b.roundTripMs < a.roundTripMs ? b : a), null);
  }

  /** Stops sampling (and a `start()` still waiting for its first sample); `now()` keeps the last offset. */
  close(): void {
    this.closed = true;
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }
}
