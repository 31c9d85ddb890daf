/**
 * Wakes the outbox relay after a commit that wrote an outbox row, with a NOTIFY of its own, never from inside the
 * transition's transaction: PostgreSQL serializes the commits of all transactions that NOTIFY on one database-wide
 * lock held across the commit's WAL flush, so a NOTIFY in every transition capped the whole fleet at one
 * transition per fsync (measured in bench/, scenario 1). This NOTIFY's transaction writes nothing but the
 * notification and does not wait for its flush (`synchronous_commit = off`): a lost wake-up costs at most the
 * relay's polling interval, never a transition. Wake-ups are coalesced: at most one in flight, and one more after
 * it when commits happened meanwhile. Errors are only logged (the relay polls as a fallback). When the active relay
 * runs in this process, it is woken directly, without a round trip, and given the rows the write returned for it
 * (`HandedOffRow`), so that it appends them without reading them back.
 */
import { OUTBOX_CHANNEL, TRANSITION_SQL, type Database, type HandedOffRow } from '../../entities/sql';
import type { Logger } from '../../log';

/** The outbox relay of this process, if it runs one. */
export interface LocalRelay {
  readonly isLeader: boolean;
  /** it leads and takes the rows writes hand over (absent: it reads every row itself) */
  readonly takesHandoff?: boolean;
  /** rows were committed; `handoff`: the outbox rows the write returned, to append without reading them back */
  notifyCommitted(handoff?: readonly HandedOffRow[] | null): void;
}

export class RelayWakeup {
  /** the wake-up in flight, if any */
  private inFlight: Promise<void> | null = null;
  private again = false;

  constructor(
    private readonly db: Database,
    private readonly log: Logger,
    private readonly relay: LocalRelay | undefined,
  ) {}

  /** Whether a write should return its outbox rows: the active relay runs in this process and takes them. */
  wantsHandoff(): boolean {
    return this.relay?.isLeader === true && this.relay.takesHandoff === true;
  }

  /**
   * Called after every commit that wrote an outbox row, with the rows the write handed over (if any): the relay of
   * this process, if it leads, appends them without reading them back.
   */
  committed(handoff: readonly HandedOffRow[] | null = null): void {
    if (this.relay?.isLeader === true) {
      this.relay.notifyCommitted(handoff);
      return;
    }
    if (this.inFlight !== null) {
      this.again = true;
      return;
    }
    this.inFlight = this.send();
  }

  private async send(): Promise<void> {
    try {
      do {
        this.again = false;
        await this.db.run(TRANSITION_SQL.wakeRelay, [OUTBOX_CHANNEL]);
      } while (this.again);
    } catch (err) {
      this.log.debug({ err }, 'could not wake the outbox relay; it will find the rows when it polls');
    } finally {
      this.inFlight = null;
    }
  }
}
