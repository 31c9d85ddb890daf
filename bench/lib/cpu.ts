/**
 * CPU time by process group, from /proc (Linux): where an event's CPU goes on a machine where everything (worker,
 * PostgreSQL, Redis, the bench's producer) shares the same cores. PostgreSQL counts the postmaster, its live
 * children and the children it has reaped (cutime/cstime), so backends that came and went are included.
 */
import * as fs from 'node:fs';

const TICKS_PER_SECOND = 100; // USER_HZ on Linux

export interface CpuGroups {
  readonly [group: string]: readonly number[];
}

interface Stat {
  readonly ppid: number;
  /** utime + stime, in ms */
  readonly own: number;
  /** cutime + cstime (reaped children), in ms */
  readonly children: number;
}

function readStat(pid: number): Stat | null {
  try {
    const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    // fields[0] is field 3 (state): utime is field 14 -> index 11
    const n = (i: number) => Number(fields[i] ?? 0);
    const ms = (ticks: number) => (ticks * 1000) / TICKS_PER_SECOND;
    return { ppid: n(1), own: ms(n(11) + n(12)), children: ms(n(13) + n(14)) };
  } catch {
    return null;
  }
}

function allPids(): number[] {
  try {
    return fs
      .readdirSync('/proc')
      .filter((d) => /^\d+$/.test(d))
      .map(Number);
  } catch {
    return [];
  }
}

/** Busy CPU ms of the whole machine so far (all cores), from /proc/stat. */
function machineBusyMs(): number | null {
  try {
    const line = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0] ?? '';
    const [, user, nice, system, , , irq, softirq, steal] = line.trim().split(/\s+/).map(Number);
    const busy = [user, nice, system, irq, softirq, steal].reduce<number>((a, b) => a + (b ?? 0), 0);
    return (busy * 1000) / TICKS_PER_SECOND;
  } catch {
    return null;
  }
}

/**
 * CPU ms consumed so far by each group (a `tree` group includes children, live and reaped), plus `_machine`: the
 * whole machine's busy time, from which `cpuPerEvent` derives `other` (whatever else ran meanwhile: noise).
 */
export function cpuNow(groups: Readonly<Record<string, { pid: number; tree: boolean } | undefined>>): Record<string, number> {
  const stats = new Map<number, Stat>();
  for (const pid of allPids()) {
    const s = readStat(pid);
    if (s !== null) stats.set(pid, s);
  }
  const out: Record<string, number> = {};
  for (const [name, g] of Object.entries(groups)) {
    if (g === undefined) continue;
    const root = stats.get(g.pid);
    if (root === undefined) continue;
    let total = root.own;
    if (g.tree) {
      total += root.children;
      for (const s of stats.values()) if (s.ppid === g.pid) total += s.own + s.children;
    }
    out[name] = total;
  }
  const machine = machineBusyMs();
  if (machine !== null) out['_machine'] = machine;
  return out;
}

/** Per-event CPU ms by group between two `cpuNow` readings. */
export function cpuPerEvent(before: Record<string, number>, after: Record<string, number>, events: number): Record<string, number> {
  const out: Record<string, number> = {};
  let ours = 0;
  for (const [name, value] of Object.entries(after)) {
    const start = before[name];
    if (start === undefined || events <= 0 || name === '_machine') continue;
    ours += value - start;
    out[name] = Math.round(((value - start) / events) * 1000) / 1000;
  }
  const m0 = before['_machine'];
  const m1 = after['_machine'];
  if (m0 !== undefined && m1 !== undefined && events > 0) {
    out['other'] = Math.round((Math.max(0, m1 - m0 - ours) / events) * 1000) / 1000;
  }
  return out;
}
