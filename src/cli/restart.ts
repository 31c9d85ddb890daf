/** Exit code of a `fleet worker` / `fleet start` whose lifecycle worker stopped taking jobs (its fetch watchdog). */
export const STUCK_EXIT_CODE = 5;

/**
 * The lifecycle worker stopped taking jobs: stop gracefully, as on SIGTERM, and exit 5, so that the supervisor
 * (systemd, Kubernetes, the chaos runner) starts a fresh process with fresh connections.
 */
export function restartMe(): void {
  process.exitCode = STUCK_EXIT_CODE;
  process.kill(process.pid, 'SIGTERM');
}
