/**
 * Root hooks: a test file that leaves a socket or timer behind keeps mocha's process alive; fail loudly instead.
 */
import type { RootHookObject } from 'mocha';

export const mochaHooks: RootHookObject = {};
