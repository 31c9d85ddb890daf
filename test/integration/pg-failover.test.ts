/**
 * The PostgreSQL failover lab (dev/pg-failover.ts): a pg_auto_failover formation on lab hosts, the database at one
 * address that moves to the promoted standby. Writers commit through that address while the primary's link to the
 * standby is cut and the primary is SIGKILLed: with synchronous replication every commit they were told of is on the
 * promoted standby; without it, the commits acknowledged during the cut are gone. The old primary comes back only as
 * a standby (the chaos run's `--ci` hosts variant then fails over back to it). Skipped, saying why, without root or pg_autoctl.
 */
import { expect } from 'chai';
import { Pool } from 'pg';
import { NetnsLab, netnsUnavailable } from '../../dev/netns';
import { PgFormation, pgFailoverUnavailable } from '../../dev/pg-failover';
import { repoRoot } from '../../src/util';
import * as path from 'node:path';
import { waitFor } from '../helpers/wait';

/** Writers inserting ids through the address; what they were told was committed. */
class Writers {
  readonly acked = new Set<number>();
  readonly errors = { count: 0 };
  private next = 0;
  private stopped = false;
  private readonly loops: Array<Promise<void>>;

  constructor(
    private readonly pool: Pool,
    count: number,
  ) {
    this.loops = Array.from({ length: count }, () => this.loop());
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      const id = this.next++;
      try {
        await this.pool.query('INSERT INTO acks (id) VALUES ($1)', [id]);
        this.acked.add(id);
      } catch {
        this.errors.count++; // unknown outcome: never counted as acknowledged
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
  }

  /** Waits until `n` more commits were acknowledged. */
  async more(n: number): Promise<void> {
    const target = this.acked.size + n;
    await waitFor(`${n} more acknowledged commits`, () => (this.acked.size >= target ? true : undefined), 60_000);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.loops);
  }
}

async function missing(pool: Pool, ids: ReadonlySet<number>): Promise<number> {
  const { rows } = await pool.query<{ n: string }>(
    'SELECT count(*) AS n FROM unnest($1::int[]) AS a(id) WHERE NOT EXISTS (SELECT 1 FROM acks WHERE acks.id = a.id)',
    [[...ids]],
  );
  return Number(rows[0]?.n ?? -1);
}

for (const sync of [true, false]) {
  describe(`PostgreSQL failover lab (${sync ? 'synchronous' : 'asynchronous'} replication)`, function () {
    this.timeout(300_000);
    let lab: NetnsLab | null = null;
    let formation: PgFormation | null = null;
    let pool: Pool | null = null;

    before(async function () {
      const why = netnsUnavailable() ?? pgFailoverUnavailable();
      if (why !== null) {
        process.stdout.write(`      SKIPPED: the PostgreSQL failover lab cannot run here: ${why}\n`);
        this.skip();
      }
      const subnet = 120 + (process.pid % 60) + (sync ? 0 : 60);
      lab = NetnsLab.create(`pf${sync ? 's' : 'a'}${process.pid % 1000}`, ['pgmon', 'pg1', 'pg2'], subnet);
      formation = await PgFormation.start({
        lab,
        monitorHost: 'pgmon',
        nodeHosts: ['pg1', 'pg2'],
        sync,
        address: `10.213.${subnet}.200`,
        logDir: path.join(repoRoot(), '.fleet', 'test', `pg-failover-${sync ? 'sync' : 'async'}`),
        log: (line) => process.stdout.write(`      ${line}\n`),
      });
      pool = new Pool({ connectionString: formation.databaseUrl, max: 4, connectionTimeoutMillis: 1000, query_timeout: 3000 });
      pool.on('error', () => undefined);
      await pool.query('CREATE TABLE acks (id int PRIMARY KEY)');
    });

    after(async () => {
      await pool?.end().catch(() => undefined);
      await formation?.stop();
      await lab?.destroy();
    });

    it(
      sync
        ? 'loses no acknowledged commit when the primary is cut off from its standby and killed, and the old primary comes back as a standby'
        : 'loses the commits acknowledged while the standby was cut off',
      async () => {
        if (formation === null || pool === null) throw new Error('no formation');
        const writers = new Writers(pool, 4);
        try {
          await writers.more(200);
          const first = await formation.failover({ cutReplicationMs: 1500 });
          expect(first.killed).to.equal('node1');
          expect(first.promoted).to.equal('node2');
          expect(first.twoPrimaries).to.equal(0);
          await writers.more(200); // the writers go on against the new primary, through the same address
          const lost = await missing(pool, writers.acked);
          if (sync) expect(lost, 'acknowledged commits missing on the promoted standby').to.equal(0);
          else expect(lost, 'acknowledged during the cut, and gone').to.be.above(0);
          process.stdout.write(
            `      failover: promoted after ${first.promotedMs} ms, address moved ${first.addressMovedMs} ms, writable ${first.writableMs} ms; ${writers.acked.size} acknowledged, ${lost} lost\n`,
          );

          if (!sync) return; // (the old primary's rejoin is the synchronous case's)
          const back = await formation.rejoin();
          expect(back.twoPrimaries, 'the old primary never took writes beside the new one').to.equal(0);
          expect(formation.primaryName).to.equal('node2');
          const states = await formation.states();
          expect(states.node1?.reported, 'the old primary follows the new one').to.equal('secondary');
          expect(states.node2?.reported).to.equal('primary');
        } finally {
          await writers.stop();
        }
      },
    );
  });
}
