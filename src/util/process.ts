import * as fs from 'node:fs';

/** Is `pid` a live (not zombie) process? (`fleet` commands find a running `fleet start` with it, and dev/servers
 * its servers.) */
export function isProcessAlive(pid: number): boolean {
  // 0 and negative numbers address process groups, not a process
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    if (!(err instanceof Error && 'code' in err && err.code === 'EPERM')) return false;
  }
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return true; // no /proc (not Linux): kill(0) has to do
  }
  const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
  return state !== 'Z' && state !== 'X';
}
