import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { repoRoot } from '../../src/util';
import { OwnRedis } from './redis-server';

/** A clock the test moves by hand: pass `clock.now` wherever the code takes `now: () => Date`. */
export class ManualClock {
  private ms: number;

  constructor(start: Date | number) {
    this.ms = typeof start === 'number' ? start : start.getTime();
  }

  readonly now = (): Date => new Date(this.ms);

  /** moves the clock forward by `seconds` (fractions allowed) and returns the new time */
  advance(seconds: number): Date {
    this.ms += Math.round(seconds * 1000);
    return this.now();
  }

  /** sets the clock to `start + seconds` */
  at(start: Date, seconds: number): Date {
    this.ms = start.getTime() + Math.round(seconds * 1000);
    return this.now();
  }
}

/** A redis-server of the test's own whose wall clock the test moves while it runs (`TIME`, and its expiries). */
export class ShiftedRedis {
  private constructor(
    readonly server: OwnRedis,
    private readonly shiftFile: string,
    private readonly dir: string,
  ) {}

  /**
   * Starts one with test/fixtures/clock-shift.c preloaded (built here with the system's C compiler), its clock at
   * the host's. Returns why not instead when there is no C compiler (the caller skips, saying so).
   */
  static async start(): Promise<ShiftedRedis | string> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-clock-shift-'));
    const library = path.join(dir, 'clock-shift.so');
    const built = spawnSync('cc', ['-shared', '-fPIC', '-O2', '-o', library, path.join(repoRoot(), 'test', 'fixtures', 'clock-shift.c')], {
      encoding: 'utf8',
    });
    if (built.status !== 0) {
      fs.rmSync(dir, { recursive: true, force: true });
      return `no C compiler to build test/fixtures/clock-shift.c (${built.error?.message ?? built.stderr.trim()})`;
    }
    const shiftFile = path.join(dir, 'shift-ms');
    fs.writeFileSync(shiftFile, '0');
    const server = await OwnRedis.start([], { LD_PRELOAD: library, CLOCK_SHIFT_FILE: shiftFile });
    return new ShiftedRedis(server, shiftFile, dir);
  }

  /** From now on its clock reads the host's plus `ms` (negative: behind), as after a failover to a host that far off. */
  shift(ms: number): void {
    fs.writeFileSync(this.shiftFile, String(Math.round(ms)));
  }

  async stop(): Promise<void> {
    await this.server.stop();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
