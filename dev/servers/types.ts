/** The public shapes of dev/servers: what `startLocalServices` takes and what it returns. */

export interface LocalServicesOptions {
  /** directory holding data, logs and pid files, e.g. `<repo>/.fleet/run` or `<repo>/.fleet/test` */
  dir: string;
  /** start redis-server? */
  redis: boolean;
  /** start PostgreSQL? */
  postgres: boolean;
  /** wipe `dir` first (tests) instead of reusing persistent data (npm start) */
  fresh: boolean;
  /** test mode: fsync=off, synchronous_commit=off, full_page_writes=off for speed */
  fast: boolean;
  log?: (msg: string) => void;
  /**
   * Run the servers on a lab "host" (dev/netns.ts) instead of loopback: inside network namespace `netns`, listening
   * on `address` only, PostgreSQL admitting (with its password) clients from the CIDR `clients`. Root only.
   */
  host?: ServerHost;
  /**
   * Restart a server that dies on its own (`fleet start`): at most `maxRestarts` within `withinMs`; past that,
   * `onGiveUp` is called once with one line saying why (the caller exits non-zero).
   */
  supervise?: { maxRestarts: number; withinMs: number; onGiveUp: (why: string) => void };
}

export interface ServerHost {
  /** the network namespace (`ip netns` name) the servers run in */
  readonly netns: string;
  /** the address they listen on (and the URLs name) */
  readonly address: string;
  /** CIDR of the clients PostgreSQL admits besides loopback, e.g. the lab's /24 */
  readonly clients: string;
}

export interface LocalServices {
  /** `redis://:<password>@127.0.0.1:<port>` (the host's address with `host`): a secret, never log it */
  redisUrl?: string;
  /**
   * `postgres://fleet:<password>@127.0.0.1:<port>/fleet` (the host's address with `host`): the fleet's role, no
   * superuser; it owns the database `fleet` and may create databases. A secret, never log it
   */
  databaseUrl?: string;
  /**
   * `postgres://fleet_admin:<password>@...:<port>/fleet`: the superuser, for tests that set up what the fleet may not
   * (other roles, server settings); never the fleet's. A secret, never log it
   */
  adminDatabaseUrl?: string;
  redisPort?: number;
  pgPort?: number;
  pgDataDir?: string;
  pgBinDir?: string;
  redisBin?: string;
  /** pid of redis-server (while running) */
  redisPid?: number;
  /** pid of the postmaster (while running) */
  pgPid?: number;
  /** Stops both servers; idempotent; resolves once both processes are gone. */
  stop(): Promise<void>;
  /**
   * Kills redis-server (SIGKILL: a crash; SIGTERM: a clean shutdown), stays down for `downMs` (default 0), then
   * starts it again on the same port and data directory and waits until it has loaded its AOF (`wipe`: with the
   * data deleted while it is down, so it comes back empty, as a lost disk or a fresh replica). For fault tests.
   */
  restartRedis(options?: { signal?: 'SIGKILL' | 'SIGTERM'; downMs?: number; wipe?: boolean }): Promise<void>;
  /**
   * Stops PostgreSQL (`immediate`: SIGQUIT to the postmaster, a crash followed by recovery, as
   * `pg_ctl restart -m immediate`; `fast`: SIGINT), stays down for `downMs` (default 0), then starts it again on the
   * same port and data directory and waits until it accepts connections. For fault tests.
   */
  restartPostgres(options?: { mode?: 'immediate' | 'fast'; downMs?: number }): Promise<void>;
}
