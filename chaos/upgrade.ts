/**
 * The rolling upgrade of a mixed-version chaos run (`--previous REF`), played during the fault window while the
 * faults go on:
 * - the fleet starts with the previous release's workers only, on its schema; a consumer group member in two and
 *   about half the events are the previous release's for the whole run (chaos/consumer-group.ts, chaos/sender.ts);
 * - at 25 % of the window the current release's `fleet migrate` runs (as an operator's migration job would, retried
 *   until it succeeds: a fault may take PostgreSQL away under it), with the previous release's workers at load;
 * - at 30 % as many current workers join: both releases take jobs from one queue, and the relay's advisory lock
 *   goes to whichever relay wins it (a leader kill moves it, between releases too);
 * - from 70 % the previous release's workers retire one at a time (SIGTERM: in-flight jobs finish).
 * Sampled every second: which release's workers hold active jobs, and which release's relay leads.
 */
import { sleep } from '../src/util';
import { findRelayLeader } from './faults';
import type { Fleet } from './fleet';
import { migrateProcess, type Release } from './releases';

export interface UpgradeReport {
  readonly previous: { readonly ref: string; readonly commit: string; readonly version: string };
  readonly current: { readonly commit: string; readonly version: string };
  /** the current release's migrations, applied mid-run */
  readonly migration: {
    readonly atS: number | null;
    readonly tookS: number | null;
    /** `fleet migrate`'s last line (the migrations it applied) */
    readonly output: string;
    /** runs of `fleet migrate` until one succeeded (a fault can take PostgreSQL away under it) */
    readonly tries: number;
    readonly ok: boolean;
  };
  readonly currentWorkersAtS: number | null;
  readonly previousRetiredAtS: number | null;
  /** one-second samples: releases holding active jobs (both at once in `both`) and leading the relay */
  readonly samples: {
    readonly total: number;
    readonly activePrevious: number;
    readonly activeCurrent: number;
    readonly activeBoth: number;
    readonly relayPrevious: number;
    readonly relayCurrent: number;
    /** times the leading relay's release changed between two samples */
    readonly relayMoves: number;
  };
  /** events sent through each release's producer; consumer group member processes started per release */
  readonly eventsByProducer: { readonly previous: number; readonly current: number };
  readonly membersStarted: { readonly previous: number; readonly current: number };
}

/** Both releases really ran together, and the migration was applied: what an upgrade run must show. */
export function upgradeShown(u: UpgradeReport): boolean {
  const s = u.samples;
  return (
    u.migration.ok &&
    s.activeBoth > 0 &&
    s.relayPrevious > 0 &&
    s.relayCurrent > 0 &&
    u.membersStarted.previous > 0 &&
    u.eventsByProducer.previous > 0
  );
}

type Which = 'previous' | 'current';

export class Upgrade {
  private migration: { atS: number | null; tookS: number | null; output: string; tries: number; ok: boolean } = {
    atS: null,
    tookS: null,
    output: '',
    tries: 0,
    ok: false,
  };
  private currentWorkersAtS: number | null = null;
  private previousRetiredAtS: number | null = null;
  private readonly counts = { total: 0, activePrevious: 0, activeCurrent: 0, activeBoth: 0, relayPrevious: 0, relayCurrent: 0, relayMoves: 0 };
  private lastRelay: Which | null = null;
  private stopped = false;
  private sampling: Promise<void> | null = null;

  constructor(
    private readonly fleet: Fleet,
    private readonly previous: Release,
    private readonly log: (line: string) => void,
  ) {}

  /** Plays the upgrade over the fault window (`durationS` from now); resolves once the previous workers retired. */
  async run(durationS: number, elapsed: () => number): Promise<void> {
    this.sampling = this.sample();
    const start = Date.now();
    const at = async (fraction: number) => sleep(Math.max(0, start + fraction * durationS * 1000 - Date.now()));
    const { fleet } = this;
    const workers = fleet.options.workers;

    await at(0.25);
    this.migration.atS = Number(elapsed().toFixed(1));
    const began = Date.now();
    // retried as a migration job would be, but not past the fault window: a migration that keeps failing fails the run
    const giveUpAt = start + durationS * 1000;
    while (!this.migration.ok && !this.stopped && Date.now() < giveUpAt) {
      this.migration.tries++;
      const run = await migrateProcess(fleet.current, fleet.databaseUrl);
      if (run.code === 0) {
        this.migration = { ...this.migration, ok: true, tookS: Number(((Date.now() - began) / 1000).toFixed(1)), output: lastLine(run.stdout) };
      } else {
        this.log(`upgrade: fleet migrate of ${fleet.current.version} exited ${run.code}: ${lastLine(run.stderr)}; again in 2 s`);
        await sleep(2000);
      }
    }
    this.log(
      `upgrade: fleet migrate of ${fleet.current.version}: ${this.migration.output} (${this.migration.tries} run(s), ${this.migration.tookS ?? '-'} s)`,
    );

    await at(0.3);
    if (this.stopped) return;
    for (let i = 0; i < workers; i++) fleet.workers.grow();
    this.currentWorkersAtS = Number(elapsed().toFixed(1));
    this.log(`upgrade: ${workers} workers of ${fleet.current.version} joined the ${workers} of ${this.previous.version}`);

    await at(0.7);
    for (let slot = 0; slot < workers && !this.stopped; slot++) {
      this.log(`upgrade: retiring worker slot ${slot} (${this.previous.version})`);
      await fleet.workers.retire(slot);
      await sleep(2000);
    }
    this.previousRetiredAtS = Number(elapsed().toFixed(1));
    this.log(`upgrade: every worker of ${this.previous.version} retired; ${fleet.current.version} runs alone`);
  }

  /** Stops the sampling (after the drain). */
  async stop(): Promise<void> {
    this.stopped = true;
    await this.sampling;
  }

  private whichOfPid(pid: number): Which | null {
    const slot = this.fleet.workers.slotOf(pid);
    if (slot < 0) return null;
    return this.fleet.releaseOfSlot(slot) === this.previous ? 'previous' : 'current';
  }

  private async sample(): Promise<void> {
    const { fleet } = this;
    while (!this.stopped) {
      await sleep(1000);
      try {
        const active = await fleet.queue.getActive();
        const holding = new Set<Which>();
        for (const job of active) {
          const pid = Number(job.processedBy?.split(':').at(-1));
          const which = Number.isInteger(pid) ? this.whichOfPid(pid) : null;
          if (which !== null) holding.add(which);
        }
        const leader = await findRelayLeader(fleet.pool, fleet.workers.pids());
        const relay = leader === null ? null : this.whichOfPid(leader);
        const c = this.counts;
        c.total++;
        if (holding.has('previous')) c.activePrevious++;
        if (holding.has('current')) c.activeCurrent++;
        if (holding.size === 2) c.activeBoth++;
        if (relay === 'previous') c.relayPrevious++;
        if (relay === 'current') c.relayCurrent++;
        if (relay !== null && this.lastRelay !== null && relay !== this.lastRelay) c.relayMoves++;
        if (relay !== null) this.lastRelay = relay;
      } catch {
        // a fault took Redis or PostgreSQL away for this sample
      }
    }
  }

  report(eventsByProducer: readonly number[], membersStarted: { readonly previous: number; readonly current: number }): UpgradeReport {
    const { fleet, previous } = this;
    return {
      previous: { ref: previous.ref, commit: previous.commit, version: previous.version },
      current: { commit: fleet.current.commit, version: fleet.current.version },
      migration: this.migration,
      currentWorkersAtS: this.currentWorkersAtS,
      previousRetiredAtS: this.previousRetiredAtS,
      samples: { ...this.counts },
      eventsByProducer: { current: eventsByProducer[0] ?? 0, previous: eventsByProducer[1] ?? 0 },
      membersStarted: { ...membersStarted },
    };
  }
}

function lastLine(text: string): string {
  return text.trim().split('\n').at(-1) ?? '';
}
