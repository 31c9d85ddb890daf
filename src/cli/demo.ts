/**
 * `fleet demo`: a realistic workload through the public interfaces (the producer SDK for events, the HTTP API for
 * reads and dispatch), against a running fleet (`fleet start`). Deployments get endpoints that really answer
 * `/ready` on loopback; attempts succeed, fail, get cancelled, hang and get orphaned; a node stops answering and
 * dispatch falls back to the public endpoint; deployments are torn down. Watch it in Bull Board and `fleet tail`.
 */
import { randomUUID } from 'node:crypto';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { FleetConfig } from '../config';
import type { DeploymentState } from '../machine';
import { LifecycleProducer } from '../queues/producer';
import { printable, sleep } from '../util';

export interface DemoOptions {
  readonly config: FleetConfig;
  readonly redisUrl: string;
  /** the fleet's HTTP API, e.g. http://127.0.0.1:3000 */
  readonly apiUrl: string;
  /** progress and narration (stderr) */
  readonly say: (line: string) => void;
  /** the progress bar, redrawn in place when the output is a terminal */
  readonly progress: (line: string) => void;
}

export interface DemoReport {
  readonly statesReached: readonly DeploymentState[];
  readonly fallbackSeen: boolean;
  readonly ok: boolean;
}

/** A loopback HTTP server standing in for a deployment's node: answers /ready with 200, or 503 once "wedged". */
class FakeNode {
  wedged = false;
  private readonly server = http.createServer((req, res) => {
    res.statusCode = req.url === '/ready' && !this.wedged ? 200 : 503;
    res.end(res.statusCode === 200 ? 'ok' : 'not ready');
  });
  async listen(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }
  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

interface Tracked {
  readonly id: string;
  readonly name: string;
  readonly story: string;
}

export async function runDemo(options: DemoOptions): Promise<DemoReport> {
  const { config, say } = options;
  const producer = new LifecycleProducer({ connection: options.redisUrl, prefix: config.prefix });
  const nodes: FakeNode[] = [];
  const tracked: Tracked[] = [];
  const api = async <T>(path: string): Promise<T> => {
    const res = await fetch(`${options.apiUrl}${path}`);
    if (!res.ok) throw new Error(`GET ${path}: HTTP ${res.status}`);
    return (await res.json()) as T;
  };
  const stateOf = async (id: string) => (await api<{ state: DeploymentState }>(`/api/deployments/${id}`)).state;
  const waitUntil = async (what: string, check: () => Promise<boolean>, timeoutS: number) => {
    const started = Date.now();
    for (;;) {
      if (await check()) return;
      const elapsed = (Date.now() - started) / 1000;
      if (elapsed > timeoutS) throw new Error(`gave up waiting for ${what} after ${timeoutS} s`);
      options.progress(`${bar(elapsed / timeoutS)} ${what} (${Math.round(elapsed)} s)`);
      await sleep(250);
    }
  };
  const node = async () => {
    const n = new FakeNode();
    nodes.push(n);
    return { fake: n, url: await n.listen() };
  };
  const deployment = async (name: string, story: string, endpoint?: { url: string; kind: 'node_port' | 'cluster_dns' }) => {
    const id = randomUUID();
    tracked.push({ id, name, story });
    await producer.createDeployment({ deploymentId: id, name, ...(endpoint ? { endpoint } : {}) });
    return id;
  };
  const attempt = async (deploymentId: string) => {
    const attemptId = randomUUID();
    await producer.createAttempt({ deploymentId, attemptId });
    await waitUntil(`${deploymentId.slice(0, 8)} attempt created`, async () => {
      const d = await api<{ currentAttempt: { id: string } | null }>(`/api/deployments/${deploymentId}`).catch(() => null);
      return d?.currentAttempt?.id === attemptId;
    }, 30);
    return attemptId;
  };
  const steps = 9;
  let step = 0;
  const next = (title: string) => say(`\n[${++step}/${steps}] ${title}`);

  try {
    await api('/healthz').catch(() => {
      throw new Error(`no fleet answers at ${options.apiUrl}: start one with \`npm start\` (or pass --api)`);
    });

    next('a deployment that succeeds: pending -> deploying -> ready, served on its node');
    const good = await node();
    const web = await deployment('demo-web', 'succeeds, then its node wedges: dispatch falls back to public', { url: good.url, kind: 'node_port' });
    const webAttempt = await attempt(web);
    await producer.startAttempt({ deploymentId: web, attemptId: webAttempt });
    await producer.heartbeat({ deploymentId: web, attemptId: webAttempt });
    await producer.endAttempt({ deploymentId: web, attemptId: webAttempt, outcome: 'succeeded', endpoint: { url: good.url, kind: 'node_port' } });
    await waitUntil('demo-web to be ready', async () => (await stateOf(web)) === 'ready', 30);
    say(`  dispatch: ${JSON.stringify(await api(`/api/deployments/${web}/endpoint`))}`);

    next('a deployment behind cluster DNS: served private regardless of heartbeats');
    const dns = await deployment('demo-dns', 'ready behind cluster DNS');
    const dnsAttempt = await attempt(dns);
    await producer.startAttempt({ deploymentId: dns, attemptId: dnsAttempt });
    await producer.endAttempt({
      deploymentId: dns,
      attemptId: dnsAttempt,
      outcome: 'succeeded',
      endpoint: { url: 'http://demo-dns.demo.svc.cluster.local', kind: 'cluster_dns' },
    });
    await waitUntil('demo-dns to be ready', async () => (await stateOf(dns)) === 'ready', 30);

    next('a deployment whose attempt fails: deploying -> failed');
    const bad = await deployment('demo-broken', 'its attempt fails');
    const badAttempt = await attempt(bad);
    await producer.startAttempt({ deploymentId: bad, attemptId: badAttempt });
    await producer.endAttempt({ deploymentId: bad, attemptId: badAttempt, outcome: 'failed', reason: 'image pull backoff' });
    await waitUntil('demo-broken to fail', async () => (await stateOf(bad)) === 'failed', 30);

    next('a deployment whose attempt is cancelled, then retried and torn down');
    const cancelled = await deployment('demo-cancelled', 'cancelled, retried, torn down');
    const c1 = await attempt(cancelled);
    await producer.startAttempt({ deploymentId: cancelled, attemptId: c1 });
    await producer.cancelAttempt({ deploymentId: cancelled, attemptId: c1, reason: 'superseded by a newer commit' });
    await waitUntil('demo-cancelled to fail', async () => (await stateOf(cancelled)) === 'failed', 30);
    const c2 = await attempt(cancelled);
    await producer.startAttempt({ deploymentId: cancelled, attemptId: c2 });
    await producer.endAttempt({ deploymentId: cancelled, attemptId: c2, outcome: 'succeeded' });
    await waitUntil('the retry to be ready', async () => (await stateOf(cancelled)) === 'ready', 30);
    await producer.teardown({ deploymentId: cancelled });
    await waitUntil('demo-cancelled to be torn down', async () => (await stateOf(cancelled)) === 'pending', 30);

    next(`a deployment whose runner hangs: no heartbeats for ${config.orphanAfterS} s, the sweep marks it unknown`);
    const hung = await deployment('demo-hung', 'runner vanished: unknown, teardown refused, forced');
    const hungAttempt = await attempt(hung);
    await producer.startAttempt({ deploymentId: hung, attemptId: hungAttempt });
    await waitUntil('demo-hung to start', async () => (await stateOf(hung)) === 'deploying', 30);
    await waitUntil(
      `the sweep to orphan demo-hung (FLEET_ORPHAN_AFTER_S=${config.orphanAfterS}, sweep every ${config.sweepEveryS} s)`,
      async () => (await stateOf(hung)) === 'unknown',
      config.orphanAfterS + 3 * config.sweepEveryS + 30,
    );

    next('teardown of an unknown deployment is refused until forced');
    const refused = await producer.teardown({ deploymentId: hung });
    await waitUntil('the refusal', async () => (await producer.queue.getJobState(refused.jobId)) === 'failed', 30);
    const job = await producer.queue.getJob(refused.jobId);
    say(`  refused: ${printable(job?.failedReason ?? '?')}`); // stored text: its line breaks escaped too
    await producer.teardown({ deploymentId: hung, force: true });
    await waitUntil('the forced teardown', async () => (await stateOf(hung)) === 'pending', 30);

    next(`demo-web's node stops answering /ready: within ${config.readyWindowS} s + one tick dispatch falls back`);
    good.fake.wedged = true;
    let fallback: { source: string; reason: string; url: string | null } | null = null;
    await waitUntil(
      `dispatch to fall back (FLEET_READY_WINDOW_S=${config.readyWindowS})`,
      async () => {
        const answer = await api<{ source: string; reason: string; url: string | null }>(`/api/deployments/${web}/endpoint`);
        if (answer.source === 'private') return false;
        fallback = answer;
        return true;
      },
      config.readyWindowS + 3 * config.sweepEveryS + 30,
    );
    say(`  dispatch: ${JSON.stringify(fallback)}`);

    next('the node recovers: the next tick stamps it and dispatch serves it again');
    good.fake.wedged = false;
    await waitUntil(
      'dispatch to serve the node again',
      async () => (await api<{ source: string }>(`/api/deployments/${web}/endpoint`)).source === 'private',
      3 * config.sweepEveryS + 30,
    );

    next('summary');
    const reached = new Set<DeploymentState>();
    for (const t of tracked) {
      const history = await api<{ items: Array<{ to: DeploymentState }> }>(`/api/deployments/${t.id}/transitions`);
      for (const h of history.items) reached.add(h.to);
      const d = await api<{ state: string; version: number }>(`/api/deployments/${t.id}`);
      const e = await api<{ source: string; reason: string }>(`/api/deployments/${t.id}/endpoint`);
      say(`  ${t.name.padEnd(15)} ${d.state.padEnd(9)} v${String(d.version).padEnd(3)} dispatch ${e.source}/${e.reason.padEnd(22)} ${t.story}`);
      say(`  ${''.padEnd(15)} ${t.id}`);
    }
    const statesReached = (['pending', 'deploying', 'ready', 'failed', 'unknown'] as const).filter((s) => reached.has(s));
    const ok = statesReached.length === 5 && fallback !== null;
    say(`\nstates reached: ${statesReached.join(', ')}; dispatch fallback ${fallback !== null ? 'seen' : 'NOT seen'}`);
    return { statesReached, fallbackSeen: fallback !== null, ok };
  } finally {
    await producer.close();
    await Promise.all(nodes.map((n) => n.close()));
  }
}

function bar(fraction: number): string {
  const width = 24;
  const filled = Math.max(0, Math.min(width, Math.round(fraction * width)));
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
}
