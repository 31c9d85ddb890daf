/**
 * The history checker's stream check: every version of every deployment is on the transition stream; the first
 * occurrences of a deployment's versions come in increasing order; a repeat is identical to its first occurrence;
 * every entry matches its history row. Entries a consumer read before they were trimmed (`before`) count as if the
 * stream still held them. A partitioned stream is read partition by partition (P as the fleet recorded it): each
 * deployment's entries are all on one partition, so its order is that partition's.
 */
import { parseEntry, type TransitionEntry } from '../src/streams/consumer';
import { partitionKeys, partitionOf, readPartitions } from '../src/streams/partitions';
import type { StreamSource, StreamSummary } from './history-checker';
import type { Collector, DeploymentRow, TransitionRow } from './history-rows';

const STREAM_FIELDS = ['transitionId', 'deploymentId', 'attemptId', 'from', 'to', 'version', 'reason', 'eventId'] as const;
type StreamField = (typeof STREAM_FIELDS)[number];

const PAGE = 2000;

/** A history row as its stream entry has it. */
function entryOf(row: TransitionRow): Record<StreamField, string> {
  return {
    transitionId: row.id,
    deploymentId: row.deployment_id,
    attemptId: row.attempt_id ?? '',
    from: row.from_state ?? '',
    to: row.to_state,
    version: String(row.version),
    reason: row.reason,
    eventId: row.event_id,
  };
}

class StreamCheck {
  entries = 0;
  repeats = 0;
  outOfOrder = 0;
  mismatches = 0;
  /** per deployment: first occurrence of each version, and the highest first occurrence so far */
  private readonly firsts = new Map<string, Map<number, TransitionEntry>>();
  private readonly highest = new Map<string, number>();
  private readonly rowsAt = new Map<string, Map<number, TransitionRow>>();

  constructor(
    private readonly v: Collector,
    private readonly scope: ReadonlySet<string> | null,
    private readonly deployments: ReadonlyMap<string, DeploymentRow>,
    transitions: ReadonlyMap<string, readonly TransitionRow[]>,
  ) {
    for (const [id, rows] of transitions) this.rowsAt.set(id, new Map(rows.map((r) => [r.version, r])));
  }

  /** Checks one entry, in stream order. */
  add(id: string, fields: string[]): void {
    const entry = parseEntry(id, fields);
    if (this.scope !== null && !this.scope.has(entry.deploymentId)) return;
    this.entries++;
    const seen = this.firsts.get(entry.deploymentId) ?? new Map<number, TransitionEntry>();
    this.firsts.set(entry.deploymentId, seen);
    const first = seen.get(entry.version);
    if (first !== undefined) {
      this.repeat(id, first, entry);
      return;
    }
    seen.set(entry.version, entry);
    const top = this.highest.get(entry.deploymentId) ?? 0;
    if (entry.version < top) {
      this.outOfOrder++;
      this.v.add({
        kind: 'stream_out_of_order',
        deploymentId: entry.deploymentId,
        version: entry.version,
        detail: `entry ${id}: version ${entry.version} first appears after version ${top}`,
      });
    } else {
      this.highest.set(entry.deploymentId, entry.version);
    }
    this.againstHistory(id, entry);
  }

  private repeat(id: string, first: TransitionEntry, entry: TransitionEntry): void {
    this.repeats++;
    const differs = STREAM_FIELDS.filter((f) => String(first[f]) !== String(entry[f]));
    if (differs.length === 0) return;
    this.mismatches++;
    this.v.add({
      kind: 'stream_entry_mismatch',
      deploymentId: entry.deploymentId,
      version: entry.version,
      detail: `entry ${id} repeats ${first.streamId} with different ${differs.join(', ')}`,
    });
  }

  private againstHistory(id: string, entry: TransitionEntry): void {
    const row = this.rowsAt.get(entry.deploymentId)?.get(entry.version);
    if (row === undefined) {
      this.mismatches++;
      this.v.add({
        kind: 'stream_unknown_entry',
        deploymentId: entry.deploymentId,
        version: entry.version,
        detail: `entry ${id}: ${this.deployments.has(entry.deploymentId) ? 'no history row at this version' : 'no such deployment'}`,
      });
      return;
    }
    const want = entryOf(row);
    const differs = STREAM_FIELDS.filter((f) => String(entry[f]) !== want[f]);
    if (differs.length === 0) return;
    this.mismatches++;
    this.v.add({
      kind: 'stream_entry_mismatch',
      deploymentId: entry.deploymentId,
      version: entry.version,
      detail: `entry ${id} differs from history in ${differs.map((f) => `${f} (${String(entry[f])} != ${want[f]})`).join(', ')}`,
    });
  }

  /** Counts (and reports) every version of every deployment that did not appear. */
  gaps(): number {
    let gaps = 0;
    for (const d of this.deployments.values()) {
      const seen = this.firsts.get(d.id);
      const missing: number[] = [];
      for (let ver = 1; ver <= d.version; ver++) if (seen?.has(ver) !== true) missing.push(ver);
      if (missing.length > 0) {
        gaps += missing.length;
        this.v.add({
          kind: 'stream_missing_version',
          deploymentId: d.id,
          detail: `versions ${missing.join(', ')} of ${d.version} are not on the stream`,
        });
      }
    }
    return gaps;
  }
}

export async function checkStream(
  stream: StreamSource,
  scope: ReadonlySet<string> | null,
  deployments: ReadonlyMap<string, DeploymentRow>,
  transitions: ReadonlyMap<string, readonly TransitionRow[]>,
  v: Collector,
): Promise<StreamSummary> {
  const check = new StreamCheck(v, scope, deployments, transitions);
  const partitions = await readPartitions(stream.redis, stream.key);
  // stream ids are per partition: two partitions may hold the same id
  const where = (partition: number, id: string): string => `${partition}/${id}`;
  // first the entries read before a trim, then the stream itself from its start (skipping those entries)
  const before = stream.before ?? [];
  for (const e of before) check.add(e.streamId, Object.entries(e).flat().map(String));
  const seenBefore = new Set(before.map((e) => where(partitionOf(e.deploymentId, partitions), e.streamId)));
  for (const [partition, key] of partitionKeys(stream.key, partitions).entries()) {
    for (let start = '-'; ;) {
      const page = (await stream.redis.xrange(key, start, '+', 'COUNT', PAGE)) as Array<[string, string[]]>;
      for (const [id, fields] of page) if (!seenBefore.has(where(partition, id))) check.add(id, fields);
      const last = page[page.length - 1];
      if (page.length < PAGE || last === undefined) break;
      start = `(${last[0]}`;
    }
  }
  const gaps = check.gaps();
  return { entries: check.entries, repeats: check.repeats, gaps, outOfOrder: check.outOfOrder, mismatches: check.mismatches };
}
