export { decide, assertNever } from './decide';
export { cutoffsAt, livenessOf, type LivenessCutoffs, type LivenessLimits } from './liveness';
export { DEPLOYMENT_STATES, ATTEMPT_STATUSES, ENDPOINT_KINDS, TIME_DEPENDENT_NOOPS } from './types';
export type {
  AttemptChange,
  AttemptSnapshot,
  AttemptStatus,
  Decision,
  DeferReason,
  DeploymentSnapshot,
  DeploymentState,
  Effects,
  Endpoint,
  EndpointKind,
  MachineEvent,
  MachineEventType,
  NoopReason,
  RejectionCode,
  Snapshot,
  TransitionReason,
} from './types';
