/**
 * The consumer group's check (chaos/consumer-group.ts), pure: from the handler calls every member recorded (and the
 * versions read from history at a resync), with the deployments' final versions:
 * - complete: every version of every deployment reached the handler at least once (or was read from history when
 *   the group had to resync);
 * - in order: per deployment, in the order the calls happened, never a lower version after a higher one;
 * - fenced: per partition, the calls of one holding (a member's stretch of ownership, from acquiring the partition to
 *   losing or releasing it) never interleave with another holding's: two owners never handle one partition at once.
 * The order between members comes from their clock: CLOCK_MONOTONIC, one for every process of the machine.
 */

/** One handler call of the group, or a version read from history at a resync. */
export interface GroupCall {
  /** when the call started, ns on the host's monotonic clock */
  readonly at: bigint;
  /** the member (its consumer name), or `history` */
  readonly consumer: string;
  readonly partition: number;
  /** which of the member's holdings of the partition (the n-th time it acquired it); -1 for history */
  readonly holding: number;
  readonly deploymentId: string;
  readonly version: number;
  /** the entry's stream id ('' for history) */
  readonly streamId: string;
}

/** The consumer named for versions the group read from history at a resync. */
export const FROM_HISTORY = 'history';

export type GroupViolationKind =
  /** a version that never reached the handler */
  | 'group_missing_version'
  /** a handler call with a lower version after one with a higher version of the same deployment */
  | 'group_out_of_order'
  /** a holding's calls interleave with another holding's on the same partition */
  | 'group_two_owners';

export interface GroupViolation {
  readonly kind: GroupViolationKind;
  readonly deploymentId?: string;
  readonly partition?: number;
  readonly version?: number;
  readonly detail: string;
}

export interface GroupCheck {
  /** handler calls (redeliveries included; history not) */
  readonly calls: number;
  /** of them, calls of a version the group had handled before (at-least-once: a redelivery to the next owner) */
  readonly redelivered: number;
  /** versions read from history at resyncs */
  readonly fromHistory: number;
  readonly violationCounts: Readonly<Partial<Record<GroupViolationKind, number>>>;
  /** the first `max` violations */
  readonly violations: readonly GroupViolation[];
}

/** One member's record file, parsed: its calls, and how often it acquired and lost a partition. */
export interface MemberRecord {
  readonly calls: GroupCall[];
  readonly acquired: number;
  readonly released: number;
  readonly lost: number;
  /** the start of the last call, when it never returned (the process died in the handler), else null */
  readonly inHandlerAtEnd: GroupCall | null;
  /** why its run ended (`resync`, `missing`, `error`), when it said */
  readonly ended: string | null;
}

/** Parses a member's record file (chaos/consumer-member.ts has the format); lines it cannot read are skipped. */
export function parseMemberRecord(consumer: string, text: string): MemberRecord {
  const calls: GroupCall[] = [];
  let acquired = 0;
  let released = 0;
  let lost = 0;
  let open: GroupCall | null = null;
  let ended: string | null = null;
  for (const line of text.split('\n')) {
    const [kind, at, ...rest] = line.split(' ');
    if (at === undefined || !/^\d+$/.test(at)) continue;
    if (kind === 'S' && rest.length === 5) {
      const [partition, holding, deploymentId = '', version, streamId = ''] = rest;
      open = { at: BigInt(at), consumer, partition: Number(partition), holding: Number(holding), deploymentId, version: Number(version), streamId };
      calls.push(open);
    } else if (kind === 'E') {
      open = null;
    } else if (kind === 'A') {
      acquired++;
    } else if (kind === 'R') {
      released++;
    } else if (kind === 'L') {
      lost++;
    } else if (kind === 'X') {
      ended = rest[0] ?? null;
    }
  }
  return { calls, acquired, released, lost, inHandlerAtEnd: open, ended };
}

class Collector {
  readonly list: GroupViolation[] = [];
  readonly counts: Partial<Record<GroupViolationKind, number>> = {};
  constructor(private readonly max: number) {}
  add(v: GroupViolation): void {
    this.counts[v.kind] = (this.counts[v.kind] ?? 0) + 1;
    if (this.list.length < this.max) this.list.push(v);
  }
}

/** Seconds since `t0`, for details. */
const secondsSince = (t0: bigint, t: bigint): string => `${(Number(t - t0) / 1e9).toFixed(3)} s`;

/** Checks the group's calls against the deployments' final versions; lists at most `max` violations. */
export function checkGroup(calls: readonly GroupCall[], finalVersions: ReadonlyMap<string, number>, max = 20): GroupCheck {
  const v = new Collector(max);
  const ordered = [...calls].sort((a, b) => (a.at < b.at ? -1 : a.at > b.at ? 1 : 0));
  const t0 = ordered[0]?.at ?? 0n;
  const handled = new Map<string, Set<number>>();
  const highest = new Map<string, GroupCall>();
  let redelivered = 0;
  let fromHistory = 0;
  for (const call of ordered) {
    const seen = handled.get(call.deploymentId) ?? new Set<number>();
    handled.set(call.deploymentId, seen);
    if (call.consumer === FROM_HISTORY) fromHistory++;
    else if (seen.has(call.version)) redelivered++;
    seen.add(call.version);
    const top = highest.get(call.deploymentId);
    if (top !== undefined && call.version < top.version) {
      v.add({
        kind: 'group_out_of_order',
        deploymentId: call.deploymentId,
        version: call.version,
        detail: `v${call.version} by ${call.consumer} at ${secondsSince(t0, call.at)} after v${top.version} by ${top.consumer} at ${secondsSince(t0, top.at)}`,
      });
    } else {
      highest.set(call.deploymentId, call);
    }
  }
  checkOwners(v, ordered, t0);
  for (const [deploymentId, final] of finalVersions) {
    const seen = handled.get(deploymentId);
    const missing: number[] = [];
    for (let version = 1; version <= final; version++) if (seen?.has(version) !== true) missing.push(version);
    if (missing.length > 0)
      v.add({ kind: 'group_missing_version', deploymentId, detail: `versions ${missing.join(', ')} of ${final} never reached the handler` });
  }
  return { calls: calls.length - fromHistory, redelivered, fromHistory, violationCounts: v.counts, violations: v.list };
}

/** Per partition, each holding's calls span [first, last]; two holdings' spans must not overlap. */
function checkOwners(v: Collector, ordered: readonly GroupCall[], t0: bigint): void {
  const spans = new Map<string, { partition: number; who: string; first: bigint; last: bigint }>();
  for (const call of ordered) {
    if (call.consumer === FROM_HISTORY) continue;
    const key = `${call.partition}/${call.consumer}/${call.holding}`;
    const span = spans.get(key);
    if (span === undefined)
      spans.set(key, { partition: call.partition, who: `${call.consumer} (holding ${call.holding})`, first: call.at, last: call.at });
    else span.last = call.at;
  }
  const byPartition = new Map<number, Array<{ who: string; first: bigint; last: bigint }>>();
  for (const span of spans.values()) byPartition.set(span.partition, [...(byPartition.get(span.partition) ?? []), span]);
  for (const [partition, list] of byPartition) {
    list.sort((a, b) => (a.first < b.first ? -1 : a.first > b.first ? 1 : 0));
    let before: { who: string; first: bigint; last: bigint } | undefined;
    for (const span of list) {
      if (before !== undefined && span.first < before.last) {
        v.add({
          kind: 'group_two_owners',
          partition,
          detail: `partition ${partition}: ${span.who} handled from ${secondsSince(t0, span.first)} while ${before.who} handled until ${secondsSince(t0, before.last)}`,
        });
      }
      if (before === undefined || span.last > before.last) before = span;
    }
  }
}
