import * as http from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * How the endpoint answers: `ok` 200, `unavailable` 503, `hang` accepts and never answers, `redirect` 302 to
 * `redirectTo` (a probe must not follow it).
 */
export type ReadyMode = 'ok' | 'unavailable' | 'hang' | 'redirect';

/** A node's HTTP endpoint on loopback whose /ready behaviour a test switches at will. */
export class ReadyServer {
  mode: ReadyMode;
  redirectTo = 'http://127.0.0.1:9/ready';
  /** runs on each request before it is answered (to stage what happens while a probe is in flight) */
  beforeAnswer: ((path: string) => Promise<void>) | null = null;
  /** request paths, in arrival order */
  readonly requests: string[] = [];
  private readonly server: http.Server;
  private port = 0;

  constructor(mode: ReadyMode = 'ok') {
    this.mode = mode;
    this.server = http.createServer((req, res) => {
      this.requests.push(req.url ?? '');
      const before = this.beforeAnswer;
      if (before === null) this.answer(res);
      else
        before(req.url ?? '').then(
          () => this.answer(res),
          () => res.destroy(),
        );
    });
  }

  private answer(res: http.ServerResponse): void {
    switch (this.mode) {
      case 'ok':
        res.writeHead(200, { 'content-type': 'text/plain' }).end('ready');
        return;
      case 'unavailable':
        res.writeHead(503, { 'content-type': 'text/plain' }).end('not ready');
        return;
      case 'redirect':
        res.writeHead(302, { location: this.redirectTo }).end();
        return;
      case 'hang':
        return; // never answers; the socket stays open until the client gives up or close()
    }
  }

  async listen(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.port = (this.server.address() as AddressInfo).port;
    return this.url;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/** A loopback URL on which nothing listens (a port that was just free). */
export async function closedPortUrl(): Promise<string> {
  const server = http.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return `http://127.0.0.1:${port}`;
}
