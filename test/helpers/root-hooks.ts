/**
 * Root hooks: a test file that leaves a connection open would keep mocha's process alive (or hide a leak in the
 * code under test). After all tests, any TCP socket or server still open fails the run.
 */
import { Socket } from 'node:net';
import type { RootHookObject } from 'mocha';

export const mochaHooks: RootHookObject = {
  async afterAll() {
    // Let sockets that were ended in the last tests finish closing (a reconnect attempt that a component's close()
    // cut short, a keep-alive socket the server is closing). A leak stays open for good; 10 s tells the two apart
    // on a loaded machine.
    for (let i = 0; i < 200; i++) {
      if (!process.getActiveResourcesInfo().some((r) => r === 'TCPSocketWrap' || r === 'TCPServerWrap')) return;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const open = process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap' || r === 'TCPServerWrap');
    // name the sockets, so the leak can be traced to the server it talks to
    const handles = (process as unknown as { _getActiveHandles(): unknown[] })._getActiveHandles();
    const sockets = handles
      .filter((h): h is Socket => h instanceof Socket)
      .map((h) => {
        const state = h.connecting ? ' (connecting)' : h.destroyed ? ' (destroyed)' : '';
        const host = (h as unknown as { _host?: unknown })._host;
        return `${h.localAddress ?? '?'}:${h.localPort ?? '?'} -> ${h.remoteAddress ?? (typeof host === 'string' ? host : '?')}:${h.remotePort ?? '?'}${state}`;
      });
    throw new Error(`tests left ${open.length} TCP handle(s) open: ${sockets.join(', ') || open.join(', ')}`);
  },
};
