/** Waiting for an outcome, not for time to pass: dev/wait.ts (the dev harnesses use it too). */
export { waitFor } from '../../dev/wait';
