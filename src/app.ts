/**
 * The composition root: builds the long-lived components in start order and closes them in reverse.
 * Nothing else wires components together.
 */
import type { DataSource } from 'typeorm';
import { createDataSource } from '../ormconfig';
import type { FleetConfig } from './config';
import { migrationsApplied } from './entities/migrate';
import type { Logger } from './log';
import { TransitionService } from './services/transition-service';
import { OutboxRelay, transitionStreamKey } from './streams/outbox-relay';
import { LifecycleWorker } from './workers/lifecycle-worker';

export interface Endpoints {
  readonly redisUrl: string;
  readonly databaseUrl: string;
}

export interface FleetRoles {
  /** run the lifecycle worker (default true) */
  readonly worker?: boolean;
  /** run an outbox relay: one is active fleet-wide, the others stand by (default true) */
  readonly relay?: boolean;
}

export interface Fleet {
  readonly dataSource: DataSource;
  readonly service: TransitionService;
  readonly worker: LifecycleWorker | null;
  readonly relay: OutboxRelay | null;
  /** graceful stop in reverse start order; safe to call twice */
  close(graceMs?: number): Promise<void>;
}

export async function startFleet(config: FleetConfig, endpoints: Endpoints, logger: Logger, roles: FleetRoles = {}): Promise<Fleet> {
  const closers: Array<(graceMs: number) => Promise<void>> = [];
  const close = async (graceMs: number) => {
    for (const closer of closers.reverse()) {
      try {
        await closer(graceMs);
      } catch (err) {
        logger.error({ err }, 'error while closing');
      }
    }
    closers.length = 0;
  };

  try {
    const dataSource = createDataSource({
      url: endpoints.databaseUrl,
      poolSize: config.concurrency + 4,
      applicationName: 'lifecycle-fleet',
    });
    await dataSource.initialize();
    closers.push(() => dataSource.destroy());
    if (!(await migrationsApplied(dataSource))) {
      throw new Error('the database schema is not up to date: run `fleet migrate` first');
    }

    const service = new TransitionService({ dataSource, logger });
    let relay: OutboxRelay | null = null;
    if (roles.relay ?? true) {
      const r = new OutboxRelay({
        databaseUrl: endpoints.databaseUrl,
        redis: endpoints.redisUrl,
        streamKey: transitionStreamKey(config.prefix),
        maxLen: config.streamMaxLen,
        logger,
      });
      relay = r;
      // started before the worker, so it stops after it: it publishes what the worker's last jobs committed
      closers.push(() => r.close());
      r.start();
    }

    let worker: LifecycleWorker | null = null;
    if (roles.worker ?? true) {
      const w = new LifecycleWorker({
        connection: endpoints.redisUrl,
        prefix: config.prefix,
        service,
        concurrency: config.concurrency,
        logger,
      });
      worker = w;
      closers.push((graceMs) => w.close(graceMs));
      await w.worker.waitUntilReady();
    }

    let closing: Promise<void> | null = null;
    return {
      dataSource,
      service,
      worker,
      relay,
      close: (graceMs = 30_000) => (closing ??= close(graceMs)),
    };
  } catch (err) {
    await close(1000);
    throw err;
  }
}

/**
 * Runs until SIGTERM or SIGINT, then stops gracefully; a second signal exits at once.
 * Resolves when the fleet has stopped.
 */
export function closeOnSignals(fleet: { close(graceMs?: number): Promise<void> }, logger: Logger, graceMs = 30_000): Promise<void> {
  return new Promise((resolve) => {
    let stopping = false;
    const onSignal = (signal: NodeJS.Signals) => {
      if (stopping) {
        logger.warn({ signal }, 'second signal: exiting without waiting');
        process.exit(1);
      }
      stopping = true;
      logger.info({ signal, graceMs }, 'stopping: finishing in-flight jobs');
      fleet.close(graceMs).then(
        () => {
          logger.info('stopped');
          process.off('SIGTERM', onSignal);
          process.off('SIGINT', onSignal);
          resolve();
        },
        (err: unknown) => {
          logger.error({ err }, 'error while stopping');
          process.exitCode = 1;
          resolve();
        },
      );
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
}
