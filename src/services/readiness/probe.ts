/**
 * One readiness probe (docs/architecture.md, "Readiness probing"): `GET <endpoint>/ready`, and the lanes that bound
 * how many run at once in this process (FLEET_PROBE_CONCURRENCY), shared by every shard the process runs.
 */
import * as http from 'node:http';
import * as https from 'node:https';

/**
 * A process's probe lanes: at most `size` probes in flight, whichever shards they belong to. A freed lane goes to
 * the waiter with the lowest rank (its shard's place in the tick; arrival order among equals), so the shards a
 * process runs side by side keep the tick's order: least recently probed first, across shards too.
 */
export class ProbeLanes {
  private free: number;
  private readonly waiting: Array<{ readonly rank: number; readonly resume: () => void }> = [];

  constructor(readonly size: number) {
    if (!Number.isInteger(size) || size < 1) throw new RangeError(`probe lanes: size must be a whole number >= 1, got ${size}`);
    this.free = size;
  }

  /** resolves when a lane is this caller's; give it back with `release()` */
  acquire(rank = 0): Promise<void> {
    if (this.free > 0) {
      this.free--;
      return Promise.resolve();
    }
    return new Promise<void>((resume) => {
      let at = this.waiting.length;
      while (at > 0 && (this.waiting[at - 1]?.rank ?? 0) > rank) at--;
      this.waiting.splice(at, 0, { rank, resume });
    });
  }

  release(): void {
    const next = this.waiting.shift();
    if (next !== undefined) next.resume();
    else this.free++;
  }

  /** lanes in use */
  get busy(): number {
    return this.size - this.free;
  }
}

export type ProbeOutcome = { readonly ok: true } | { readonly ok: false; readonly reason: string };

/**
 * The probe URL: the endpoint's path joined with `ready` (`http://h:1/app/` -> `http://h:1/app/ready`), built with
 * the URL API so that nothing in the stored URL (a query, a fragment, credentials: refused at intake, but a row may
 * predate that) can change what is fetched. Throws on an unparsable URL.
 */
export function readinessUrl(endpointUrl: string): string {
  const url = new URL(endpointUrl);
  url.username = '';
  url.password = '';
  url.search = '';
  url.hash = '';
  url.pathname = `${url.pathname.replace(/\/+$/, '')}/ready`;
  return url.toString();
}

/**
 * GETs `<endpoint>/ready` once: ok on 2xx. A redirect is a failure and is never followed (so a probe can never be
 * sent to another host); so are other statuses, connection errors and anything slower than `timeoutMs` from start
 * to response headers. No connection reuse (no sockets outlive the probe) and the body is never read.
 */
export function probeReady(endpointUrl: string, timeoutMs: number): Promise<ProbeOutcome> {
  let url: URL;
  try {
    url = new URL(readinessUrl(endpointUrl));
  } catch {
    return Promise.resolve({ ok: false, reason: 'invalid_url' });
  }
  const client = url.protocol === 'http:' ? http : url.protocol === 'https:' ? https : null;
  if (client === null) return Promise.resolve({ ok: false, reason: 'invalid_url' });

  return new Promise<ProbeOutcome>((resolve) => {
    let settled = false;
    const finish = (outcome: ProbeOutcome) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      req.destroy();
      resolve(outcome);
    };
    const req = client.request(
      url,
      { method: 'GET', agent: false, headers: { 'user-agent': 'lifecycle-fleet-sweep', accept: '*/*', connection: 'close' } },
      (res) => {
        const status = res.statusCode ?? 0;
        res.destroy();
        if (status >= 200 && status < 300) finish({ ok: true });
        else finish({ ok: false, reason: status >= 300 && status < 400 ? 'redirect' : `http_${status}` });
      },
    );
    const timer = setTimeout(() => finish({ ok: false, reason: 'timeout' }), timeoutMs);
    req.on('error', (err: NodeJS.ErrnoException) => finish({ ok: false, reason: errorReason(err) }));
    req.end();
  });
}

function errorReason(err: NodeJS.ErrnoException): string {
  switch (err.code) {
    case 'ECONNREFUSED':
      return 'refused';
    case 'ECONNRESET':
    case 'EPIPE':
      return 'reset';
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return 'dns';
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
      return 'unreachable';
    default:
      return err.code?.startsWith('ERR_TLS') || err.code?.includes('CERT') ? 'tls' : 'error';
  }
}
