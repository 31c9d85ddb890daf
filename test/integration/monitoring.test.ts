/**
 * The Grafana dashboard (docs/grafana/lifecycle-fleet.json) and the Prometheus alert rules (docs/prometheus/):
 * promtool accepts the rules and passes their unit tests, the dashboard is importable, and every metric, label
 * and label value they name is what a live fleet's /metrics serves.
 */
import { spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { expect } from 'chai';
import { startFleet, type Fleet } from '../../src/app';
import { loadConfig } from '../../src/config';
import { silentLogger } from '../../src/log';
import { TransitionConsumer } from '../../src/streams/consumer';
import { transitionStreamKey } from '../../src/streams/outbox-relay';
import type { JobOutcome, ReadinessMeasure, SweepResult } from '../../src/metrics';
import type { DispatchReason, DispatchSource } from '../../src/services/dispatch/resolve-endpoint';
import { repoRoot } from '../../src/util';
import { openTestDatabase, type TestDatabase } from '../helpers/db';
import { testEnv } from '../helpers/env';
import { expressionNames, parseExposition, ruleExpressions, type Family } from '../helpers/promql';
import { ReadyServer } from '../helpers/ready-server';
import { dropPrefix, uniquePrefix } from '../helpers/redis';
import { waitFor } from '../helpers/wait';

const ROOT = repoRoot();
const RULES = path.join(ROOT, 'docs', 'prometheus', 'alerts.yml');
const RULE_TESTS = path.join(ROOT, 'docs', 'prometheus', 'alerts.test.yml');
const DASHBOARD = path.join(ROOT, 'docs', 'grafana', 'lifecycle-fleet.json');

/** Labels Prometheus adds to every scraped series: not on /metrics, and selected by the dashboard's variables. */
const TARGET_LABELS = new Set(['job', 'instance']);

/**
 * Label values the fleet can emit that a short run does not show (gave_up, stale, ...): typed against the
 * product's own unions, so a value added or renamed there fails to compile here until this list follows.
 */
const every = <T extends string>(values: Record<T, true>): Set<string> => new Set(Object.keys(values));
const KNOWN_VALUES: Record<string, Record<string, Set<string>>> = {
  fleet_jobs_total: {
    outcome: every<JobOutcome>({
      applied: true,
      noop: true,
      rejected: true,
      invalid: true,
      not_found: true,
      retry: true,
      gave_up: true,
      error: true,
    }),
  },
  fleet_sweep_results_total: {
    result: every<SweepResult>({ probed: true, stamped: true, failed: true, unprobed: true, stale: true, orphaned: true, expired: true }),
  },
  fleet_readiness_endpoints: {
    measure: every<ReadinessMeasure>({ set: true, unprobed_last_tick: true, probed_last_tick: true, needed_per_tick: true }),
  },
  fleet_dispatch_total: {
    source: every<DispatchSource>({ private: true, public: true, none: true }),
    reason: every<DispatchReason>({
      ready_heartbeat_fresh: true,
      cluster_dns: true,
      not_ready: true,
      no_endpoint: true,
      no_heartbeat: true,
      ready_heartbeat_stale: true,
      endpoint_not_allowed: true,
    }),
  },
};

interface Target {
  readonly expr: string;
}
interface Panel {
  readonly id?: number;
  readonly type?: string;
  readonly title?: string;
  readonly datasource?: { readonly type?: string; readonly uid?: string };
  readonly targets?: readonly Target[];
  readonly panels?: readonly Panel[];
}
interface Dashboard {
  readonly title?: string;
  readonly uid?: string;
  readonly schemaVersion?: number;
  readonly panels?: readonly Panel[];
  readonly templating?: { readonly list?: ReadonlyArray<{ readonly name: string; readonly type: string; readonly query?: unknown }> };
}

function readDashboard(): Dashboard {
  return JSON.parse(fs.readFileSync(DASHBOARD, 'utf8')) as Dashboard;
}

/** The panels that draw something: rows' own and nested panels flattened, the rows themselves left out. */
function drawnPanels(dashboard: Dashboard): Panel[] {
  const all = (dashboard.panels ?? []).flatMap((p) => [p, ...(p.panels ?? [])]);
  return all.filter((p) => p.type !== 'row');
}

/** Every PromQL expression in the dashboard (panel targets and variable queries) and the rules, with where it is. */
function namedExpressions(): Array<{ where: string; expr: string }> {
  const dashboard = readDashboard();
  const panels = drawnPanels(dashboard).flatMap((p) =>
    (p.targets ?? []).map((t, i) => ({ where: `dashboard panel "${p.title ?? p.id}" target ${i}`, expr: t.expr })),
  );
  const variables = (dashboard.templating?.list ?? []).flatMap((v) => {
    if (v.type !== 'query') return [];
    const query = typeof v.query === 'string' ? v.query : ((v.query as { query?: string } | undefined)?.query ?? '');
    // label_values(selector, label): the selector is an expression, the label must be on its series
    const m = /^label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$/.exec(query);
    return [{ where: `dashboard variable ${v.name}`, expr: m === null ? query : `count by (${m[2]}) (${m[1]})` }];
  });
  const rules = ruleExpressions(fs.readFileSync(RULES, 'utf8')).map((expr, i) => ({ where: `alerts.yml rule ${i}`, expr }));
  return [...panels, ...variables, ...rules];
}

function which(tool: string): string | null {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    const candidate = path.join(dir, tool);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      return candidate;
    } catch {
      // not in this directory
    }
  }
  return null;
}

describe('monitoring: the Grafana dashboard and the Prometheus alert rules', function () {
  this.timeout(120_000);

  describe('promtool', () => {
    let promtool = '';
    before(function () {
      const found = which('promtool');
      if (found === null) {
        if (process.env.CI === 'true') throw new Error("promtool is missing: `npm test` installs it as root with Debian's prometheus package");
        console.warn('\n  !!! SKIPPING the promtool checks: promtool is not installed (apt-get install --no-install-recommends prometheus) !!!\n');
        this.skip();
      }
      promtool = found ?? '';
    });
    const run = (...args: string[]) => spawnSync(promtool, args, { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });

    it('`promtool check rules` accepts docs/prometheus/alerts.yml, every rule of it', () => {
      const out = run('check', 'rules', RULES);
      console.log(`      ${(out.stdout + out.stderr).trim().replaceAll('\n', '\n      ')}`);
      expect(out.status, out.stdout + out.stderr).to.equal(0);
      expect(out.stdout).to.contain(`SUCCESS: ${ruleExpressions(fs.readFileSync(RULES, 'utf8')).length} rules found`);
    });

    it('`promtool test rules` passes docs/prometheus/alerts.test.yml, which covers every alert', () => {
      const out = run('test', 'rules', RULE_TESTS);
      console.log(`      ${(out.stdout + out.stderr).trim().replaceAll('\n', '\n      ')}`);
      expect(out.status, out.stdout + out.stderr).to.equal(0);
      expect(out.stdout).to.contain('SUCCESS');
      const alerts = [...fs.readFileSync(RULES, 'utf8').matchAll(/^\s*- alert: (\S+)$/gm)].map((m) => m[1]);
      const tested = new Set([...fs.readFileSync(RULE_TESTS, 'utf8').matchAll(/^\s*alertname: (\S+)$/gm)].map((m) => m[1]));
      expect(
        alerts.filter((a) => !tested.has(a)),
        'alerts without a unit test',
      ).to.deep.equal([]);
    });

    it("every dashboard query is valid PromQL (promtool checks them as recording rules, Grafana's variables filled in)", () => {
      const exprs = drawnPanels(readDashboard()).flatMap((p) => (p.targets ?? []).map((t) => t.expr));
      const rules = exprs.map((expr, i) => {
        const filled = expr.replaceAll('$__rate_interval', '5m').replace(/\$\{?[a-zA-Z_]+\}?/g, '.*');
        return `      - record: dashboard:query_${i}\n        expr: ${JSON.stringify(filled)}`;
      });
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-dashboard-'));
      try {
        const file = path.join(dir, 'dashboard-queries.yml');
        fs.writeFileSync(file, `groups:\n  - name: dashboard\n    rules:\n${rules.join('\n')}\n`);
        const out = run('check', 'rules', file);
        expect(out.status, out.stdout + out.stderr).to.equal(0);
        expect(out.stdout).to.contain(`SUCCESS: ${exprs.length} rules found`);
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  describe('the dashboard JSON', () => {
    it('parses, has a Prometheus datasource variable, and every panel has that datasource and a query', () => {
      const dashboard = readDashboard();
      expect(dashboard.title).to.equal('lifecycle-fleet');
      expect(dashboard.uid).to.be.a('string').and.not.equal('');
      expect(dashboard.schemaVersion).to.be.within(36, 41);
      const variables = dashboard.templating?.list ?? [];
      expect(variables.find((v) => v.name === 'datasource')).to.deep.include({ type: 'datasource', query: 'prometheus' });
      const panels = drawnPanels(dashboard);
      expect(panels.length).to.be.greaterThan(10);
      const faults = panels.flatMap((p) => {
        const name = `panel "${p.title ?? p.id}"`;
        const f: string[] = [];
        if (p.datasource?.type !== 'prometheus' || p.datasource.uid !== '${datasource}')
          f.push(`${name}: datasource is not the \${datasource} variable`);
        if ((p.targets ?? []).length === 0) f.push(`${name}: no target`);
        if ((p.targets ?? []).some((t) => typeof t.expr !== 'string' || t.expr.trim() === '')) f.push(`${name}: a target without expr`);
        return f;
      });
      expect(faults).to.deep.equal([]);
      const ids = (dashboard.panels ?? []).flatMap((p) => [p, ...(p.panels ?? [])]).map((p) => p.id);
      expect(new Set(ids).size, 'panel ids are unique').to.equal(ids.length);
    });
  });

  describe('against a live fleet', () => {
    let db: TestDatabase | null = null;
    let fleet: Fleet | null = null;
    let consumer: TransitionConsumer | null = null;
    const ready = new ReadyServer('ok');
    const prefix = uniquePrefix();
    let families = new Map<string, Family>();

    before(async () => {
      db = await openTestDatabase(4);
      const config = loadConfig({
        FLEET_PREFIX: prefix,
        FLEET_HTTP_PORT: '0',
        FLEET_SWEEP_EVERY_S: '1',
        FLEET_READY_WINDOW_S: '5',
        FLEET_PUBLIC_ENDPOINT_URL: 'http://127.0.0.1:9/public',
      });
      fleet = await startFleet(config, { redisUrl: testEnv().redisUrl, databaseUrl: db.url }, silentLogger, { http: true });
      const api = fleet.httpUrl ?? '';
      // a consumer group on the stream, for the partition metrics (lag, owner)
      consumer = new TransitionConsumer({
        redis: testEnv().redisUrl,
        streamKey: transitionStreamKey(prefix),
        group: 'monitoring',
        consumer: 'c1',
        startId: '0',
        handler: () => undefined,
      });
      void consumer.run().catch(() => undefined);
      const endpointUrl = await ready.listen();

      // a lifecycle to ready through the intake (transitions, the relay, probes), then an event the machine
      // rejects, a deployment that is not ready, and dispatch for both (private, and the public fallback)
      const readyId = randomUUID();
      const pendingId = randomUUID();
      const attemptId = randomUUID();
      const send = async (name: string, deploymentId: string, data: Record<string, unknown>) => {
        const res = await fetch(`${api}/api/events`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ name, data: { deploymentId, ...data } }),
        });
        expect(res.status, `${name}: ${await res.text()}`).to.equal(202);
      };
      const stateOf = async (id: string) => {
        const res = await fetch(`${api}/api/deployments/${id}`);
        return res.ok ? ((await res.json()) as { state: string }).state : undefined;
      };
      await send('deployment.create', readyId, { name: 'web' });
      await send('deployment.create', pendingId, { name: 'api' });
      await send('attempt.create', readyId, { attemptId });
      await send('attempt.start', readyId, { attemptId });
      await send('attempt.heartbeat', readyId, { attemptId });
      await send('attempt.end', readyId, { attemptId, outcome: 'succeeded', endpoint: { url: endpointUrl, kind: 'node_port' } });
      await waitFor('the deployment to be ready', async () => ((await stateOf(readyId)) === 'ready' ? true : undefined));
      await waitFor('the other deployment to exist', async () => ((await stateOf(pendingId)) !== undefined ? true : undefined));
      await send('deployment.resolve', readyId, { outcome: 'ready' }); // already ready: rejected
      for (const id of [readyId, pendingId]) {
        const res = await fetch(`${api}/api/deployments/${id}/endpoint`);
        const body = await res.text();
        expect(res.status, body).to.equal(200);
      }
      const scrapeText = async () => (await fetch(`${api}/metrics`)).text();
      await waitFor(
        'the rejected event and a probe shard to be counted, and a transition published',
        async () => {
          const text = await scrapeText();
          const f = parseExposition(text);
          const done =
            f.get('fleet_jobs_total')?.labels.get('outcome')?.has('rejected') === true &&
            f.get('fleet_sweep_results_total')?.labels.get('result')?.has('stamped') === true &&
            f.get('fleet_dispatch_total')?.labels.get('source')?.has('public') === true &&
            f.get('fleet_stream_partition_owner')?.labels.get('group')?.has('monitoring') === true &&
            Number(/^fleet_outbox_published_total (\S+)$/m.exec(text)?.[1] ?? 0) > 0;
          return done ? true : undefined;
        },
        60_000,
      );
      families = parseExposition(await scrapeText());
    });

    after(async () => {
      await consumer?.close();
      await fleet?.close(5000);
      await ready.close();
      await db?.close();
      await dropPrefix(prefix);
    });

    it('serves, with samples, every metric the dashboard and the rules name (histograms by their _bucket/_sum/_count)', () => {
      const missing = namedExpressions().flatMap(({ where, expr }) =>
        expressionNames(expr).selectors.flatMap((s) => {
          const family = familyOf(families, s.metric);
          return family === undefined || family.samples === 0 ? [`${s.metric || '{...}'} (${where})`] : [];
        }),
      );
      expect(missing, 'named in docs/ but not served on /metrics').to.deep.equal([]);
      // and the check above saw them all: the names it found include the families the issue asks for
      const named = new Set(namedExpressions().flatMap(({ expr }) => expressionNames(expr).selectors.map((s) => s.metric)));
      expect([...named]).to.include.members([
        'fleet_jobs_total',
        'fleet_job_duration_seconds_bucket',
        'fleet_transitions_total',
        'fleet_outbox_lag_seconds',
        'fleet_postgres_up',
        'fleet_outbox_published_total',
        'fleet_queue_jobs',
        'fleet_sweep_duration_seconds_bucket',
        'fleet_sweep_results_total',
        'fleet_readiness_endpoints',
        'fleet_dispatch_total',
        'fleet_stream_partition_length',
        'fleet_stream_group_lag',
        'fleet_stream_partition_owner',
      ]);
    });

    it('selects and groups only by labels those metrics carry, and matches only label values the fleet emits', () => {
      const faults = namedExpressions().flatMap(({ where, expr }) => {
        const names = expressionNames(expr);
        const used = names.selectors.map((s) => ({ s, family: familyOf(families, s.metric) }));
        const f: string[] = [];
        for (const { s, family } of used) {
          if (family === undefined) continue; // reported by the test above
          for (const m of s.matchers) {
            if (TARGET_LABELS.has(m.label)) continue;
            const seen = family.labels.get(m.label);
            if (seen === undefined) {
              f.push(`${s.metric} has no label ${m.label} (${where})`);
              continue;
            }
            const known = new Set([...seen, ...(KNOWN_VALUES[familyName(families, s.metric)]?.[m.label] ?? [])]);
            const values = m.op === '=' || m.op === '!=' ? [m.value] : /^[a-zA-Z0-9_.|]+$/.test(m.value) ? m.value.split('|') : [];
            for (const v of values)
              if (!known.has(v)) f.push(`${s.metric}{${m.label}${m.op}"${m.value}"}: "${v}" is not a value of ${m.label} (${where})`);
          }
        }
        const labels = new Set([...TARGET_LABELS, ...used.flatMap(({ family }) => [...(family?.labels.keys() ?? [])])]);
        for (const g of names.grouping) if (!labels.has(g)) f.push(`grouping by ${g}, which none of its metrics carry (${where})`);
        return f;
      });
      expect(faults).to.deep.equal([]);
    });
  });
});

/** The family a series name belongs to: itself, or the histogram / summary whose _bucket, _sum or _count it is. */
function familyOf(families: Map<string, Family>, series: string): Family | undefined {
  for (const family of families.values()) if (family.seriesNames.has(series)) return family;
  return undefined;
}

function familyName(families: Map<string, Family>, series: string): string {
  for (const [name, family] of families) if (family.seriesNames.has(series)) return name;
  return series;
}
