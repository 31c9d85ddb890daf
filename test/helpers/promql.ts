/**
 * Enough of PromQL and of the Prometheus text format to hold docs/grafana and docs/prometheus to what /metrics
 * serves: which series an expression selects (with its label matchers), which labels it groups by, and which
 * families a scrape has with which labels. Not a PromQL parser: promtool checks the syntax; this finds names.
 */

export interface LabelMatcher {
  readonly label: string;
  readonly op: '=' | '!=' | '=~' | '!~';
  readonly value: string;
}

export interface Selector {
  readonly metric: string;
  readonly matchers: readonly LabelMatcher[];
}

export interface ExpressionNames {
  readonly selectors: readonly Selector[];
  /** label names in by (...), without (...), on (...), ignoring (...), group_left (...), group_right (...) */
  readonly grouping: readonly string[];
}

const GROUPING = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right']);
// aggregations may have their grouping before the parenthesis (`sum by (le) (...)`), so they are known by name
const AGGREGATIONS = ['sum', 'min', 'max', 'avg', 'group', 'stddev', 'stdvar', 'count', 'count_values', 'bottomk', 'topk', 'quantile'];
const KEYWORDS = new Set(['and', 'or', 'unless', 'bool', 'offset', 'atan2', 'inf', 'nan', ...GROUPING, ...AGGREGATIONS]);
const IDENT = /[a-zA-Z_:][a-zA-Z0-9_:]*/y;

/** The series selectors and grouping labels of one PromQL expression (Grafana's `$variables` are skipped). */
export function expressionNames(expr: string): ExpressionNames {
  const selectors: Selector[] = [];
  const grouping: string[] = [];
  let i = 0;
  const skipSpace = () => {
    while (i < expr.length && /\s/.test(expr[i] ?? '')) i++;
  };
  const readString = (): string => {
    const quote = expr[i];
    let value = '';
    for (i++; i < expr.length && expr[i] !== quote; i++) {
      if (expr[i] === '\\' && quote !== '`') i++;
      value += expr[i] ?? '';
    }
    i++; // the closing quote
    return value;
  };
  const readIdent = (): string | null => {
    IDENT.lastIndex = i;
    const m = IDENT.exec(expr);
    if (m === null) return null;
    i += m[0].length;
    return m[0];
  };
  const readMatchers = (): LabelMatcher[] => {
    const matchers: LabelMatcher[] = [];
    i++; // {
    for (;;) {
      skipSpace();
      if (expr[i] === '}' || i >= expr.length) break;
      if (expr[i] === ',') {
        i++;
        continue;
      }
      const label = readIdent();
      if (label === null) throw new Error(`label name expected at ${i} in ${expr}`);
      skipSpace();
      const op = ['=~', '!~', '!=', '='].find((o) => expr.startsWith(o, i)) as LabelMatcher['op'] | undefined;
      if (op === undefined) throw new Error(`matcher operator expected after ${label} in ${expr}`);
      i += op.length;
      skipSpace();
      matchers.push({ label, op, value: readString() });
    }
    i++; // }
    return matchers;
  };

  while (i < expr.length) {
    const c = expr[i] ?? '';
    if (/\s/.test(c)) {
      i++;
    } else if (c === '"' || c === "'" || c === '`') {
      readString();
    } else if (c === '[') {
      i = expr.indexOf(']', i) + 1; // a range or a subquery's resolution: durations and $__rate_interval
      if (i === 0) throw new Error(`unclosed [ in ${expr}`);
    } else if (c === '$') {
      // a Grafana variable: $name or ${name}
      i++;
      if (expr[i] === '{') i = expr.indexOf('}', i) + 1;
      else readIdent();
    } else if (/[0-9.]/.test(c)) {
      while (i < expr.length && /[0-9a-zA-Z.+_]/.test(expr[i] ?? '')) i++; // numbers, durations (offset 5m), 1e3
    } else if (c === '{') {
      selectors.push({ metric: '', matchers: readMatchers() }); // a selector by matchers alone: {__name__=~...}
    } else if (/[a-zA-Z_:]/.test(c)) {
      const name = readIdent() ?? '';
      const at = i;
      skipSpace();
      if (GROUPING.has(name) && expr[i] === '(') {
        const close = expr.indexOf(')', i);
        grouping.push(
          ...expr
            .slice(i + 1, close)
            .split(',')
            .map((l) => l.trim())
            .filter((l) => l !== ''),
        );
        i = close + 1;
      } else if (expr[i] === '(' || KEYWORDS.has(name)) {
        // a function, an aggregation or an operator keyword
      } else {
        i = at;
        skipSpace();
        selectors.push({ metric: name, matchers: expr[i] === '{' ? readMatchers() : [] });
      }
    } else {
      i++; // operators, parentheses, commas
    }
  }
  return { selectors, grouping };
}

export interface Family {
  readonly type: string;
  /** label names seen on its samples (`le` and `quantile` included), each with the values seen */
  readonly labels: Map<string, Set<string>>;
  /** the series names its samples carry: the family's own, or its _bucket / _sum / _count */
  readonly seriesNames: Set<string>;
  samples: number;
}

/** The families in a Prometheus text-format scrape, by family name (from `# TYPE`). */
export function parseExposition(text: string): Map<string, Family> {
  const families = new Map<string, Family>();
  const bySeries = new Map<string, Family>();
  const lines = text.split('\n');
  for (const line of lines) {
    const type = /^# TYPE (\S+) (\S+)$/.exec(line);
    if (type === null) continue;
    const [, name = '', kind = ''] = type;
    const family: Family = { type: kind, labels: new Map(), seriesNames: new Set(), samples: 0 };
    families.set(name, family);
    const suffixes = kind === 'histogram' ? ['_bucket', '_sum', '_count'] : kind === 'summary' ? ['', '_sum', '_count'] : [''];
    for (const s of suffixes) bySeries.set(`${name}${s}`, family);
  }
  for (const line of lines) {
    if (line === '' || line.startsWith('#')) continue;
    const sample = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+/.exec(line);
    if (sample === null) throw new Error(`not a sample line: ${line}`);
    const [, series = '', labels = ''] = sample;
    const family = bySeries.get(series);
    if (family === undefined) throw new Error(`sample ${series} has no # TYPE line`);
    family.samples++;
    family.seriesNames.add(series);
    for (const [, label = '', value = ''] of labels.matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      let values = family.labels.get(label);
      if (values === undefined) family.labels.set(label, (values = new Set()));
      values.add(value);
    }
  }
  return families;
}

/**
 * The `expr:` of every rule in a Prometheus rules file, plain or folded (`>-`, `|`). Line-based, so that the test
 * needs no YAML parser; it counts the rules too, so an expression it could not read fails instead of being skipped.
 */
export function ruleExpressions(yaml: string): string[] {
  const lines = yaml.split('\n');
  const exprs: string[] = [];
  for (let n = 0; n < lines.length; n++) {
    const m = /^(\s*)expr:\s*(.*)$/.exec(lines[n] ?? '');
    if (m === null) continue;
    const [, indent = '', rest = ''] = m;
    if (/^[>|][-+]?$/.test(rest)) {
      const block: string[] = [];
      const inBlock = (line: string) => line.trim() === '' || line.length - line.trimStart().length > indent.length;
      while (n + 1 < lines.length && inBlock(lines[n + 1] ?? '')) block.push((lines[++n] ?? '').trim());
      exprs.push(block.join(' ').trim());
    } else if (/^'.*'$/.test(rest)) {
      exprs.push(rest.slice(1, -1).replaceAll("''", "'"));
    } else if (/^".*"$/.test(rest)) {
      exprs.push(JSON.parse(rest) as string);
    } else {
      exprs.push(rest.trim());
    }
  }
  const rules = lines.filter((l) => /^\s*- (alert|record):/.test(l)).length;
  if (rules !== exprs.length) throw new Error(`found ${exprs.length} expr: lines for ${rules} rules`);
  return exprs;
}
