/**
 * A hand-written SVG chart: panels of grouped bars, linear or log scale, with optional reference lines.
 * No dependencies; the output is a static file that renders in a browser or on GitHub.
 */

export interface Bar {
  readonly series: string;
  readonly value: number | null;
}

export interface Panel {
  readonly title: string;
  readonly unit: string;
  readonly log?: boolean;
  readonly series: readonly string[];
  readonly groups: ReadonlyArray<{ readonly label: string; readonly bars: readonly Bar[] }>;
  /** horizontal reference lines, e.g. a target */
  readonly lines?: ReadonlyArray<{ readonly value: number; readonly label: string }>;
}

const COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#9467bd', '#8c564b', '#d62728', '#7f7f7f'];
const PANEL_W = 560;
const PANEL_H = 330;
const M = { top: 42, right: 16, bottom: 58, left: 64 };

function esc(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function fmt(v: number): string {
  if (v >= 10_000) return `${Math.round(v / 1000)}k`;
  if (v >= 1000) return `${(v / 1000).toFixed(1)}k`;
  if (v >= 100) return String(Math.round(v));
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

function niceMax(v: number): number {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function renderPanel(panel: Panel, x0: number, y0: number): string {
  const w = PANEL_W - M.left - M.right;
  const h = PANEL_H - M.top - M.bottom;
  const values = panel.groups.flatMap((g) => g.bars.map((b) => b.value)).filter((v): v is number => v !== null && v > 0);
  const lineValues = (panel.lines ?? []).map((l) => l.value);
  const maxV = Math.max(...values, ...lineValues, 1e-9);
  const minV = Math.min(...values, ...lineValues, maxV);
  const out: string[] = [];
  let scale: (v: number) => number;
  const ticks: number[] = [];
  if (panel.log === true) {
    const lo = Math.floor(Math.log10(Math.max(minV, 1e-3)));
    const hi = Math.ceil(Math.log10(maxV));
    const span = Math.max(1, hi - lo);
    scale = (v) => h - ((Math.log10(Math.max(v, 10 ** lo)) - lo) / span) * h;
    for (let e = lo; e <= hi; e++) ticks.push(10 ** e);
  } else {
    const top = niceMax(maxV * 1.05);
    scale = (v) => h - (v / top) * h;
    for (let i = 0; i <= 5; i++) ticks.push((top / 5) * i);
  }
  out.push(`<g transform="translate(${x0},${y0})">`);
  out.push(`<text x="${PANEL_W / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">${esc(panel.title)}</text>`);
  out.push(`<g transform="translate(${M.left},${M.top})">`);
  for (const t of ticks) {
    const y = scale(t);
    out.push(`<line x1="0" x2="${w}" y1="${y}" y2="${y}" stroke="#e5e5e5"/>`);
    out.push(`<text x="-6" y="${y + 4}" text-anchor="end" font-size="10">${fmt(t)}</text>`);
  }
  out.push(
    `<text transform="translate(-48,${h / 2}) rotate(-90)" text-anchor="middle" font-size="11">${esc(panel.unit)}${panel.log === true ? ' (log)' : ''}</text>`,
  );
  const groupW = w / Math.max(1, panel.groups.length);
  const barW = Math.min(28, (groupW * 0.8) / Math.max(1, panel.series.length));
  panel.groups.forEach((g, gi) => {
    const gx = gi * groupW + (groupW - barW * panel.series.length) / 2;
    panel.series.forEach((series, si) => {
      const bar = g.bars.find((b) => b.series === series);
      if (bar === undefined || bar.value === null) return;
      const x = gx + si * barW;
      const y = scale(bar.value);
      out.push(
        `<rect x="${x.toFixed(1)}" y="${y.toFixed(1)}" width="${(barW - 2).toFixed(1)}" height="${Math.max(0, h - y).toFixed(1)}" fill="${COLORS[si % COLORS.length] ?? '#333'}"><title>${esc(`${g.label} ${series}: ${fmt(bar.value)} ${panel.unit}`)}</title></rect>`,
      );
      out.push(`<text x="${(x + barW / 2 - 1).toFixed(1)}" y="${(y - 3).toFixed(1)}" text-anchor="middle" font-size="8">${fmt(bar.value)}</text>`);
    });
    out.push(`<text x="${(gi * groupW + groupW / 2).toFixed(1)}" y="${h + 14}" text-anchor="middle" font-size="10">${esc(g.label)}</text>`);
  });
  for (const line of panel.lines ?? []) {
    const y = scale(line.value);
    out.push(`<line x1="0" x2="${w}" y1="${y}" y2="${y}" stroke="#d62728" stroke-dasharray="5,4"/>`);
    out.push(`<text x="${w}" y="${y - 4}" text-anchor="end" font-size="10" fill="#d62728">${esc(line.label)}</text>`);
  }
  out.push(`<line x1="0" x2="${w}" y1="${h}" y2="${h}" stroke="#333"/>`);
  // legend
  panel.series.forEach((series, si) => {
    const lx = (si % 3) * (w / 3);
    const ly = h + 30 + Math.floor(si / 3) * 13;
    out.push(`<rect x="${lx}" y="${ly - 8}" width="9" height="9" fill="${COLORS[si % COLORS.length] ?? '#333'}"/>`);
    out.push(`<text x="${lx + 13}" y="${ly}" font-size="10">${esc(series)}</text>`);
  });
  out.push('</g></g>');
  return out.join('\n');
}

/** Panels laid out two per row. */
export function renderChart(title: string, subtitle: string, panels: readonly Panel[]): string {
  const cols = 2;
  const rows = Math.ceil(panels.length / cols);
  const width = cols * PANEL_W;
  const height = rows * PANEL_H + 50;
  const body = panels.map((p, i) => renderPanel(p, (i % cols) * PANEL_W, 50 + Math.floor(i / cols) * PANEL_H)).join('\n');
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="Helvetica, Arial, sans-serif">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="${width / 2}" y="22" text-anchor="middle" font-size="16" font-weight="bold">${esc(title)}</text>`,
    `<text x="${width / 2}" y="40" text-anchor="middle" font-size="11" fill="#555">${esc(subtitle)}</text>`,
    body,
    '</svg>',
    '',
  ].join('\n');
}
