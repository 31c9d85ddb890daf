/**
 * "Exactly one sweep per tick": the workers log `sweep tick started` (info, with the tick) when a tick's claim
 * succeeds, and a warning when a tick is delivered again after it started (not run twice). Their JSON log lines are
 * counted here per tick.
 */
import * as fs from 'node:fs';

export interface SweepCounts {
  /** distinct ticks that started */
  readonly ticks: number;
  /** ticks that started more than once (must be 0) */
  readonly startedTwice: number;
  /** deliveries of a started tick that were refused (not run twice) */
  readonly refused: number;
  /** ticks between the first and the last that never started (their job lost with Redis, or its worker killed first) */
  readonly missing: number;
}

export function countSweeps(logFile: string, everyS: number): SweepCounts {
  let text = '';
  try {
    text = fs.readFileSync(logFile, 'utf8');
  } catch {
    // no workers ran
  }
  const started = new Map<string, number>();
  let refused = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    if (!line.includes('sweep tick')) continue;
    let entry: { msg?: unknown; tick?: unknown };
    try {
      entry = JSON.parse(line) as { msg?: unknown; tick?: unknown };
    } catch {
      continue;
    }
    if (typeof entry.tick !== 'string') continue;
    if (entry.msg === 'sweep tick started') started.set(entry.tick, (started.get(entry.tick) ?? 0) + 1);
    else if (typeof entry.msg === 'string' && entry.msg.startsWith('sweep tick delivered again')) refused++;
  }
  const ticks = [...started.keys()]
    .map(Number)
    .filter(Number.isFinite)
    .sort((a, b) => a - b);
  const first = ticks[0];
  const last = ticks[ticks.length - 1];
  const expected = first === undefined || last === undefined ? 0 : Math.round((last - first) / (everyS * 1000)) + 1;
  return {
    ticks: started.size,
    startedTwice: [...started.values()].filter((n) => n > 1).length,
    refused,
    missing: Math.max(0, expected - ticks.length),
  };
}
