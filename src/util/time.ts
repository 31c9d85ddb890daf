/**
 * Waiting: a plain sleep, and racing a promise against a timer without leaving the timer behind. Every
 * "wait at most N ms" in the fleet goes through `settleWithin` or `rejectAfter`, so none of them leaks a timer that
 * would keep a closing process alive.
 */

/** Resolves after `ms`. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Waits for `promise` at most `ms` and says which came first. A promise still pending then is left to itself, and
 * its later rejection is swallowed (nobody is waiting any more); a rejection before the deadline is thrown.
 */
export async function settleWithin(promise: Promise<unknown>, ms: number): Promise<'done' | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), ms);
  });
  const done = promise.then(() => 'done' as const);
  done.catch(() => undefined);
  try {
    return await Promise.race([done, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Resolves as `promise` does, or rejects with "timed out after `ms` ms: `what`" if it takes longer. */
export async function rejectAfter<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, deadline]);
  } finally {
    clearTimeout(timer);
  }
}
