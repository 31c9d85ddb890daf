import { expect } from 'chai';
import { expressionNames, parseExposition, ruleExpressions } from '../helpers/promql';

// The name finder behind the dashboard and alert checks (test/integration/monitoring.test.ts): if it missed a
// name, a misspelt metric in docs/ would pass.
describe('PromQL name finder (test helper)', () => {
  it('finds the selectors with their matchers, not functions, keywords, strings, ranges or Grafana variables', () => {
    const names = expressionNames(
      'histogram_quantile(0.99, sum by (le, name) (rate(fleet_job_duration_seconds_bucket{job=~"$job", instance=~"$instance"}[$__rate_interval]))) ' +
        '/ on (job) group_left sum without (instance) (rate(fleet_jobs_total{outcome=~"rejected|gave_up",name!="a}b"}[5m] offset 1h)) > bool 0.5 ' +
        'and fleet_outbox_lag_seconds > 1e3 unless absent(fleet_process_cpu_seconds_total)',
    );
    expect(names.selectors).to.deep.equal([
      {
        metric: 'fleet_job_duration_seconds_bucket',
        matchers: [
          { label: 'job', op: '=~', value: '$job' },
          { label: 'instance', op: '=~', value: '$instance' },
        ],
      },
      {
        metric: 'fleet_jobs_total',
        matchers: [
          { label: 'outcome', op: '=~', value: 'rejected|gave_up' },
          { label: 'name', op: '!=', value: 'a}b' },
        ],
      },
      { metric: 'fleet_outbox_lag_seconds', matchers: [] },
      { metric: 'fleet_process_cpu_seconds_total', matchers: [] },
    ]);
    expect(names.grouping).to.deep.equal(['le', 'name', 'job', 'instance']);
  });

  it('reads a scrape into families, histograms under their own name', () => {
    const families = parseExposition(
      [
        '# HELP fleet_jobs_total x',
        '# TYPE fleet_jobs_total counter',
        'fleet_jobs_total{name="attempt.start",outcome="applied"} 3',
        '# TYPE fleet_sweep_duration_seconds histogram',
        'fleet_sweep_duration_seconds_bucket{le="0.005"} 1',
        'fleet_sweep_duration_seconds_sum 0.002',
        'fleet_sweep_duration_seconds_count 1',
        '# TYPE fleet_dispatch_total counter',
        '',
      ].join('\n'),
    );
    expect([...families.keys()]).to.deep.equal(['fleet_jobs_total', 'fleet_sweep_duration_seconds', 'fleet_dispatch_total']);
    expect(families.get('fleet_jobs_total')?.labels.get('outcome')).to.deep.equal(new Set(['applied']));
    expect(families.get('fleet_sweep_duration_seconds')?.seriesNames).to.deep.equal(
      new Set(['fleet_sweep_duration_seconds_bucket', 'fleet_sweep_duration_seconds_sum', 'fleet_sweep_duration_seconds_count']),
    );
    expect(families.get('fleet_sweep_duration_seconds')?.samples).to.equal(3);
    expect(families.get('fleet_dispatch_total')?.samples).to.equal(0);
  });

  it('reads every rule expression, plain, quoted or folded, and refuses a rule it cannot read', () => {
    const rules = [
      'groups:',
      '  - name: g',
      '    rules:',
      '      - alert: A',
      '        expr: max(fleet_outbox_lag_seconds) > 30',
      '        for: 5m',
      '      - alert: B',
      '        expr: >-',
      '          sum(rate(fleet_jobs_total[5m]))',
      '',
      '          > 1',
      '        labels: {severity: warning}',
      '      - record: c',
      `        expr: 'fleet_jobs_total{outcome=''error''}'`,
    ].join('\n');
    expect(ruleExpressions(rules)).to.deep.equal([
      'max(fleet_outbox_lag_seconds) > 30',
      'sum(rate(fleet_jobs_total[5m]))  > 1',
      "fleet_jobs_total{outcome='error'}",
    ]);
    expect(() => ruleExpressions(rules.replace("        expr: 'fleet", "        expression: 'fleet"))).to.throw('found 2 expr: lines for 3 rules');
  });
});
