/** Small helpers shared by every layer (and by the tooling): they import nothing of ours. */
export { sleep, settleWithin, rejectAfter } from './time';
export { repoRoot } from './paths';
export { UUID_PATTERN, NIL_UUID } from './ids';
export { isProcessAlive } from './process';
export { printable } from './terminal';
