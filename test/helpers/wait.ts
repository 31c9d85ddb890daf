/** Waiting for an outcome, not for time to pass: dev/wait.ts (the dev harnesses use it too). */
export { waitFor } from '../../dev/wait';

/**
 * A meeting point for `parties` callers, to stage an interleaving: each call resolves once all of them have called
 * (e.g. two deliveries of one event that have both read before either writes). Later calls pass at once.
 */
export function barrier(parties: number): () => Promise<void> {
  let arrived = 0;
  let open = (): void => undefined;
  const opened = new Promise<void>((resolve) => (open = resolve));
  return () => {
    if (++arrived >= parties) open();
    return opened;
  };
}
