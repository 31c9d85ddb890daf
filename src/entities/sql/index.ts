/**
 * Every SQL statement the product runs, the rows they return, and the one runner (named prepared statements).
 * Services reach PostgreSQL only through this folder.
 */
export { sql, plain, type Statement } from './statement';
export { Database, retryLockConflicts, sessionOf, type LockConflictRetry, type Session, type Result } from './runner';
export { lockedInIdOrder } from './lock-order';
export { ATTEMPT_LIVENESS } from './liveness';
export * from './rows';
export * from './read';
export * from './summary';
export * from './transitions';
export {
  transitionWriteParams,
  writesAnything,
  type AppliedEventRow,
  type AttemptChangeRow,
  type AttemptInsertRow,
  type DeploymentInsertRow,
  type DeploymentUpdateRow,
  type HandedOffRow,
  type NoopClaimRow,
  type TransitionWrite,
  type TransitionWriteRow,
} from './transition-write';
export * from './stamps';
export * from './sweep';
export * from './outbox';
export * from './admin';
