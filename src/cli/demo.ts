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

/** The demo's run: its producer, its fake nodes, the deployments it made, and the helpers its steps share. */
class Demo {
  readonly producer: LifecycleProducer;
  readonly nodes: FakeNode[] = [];
  readonly tracked: Tracked[] = [];
  private readonly steps = 9;
  private step = 0;

  constructor(readonly options: DemoOptions) {
    this.producer = new LifecycleProducer({ connection: options.redisUrl, prefix: options.config.prefix });
  }

  get config(): FleetConfig {
    return this.options.config;
  }

  say(line: string): void {
    this.options.say(line);
  }

  /** Announces the next step. */
  next(title: string): void {
    this.say(`\n[${++this.step}/${this.steps}] ${title}`);
  }

  async api<T>(path: string): Promise<T> {
    const res = await fetch(`${this.options.apiUrl}${path}`);
    if (!res.ok) throw new Error(`GET ${path}: HTTP ${res.status}`);
    return (await res.json()) as T;
  }

  async stateOf(id: string): Promise<DeploymentState> {
    return (await this.api<{ state: DeploymentState }>(`/api/deployments/${id}`)).state;
  }

  async waitUntil(what: string, check: () => Promise<boolean>, timeoutS: number): Promise<void> {
    const started = Date.now();
    for (;;) {
      if (await check()) return;
      const elapsed = (Date.now() - started) / 1000;
      if (elapsed > timeoutS) throw new Error(`gave up waiting for ${what} after ${timeoutS} s`);
      this.options.progress(`${bar(elapsed / timeoutS)} ${what} (${Math.round(elapsed)} s)`);
      await sleep(250);
    }
  }

  async node(): Promise<{ fake: FakeNode; url: string }> {
    const n = new FakeNode();
    this.nodes.push(n);
    return { fake: n, url: await n.listen() };
  }

  async deployment(name: string, story: string, endpoint?: { url: string; kind: 'node_port' | 'cluster_dns' }): Promise<string> {
    const id = randomUUID();
    this.tracked.push({ id, name, story });
    await this.producer.createDeployment({ deploymentId: id, name, ...(endpoint ? { endpoint } : {}) });
    return id;
  }

  async attempt(deploymentId: string): Promise<string> {
    const attemptId = randomUUID();
    await this.producer.createAttempt({ deploymentId, attemptId });
    await this.waitUntil(
      `${deploymentId.slice(0, 8)} attempt created`,
      async () => {
        const d = await this.api<{ currentAttempt: { id: string } | null }>(`/api/deployments/${deploymentId}`).catch(() => null);
        return d?.currentAttempt?.id === attemptId;
      },
      30,
    );
    return attemptId;
  }

  async close(): Promise<void> {
    await this.producer.close();
    await Promise.all(this.nodes.map((n) => n.close()));
  }
}

type Dispatch = { source: string; reason: string; url: string | null };

export async function runDemo(options: DemoOptions): Promise<DemoReport> {
  const demo = new Demo(options);
  try {
    await demo.api('/healthz').catch(() => {
      throw new Error(`no fleet answers at ${options.apiUrl}: start one with \`npm start\` (or pass --api)`);
    });
    const web = await aDeploymentThatSucceeds(demo);
    await aDeploymentBehindClusterDns(demo);
    await anAttemptThatFails(demo);
    await anAttemptCancelledThenRetriedAndTornDown(demo);
    const hung = await aRunnerThatHangs(demo);
    await aTeardownRefusedUntilForced(demo, hung);
    const fallback = await aNodeThatStopsAnswering(demo, web);
    await theNodeRecovers(demo, web);
    return await summary(demo, fallback);
  } finally {
    await demo.close();
  }
}

async function aDeploymentThatSucceeds(demo: Demo): Promise<{ id: string; node: FakeNode }> {
  const { producer } = demo;
  demo.next('a deployment that succeeds: pending -> deploying -> ready, served on its node');
  const good = await demo.node();
  const web = await demo.deployment('demo-web', 'succeeds, then its node wedges: dispatch falls back to public', {
    url: good.url,
    kind: 'node_port',
  });
  const webAttempt = await demo.attempt(web);
  await producer.startAttempt({ deploymentId: web, attemptId: webAttempt });
  await producer.heartbeat({ deploymentId: web, attemptId: webAttempt });
  await producer.endAttempt({ deploymentId: web, attemptId: webAttempt, outcome: 'succeeded', endpoint: { url: good.url, kind: 'node_port' } });
  await demo.waitUntil('demo-web to be ready', async () => (await demo.stateOf(web)) === 'ready', 30);
  demo.say(`  dispatch: ${JSON.stringify(await demo.api(`/api/deployments/${web}/endpoint`))}`);
  return { id: web, node: good.fake };
}

async function aDeploymentBehindClusterDns(demo: Demo): Promise<void> {
  const { producer } = demo;
  demo.next('a deployment behind cluster DNS: served private regardless of heartbeats');
  const dns = await demo.deployment('demo-dns', 'ready behind cluster DNS');
  const dnsAttempt = await demo.attempt(dns);
  await producer.startAttempt({ deploymentId: dns, attemptId: dnsAttempt });
  await producer.endAttempt({
    deploymentId: dns,
    attemptId: dnsAttempt,
    outcome: 'succeeded',
    endpoint: { url: 'http://demo-dns.demo.svc.cluster.local', kind: 'cluster_dns' },
  });
  await demo.waitUntil('demo-dns to be ready', async () => (await demo.stateOf(dns)) === 'ready', 30);
}

async function anAttemptThatFails(demo: Demo): Promise<void> {
  const { producer } = demo;
  demo.next('a deployment whose attempt fails: deploying -> failed');
  const bad = await demo.deployment('demo-broken', 'its attempt fails');
  const badAttempt = await demo.attempt(bad);
  await producer.startAttempt({ deploymentId: bad, attemptId: badAttempt });
  await producer.endAttempt({ deploymentId: bad, attemptId: badAttempt, outcome: 'failed', reason: 'image pull backoff' });
  await demo.waitUntil('demo-broken to fail', async () => (await demo.stateOf(bad)) === 'failed', 30);
}

async function anAttemptCancelledThenRetriedAndTornDown(demo: Demo): Promise<void> {
  const { producer } = demo;
  demo.next('a deployment whose attempt is cancelled, then retried and torn down');
  const cancelled = await demo.deployment('demo-cancelled', 'cancelled, retried, torn down');
  const c1 = await demo.attempt(cancelled);
  await producer.startAttempt({ deploymentId: cancelled, attemptId: c1 });
  await producer.cancelAttempt({ deploymentId: cancelled, attemptId: c1, reason: 'superseded by a newer commit' });
  await demo.waitUntil('demo-cancelled to fail', async () => (await demo.stateOf(cancelled)) === 'failed', 30);
  const c2 = await demo.attempt(cancelled);
  await producer.startAttempt({ deploymentId: cancelled, attemptId: c2 });
  await producer.endAttempt({ deploymentId: cancelled, attemptId: c2, outcome: 'succeeded' });
  await demo.waitUntil('the retry to be ready', async () => (await demo.stateOf(cancelled)) === 'ready', 30);
  await producer.teardown({ deploymentId: cancelled });
  await demo.waitUntil('demo-cancelled to be torn down', async () => (await demo.stateOf(cancelled)) === 'pending', 30);
}

async function aRunnerThatHangs(demo: Demo): Promise<string> {
  const { producer, config } = demo;
  demo.next(`a deployment whose runner hangs: no heartbeats for ${config.orphanAfterS} s, the sweep marks it unknown`);
  const hung = await demo.deployment('demo-hung', 'runner vanished: unknown, teardown refused, forced');
  const hungAttempt = await demo.attempt(hung);
  await producer.startAttempt({ deploymentId: hung, attemptId: hungAttempt });
  await demo.waitUntil('demo-hung to start', async () => (await demo.stateOf(hung)) === 'deploying', 30);
  await demo.waitUntil(
    `the sweep to orphan demo-hung (FLEET_ORPHAN_AFTER_S=${config.orphanAfterS}, sweep every ${config.sweepEveryS} s)`,
    async () => (await demo.stateOf(hung)) === 'unknown',
    config.orphanAfterS + 3 * config.sweepEveryS + 30,
  );
  return hung;
}

async function aTeardownRefusedUntilForced(demo: Demo, hung: string): Promise<void> {
  const { producer } = demo;
  demo.next('teardown of an unknown deployment is refused until forced');
  const refused = await producer.teardown({ deploymentId: hung });
  await demo.waitUntil('the refusal', async () => (await producer.queue.getJobState(refused.jobId)) === 'failed', 30);
  const job = await producer.queue.getJob(refused.jobId);
  demo.say(`  refused: ${printable(job?.failedReason ?? '?')}`); // stored text: its line breaks escaped too
  await producer.teardown({ deploymentId: hung, force: true });
  await demo.waitUntil('the forced teardown', async () => (await demo.stateOf(hung)) === 'pending', 30);
}

async function aNodeThatStopsAnswering(demo: Demo, web: { id: string; node: FakeNode }): Promise<Dispatch | null> {
  const { config } = demo;
  demo.next(`demo-web's node stops answering /ready: within ${config.readyWindowS} s + one tick dispatch falls back`);
  web.node.wedged = true;
  let fallback: Dispatch | null = null;
  await demo.waitUntil(
    `dispatch to fall back (FLEET_READY_WINDOW_S=${config.readyWindowS})`,
    async () => {
      const answer = await demo.api<Dispatch>(`/api/deployments/${web.id}/endpoint`);
      if (answer.source === 'private') return false;
      fallback = answer;
      return true;
    },
    config.readyWindowS + 3 * config.sweepEveryS + 30,
  );
  demo.say(`  dispatch: ${JSON.stringify(fallback)}`);
  return fallback;
}

async function theNodeRecovers(demo: Demo, web: { id: string; node: FakeNode }): Promise<void> {
  const { config } = demo;
  demo.next('the node recovers: the next tick stamps it and dispatch serves it again');
  web.node.wedged = false;
  await demo.waitUntil(
    'dispatch to serve the node again',
    async () => (await demo.api<{ source: string }>(`/api/deployments/${web.id}/endpoint`)).source === 'private',
    3 * config.sweepEveryS + 30,
  );
}

async function summary(demo: Demo, fallback: Dispatch | null): Promise<DemoReport> {
  demo.next('summary');
  const reached = new Set<DeploymentState>();
  for (const t of demo.tracked) {
    const history = await demo.api<{ items: Array<{ to: DeploymentState }> }>(`/api/deployments/${t.id}/transitions`);
    for (const h of history.items) reached.add(h.to);
    const d = await demo.api<{ state: string; version: number }>(`/api/deployments/${t.id}`);
    const e = await demo.api<{ source: string; reason: string }>(`/api/deployments/${t.id}/endpoint`);
    demo.say(`  ${t.name.padEnd(15)} ${d.state.padEnd(9)} v${String(d.version).padEnd(3)} dispatch ${e.source}/${e.reason.padEnd(22)} ${t.story}`);
    demo.say(`  ${''.padEnd(15)} ${t.id}`);
  }
  const statesReached = (['pending', 'deploying', 'ready', 'failed', 'unknown'] as const).filter((s) => reached.has(s));
  const ok = statesReached.length === 5 && fallback !== null;
  demo.say(`\nstates reached: ${statesReached.join(', ')}; dispatch fallback ${fallback !== null ? 'seen' : 'NOT seen'}`);
  return { statesReached, fallbackSeen: fallback !== null, ok };
}

function bar(fraction: number): string {
  const width = 24;
  const filled = Math.max(0, Math.min(width, Math.round(fraction * width)));
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
}
