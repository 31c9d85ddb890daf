import * as net from 'node:net';

/**
 * A loopback TCP proxy that can cut the line: while down, open connections are reset and new ones are closed at
 * once, the way a restarting database looks to its clients.
 */
export class TcpProxy {
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private down = false;
  private stalled = false;
  private rule: InterceptRule | null = null;
  /** the last rule's action is complete (its reply answered, or its connection reset) */
  private fired = false;

  constructor(
    private readonly targetHost: string,
    private readonly targetPort: number,
  ) {
    this.server = net.createServer((client) => this.accept(client));
  }

  /** connections accepted so far (each client that reached the proxy, whatever became of it) */
  accepted = 0;

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return (this.server.address() as net.AddressInfo).port;
  }

  /** the same URL with host and port replaced by the proxy's */
  static rewrite(url: string, port: number): string {
    const u = new URL(url);
    u.hostname = '127.0.0.1';
    u.port = String(port);
    return u.toString();
  }

  cut(): void {
    this.down = true;
    for (const socket of this.sockets) reset(socket);
    this.sockets.clear();
  }

  /** The line goes silent: bytes stop flowing both ways, nothing is closed (a hung server or network). */
  stall(): void {
    this.stalled = true;
    for (const socket of this.sockets) socket.pause();
  }

  /**
   * The next command whose bytes contain `marker` meets `action`: `lose-reply` forwards it (the server runs it), then
   * resets the connection instead of passing the reply on, and stays down until `restore()` (a connection lost
   * between a command and its reply); `{ error }` answers it with that Redis error instead of forwarding it.
   * (A command is matched within one chunk: a client's command written at once arrives at once on loopback.)
   */
  intercept(marker: string, action: InterceptAction): void {
    this.rule = { marker: Buffer.from(marker), action };
    this.fired = false;
  }

  /** whether the last `intercept` rule has met its command and its action is complete (the line reset, or answered) */
  get intercepted(): boolean {
    return this.fired;
  }

  restore(): void {
    this.down = false;
    this.stalled = false;
    for (const socket of this.sockets) socket.resume();
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(client: net.Socket): void {
    this.accepted++;
    if (this.down) {
      reset(client);
      return;
    }
    const upstream = net.connect(this.targetPort, this.targetHost);
    this.sockets.add(client);
    this.sockets.add(upstream);
    const drop = () => {
      client.destroy();
      upstream.destroy();
      this.sockets.delete(client);
      this.sockets.delete(upstream);
    };
    client.on('error', drop).on('close', drop);
    upstream.on('error', drop).on('close', drop);
    let loseReply = false;
    client.on('data', (chunk: Buffer) => {
      const rule = this.rule;
      if (rule !== null && chunk.includes(rule.marker)) {
        this.rule = null;
        if (rule.action !== 'lose-reply') {
          client.write(`-${rule.action.error.replace(/[\r\n]/g, ' ')}\r\n`);
          this.fired = true;
          return;
        }
        loseReply = true;
      }
      upstream.write(chunk);
    });
    upstream.on('data', (chunk: Buffer) => {
      if (!loseReply) {
        client.write(chunk);
        return;
      }
      this.cut();
      this.fired = true;
    });
    if (this.stalled) {
      client.pause();
      upstream.pause();
    }
  }
}

export type InterceptAction = 'lose-reply' | { readonly error: string };

interface InterceptRule {
  readonly marker: Buffer;
  readonly action: InterceptAction;
}

/**
 * Resets the connection (RST), or closes it when its write side has already ended. `resetAndDestroy()` on a socket
 * with a shutdown pending fails with EINVAL (libuv refuses to reset a stream that is shutting down) and leaves its
 * handle open for good: the test process then never exits (node spins in its handle cleanup; seen as "1 TCP handle
 * open ?:? -> ?:? (destroyed)" from the leak check, and a hung mocha).
 */
function reset(socket: net.Socket): void {
  if (socket.writableEnded) socket.destroy();
  else socket.resetAndDestroy();
}
