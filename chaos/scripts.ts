/**
 * Plays the workload's scripts: each step's events shuffled, most at once and some late, some sent twice (the same
 * job again, or the same eventId under another job), then the step's barrier, then a pause.
 */
import { sleep } from '../src/util';
import type { Barriers } from './barriers';
import { Aborted, type Sender, type Tracked } from './sender';
import type { Random, Script, Step } from './workload';

export class ScriptPlayer {
  /** each script's current step: what its producer would send again if the queue lost it */
  readonly stepEvents = new Map<string, readonly Tracked[]>();
  /** each unfinished script's current step label */
  readonly stepOf = new Map<string, string>();
  finished = 0;

  constructor(
    private readonly sender: Sender,
    private readonly barriers: Barriers,
    private readonly timing: Random,
  ) {}

  /** Starts every script, the starts spread evenly over `spreadMs`; the promise of each ends with its script. */
  startAll(scripts: readonly Script[], spreadMs: number): Array<Promise<void>> {
    return scripts.map((s, i) =>
      this.run(s, Math.round((i / scripts.length) * spreadMs)).catch((err: unknown) => {
        if (!(err instanceof Aborted)) throw err;
      }),
    );
  }

  private async run(script: Script, startAfterMs: number): Promise<void> {
    await sleep(startAfterMs);
    for (const step of script.steps) {
      this.stepOf.set(script.deploymentId, step.label);
      this.stepEvents.set(script.deploymentId, step.events);
      await this.send(step);
      await this.barriers.wait(script.deploymentId, step.barrier);
      await sleep(this.timing.int(200, 1500));
    }
    this.finished++;
    this.stepOf.delete(script.deploymentId);
  }

  private async send(step: Step): Promise<void> {
    await Promise.all(
      this.timing.shuffle(step.events).map(async (planned) => {
        // out of order: most events go at once, some late
        await sleep(this.timing.int(0, 300) + (this.timing.chance(0.2) ? this.timing.int(300, 1500) : 0));
        const event: Tracked = planned;
        await this.sender.sendIntended(event);
        // a rejection is not recorded, so a later copy of a rejected event is decided afresh: only events that
        // are decided are sent again
        if (event.expect.kind === 'decided') this.maybeSendAgain(event);
      }),
    );
  }

  private maybeSendAgain(event: Tracked): void {
    if (this.timing.chance(0.15)) {
      this.sender.inBackground(async () => {
        await sleep(this.timing.int(0, 2000));
        await this.sender.resend(event, false);
      });
    }
    if (this.timing.chance(0.1)) {
      this.sender.inBackground(async () => {
        await sleep(this.timing.int(0, 3000));
        await this.sender.redeliver(event, 0);
      });
    }
  }
}
