export { StampBuffer, createStampBuffer, type CreateStampBufferOptions, type StampBufferOptions } from './buffer';
export { fateOf, type FlushResult, type StampBufferHooks } from './flush';
export { heartbeatMember, parseHeartbeatMember, stampKeys } from './keys';
