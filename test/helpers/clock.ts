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
