/**
 * The chaos run on several hosts (`--hosts N`, issue 17): a network-namespace lab (dev/netns.ts) with a host `svc`
 * for PostgreSQL and Redis (one server, or with `--redis-cluster` 3 masters with a replica each) and worker hosts
 * `w1..wN`, one `fleet worker` each. The runner itself (producer, audit consumer, accounting) stays in the root
 * namespace and reaches the services over the lab's bridge, so cutting a worker host off leaves it connected.
 */
import { NetnsLab, netnsUnavailable } from '../dev/netns';
import { OwnRedisCluster } from '../dev/redis-cluster';
import { PgFormation } from '../dev/pg-failover';
import { startLocalServices, type LocalServices } from '../dev/servers';
import type { ChaosOptions } from './options';

export class ChaosLab {
  /** worker hosts now cut off */
  private readonly cut = new Set<string>();

  private constructor(
    readonly lab: NetnsLab,
    readonly services: LocalServices,
    /** the Redis Cluster, or null with one Redis on `svc` */
    readonly cluster: OwnRedisCluster | null,
    /** PostgreSQL as a formation that fails over (--pg-failover), or null with one server on `svc` */
    readonly pg: PgFormation | null,
    /** the worker hosts, `w1..wN` */
    readonly workerHosts: readonly string[],
  ) {}

  /** Creates the lab and starts the services on `svc`; throws saying why when namespaces cannot be made. */
  static async start(options: ChaosOptions, log: (line: string) => void): Promise<ChaosLab> {
    const why = netnsUnavailable();
    if (why !== null) throw new Error(`--hosts needs network namespaces: ${why}`);
    const workerHosts = Array.from({ length: options.hosts }, (_, i) => `w${i + 1}`);
    const pgHosts = options.pgFailover ? ['pgmon', 'pg1', 'pg2'] : [];
    const hosts = ['svc', ...workerHosts, ...pgHosts];
    const subnet = 60 + (process.pid % 10);
    const lab = NetnsLab.create('chaos', hosts, subnet);
    let services: LocalServices | null = null;
    let cluster: OwnRedisCluster | null = null;
    let pg: PgFormation | null = null;
    try {
      const svc = lab.host('svc');
      const host = { netns: svc.netns, address: svc.address };
      const onSvc = [...(options.pgFailover ? [] : ['PostgreSQL']), ...(options.redisCluster ? [] : ['Redis (AOF)'])].join(' and ');
      log(`lab: ${hosts.length} hosts on 10.213.${subnet}.0/24; ${onSvc || 'nothing but the Redis Cluster'} on svc (${svc.address})`);
      services = await startLocalServices({
        dir: options.dir,
        redis: !options.redisCluster,
        postgres: !options.pgFailover,
        fresh: true,
        fast: false,
        host: { ...host, clients: `10.213.${subnet}.0/24` },
      });
      if (options.redisCluster) {
        log('lab: Redis Cluster of 3 masters with a replica each on svc (AOF everysec)');
        cluster = await OwnRedisCluster.start({ host, appendonly: true });
      }
      if (options.pgFailover) {
        pg = await PgFormation.start({
          lab,
          monitorHost: 'pgmon',
          nodeHosts: ['pg1', 'pg2'],
          sync: options.pgSync,
          address: `10.213.${subnet}.200`,
          logDir: options.dir,
          log: (line) => log(`lab: ${line}`),
        });
      }
      return new ChaosLab(lab, services, cluster, pg, workerHosts);
    } catch (err) {
      await pg?.stop();
      await cluster?.stop();
      await services?.stop();
      await lab.destroy();
      throw err;
    }
  }

  /** The fleet's database: the formation's moving address, or PostgreSQL on `svc`. */
  get databaseUrl(): string {
    return this.pg?.databaseUrl ?? this.services.databaseUrl ?? '';
  }

  get redisUrl(): string {
    return this.cluster?.url ?? this.services.redisUrl ?? '';
  }

  /** The worker host of a worker slot (slot 0 runs on w1). */
  hostOfSlot(slot: number): string {
    return this.workerHosts[slot % this.workerHosts.length] ?? 'w1';
  }

  /** The argv prefix that runs a command on the slot's host. */
  wrap(slot: number): string[] {
    return ['ip', 'netns', 'exec', this.lab.host(this.hostOfSlot(slot)).netns];
  }

  /** The worker host with this address, or null. */
  hostOfAddress(address: string): string | null {
    for (const name of this.workerHosts) if (this.lab.host(name).address === address) return name;
    return null;
  }

  isCut(host: string): boolean {
    return this.cut.has(host);
  }

  partition(host: string): void {
    this.lab.partition(host);
    this.cut.add(host);
  }

  heal(host: string): void {
    this.lab.heal(host);
    this.cut.delete(host);
  }

  /** Stops the services and removes the lab (the worker processes are the caller's). */
  async close(): Promise<void> {
    for (const host of [...this.cut]) this.heal(host);
    await this.pg?.stop();
    await this.cluster?.stop();
    await this.services.stop();
    await this.lab.destroy();
  }
}
