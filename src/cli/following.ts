/**
 * What the commands that follow a feed until stopped (`fleet tail`, `fleet watch`) share: how a signal stops them,
 * and how a closed stdout ends them quietly.
 */

/** A command's stop: `stop` resolves on the first SIGINT or SIGTERM, or when the command calls `stopNow`. */
export interface Stopping {
  readonly stop: Promise<void>;
  readonly stopNow: () => void;
}

/**
 * The first SIGINT or SIGTERM resolves `stop`; should anything still hold the process `graceMs` later, it exits
 * anyway (saying so on stderr); a second signal exits at once.
 */
export function stopOnSignals(command: string, graceMs: number): Stopping {
  let stopNow: () => void = () => undefined;
  const stop = new Promise<void>((resolve) => (stopNow = resolve));
  let signalled = false;
  const onSignal = (): void => {
    if (signalled) process.exit(130);
    signalled = true;
    stopNow();
    setTimeout(() => {
      process.stderr.write(`${command}: not stopped after ${graceMs} ms; exiting\n`);
      process.exit(process.exitCode ?? 0);
    }, graceMs).unref();
  };
  process.on('SIGINT', onSignal).on('SIGTERM', onSignal);
  return { stop, stopNow };
}

/** Lines to stdout until a reader closes it (`fleet tail | head -1`): then the command stops, quietly. */
export interface FollowOutput {
  readonly write: (line: string) => void;
  /** whether the reader closed stdout: it took what it wanted, and the command says nothing more */
  readonly closed: () => boolean;
}

export function followOutput(stopping: Stopping): FollowOutput {
  let outClosed = false;
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
    outClosed = true;
    stopping.stopNow();
  });
  return {
    write: (line) => {
      if (!outClosed) process.stdout.write(`${line}\n`);
    },
    closed: () => outClosed,
  };
}
