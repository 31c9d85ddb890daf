/**
 * Root hooks: a test file that leaves a connection open would keep mocha's process alive (or hide a leak in the
 * code under test). After all tests, any TCP socket or server still open fails the run.
 */
import { Socket } from 'node:net';
import type { RootHookObject } from 'mocha';

export const mochaHooks: RootHookObject = {
  async afterAll() {
    // let sockets that were ended in the last test finish closing
    for (let i = 0; i < 40; i++) {
      if (!process.getActiveResourcesInfo().some((r) => r === 'TCPSocketWrap' || r === 'TCPServerWrap')) return;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const open = process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap' || r === 'TCPServerWrap');
    // name the sockets, so the leak can be traced to the server it talks to
    const handles = (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles();
    const sockets = handles
      .filter((h): h is Socket => h instanceof Socket)
      .map((h) => `${h.localAddress ?? '?'}:${h.localPort ?? '?'} -> ${h.remoteAddress ?? '?'}:${h.remotePort ?? '?'}`);
    throw new Error(`tests left ${open.length} TCP handle(s) open: ${sockets.join(', ') || open.join(', ')}`);
  },
};
