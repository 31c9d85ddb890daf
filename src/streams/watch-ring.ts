/**
 * The recent entries of the HTTP watch's one reader per process (src/streams/watch-hub.ts), with their positions:
 * a bounded ring, in the order the reader read them, through which a watcher that caught up from Redis joins the
 * live feed with no gap and no repeat. Pure: no I/O.
 */
import { compareIds } from './partitions';
import type { FollowedEntry, StreamLayout } from './stream-follower';

/** One entry as every watcher gets it: its fields as on the stream, as one line of JSON, made once. */
export interface WatchEntry {
  /** the partition's stream key */
  readonly partitionKey: string;
  /** the entry's stream id */
  readonly streamId: string;
  readonly deploymentId: string;
  readonly to: string;
  /** the stream entry's fields, in their order on the stream, as one line of JSON (all values strings) */
  readonly data: string;
}

/** The entry as watchers get it: its fields as one line of JSON, in their order on the stream. */
export function watchEntry(e: FollowedEntry): WatchEntry {
  const parts: string[] = [];
  let deploymentId = '';
  let to = '';
  for (let i = 0; i + 1 < e.fields.length; i += 2) {
    const name = e.fields[i] ?? '';
    const value = e.fields[i + 1] ?? '';
    if (name === 'deploymentId') deploymentId = value;
    else if (name === 'to') to = value;
    parts.push(`${JSON.stringify(name)}:${JSON.stringify(value)}`);
  }
  return { partitionKey: e.key, streamId: e.id, deploymentId, to, data: `{${parts.join(',')}}` };
}

/** What the reader read, in its order: an entry of a partition, or a move to a new layout (a repartition). */
export type RingItem =
  | { readonly kind: 'entry'; readonly partition: number; readonly id: string; readonly entry: WatchEntry }
  | { readonly kind: 'layout'; readonly layout: StreamLayout; readonly positions: readonly string[] };

/** A layout and every partition's position in it. */
export interface LayoutPosition {
  readonly layout: StreamLayout;
  readonly positions: readonly string[];
}

export const sameLayout = (a: StreamLayout, b: StreamLayout): boolean => a.partitions === b.partitions && a.repartitions === b.repartitions;

/**
 * Items by sequence number: `first` is the oldest kept, `next` the one the next push gets. `base` is where the reader
 * was just before `first`: the ring holds every entry after it. Evicting the oldest item moves `base` past it.
 */
export class WatchRing {
  private readonly items: Array<RingItem | undefined>;
  private firstSeq = 0;
  private nextSeq = 0;
  private base: { layout: StreamLayout; positions: string[] };

  constructor(
    private readonly size: number,
    start: LayoutPosition,
  ) {
    this.items = new Array<RingItem | undefined>(size);
    this.base = { layout: start.layout, positions: [...start.positions] };
  }

  get first(): number {
    return this.firstSeq;
  }

  get next(): number {
    return this.nextSeq;
  }

  get length(): number {
    return this.nextSeq - this.firstSeq;
  }

  push(item: RingItem): void {
    if (this.nextSeq - this.firstSeq >= this.size) {
      const oldest = this.at(this.firstSeq);
      if (oldest.kind === 'entry') this.base.positions[oldest.partition] = oldest.id;
      else this.base = { layout: oldest.layout, positions: [...oldest.positions] };
      this.items[this.firstSeq % this.size] = undefined;
      this.firstSeq++;
    }
    this.items[this.nextSeq % this.size] = item;
    this.nextSeq++;
  }

  /** The item of a sequence number from `first` to `next - 1`. */
  at(seq: number): RingItem {
    const item = seq >= this.firstSeq && seq < this.nextSeq ? this.items[seq % this.size] : undefined;
    if (item === undefined) throw new RangeError(`watch ring: no item ${seq} (it holds ${this.firstSeq} to ${this.nextSeq - 1})`);
    return item;
  }

  /**
   * Where a reader at `at` finds, from here on, every entry after its positions: the sequence number to go on from,
   * and its positions with the partitions it does not read (`reads`: those of its deployments; absent: all) moved up
   * to the ring's (they hold nothing it wants). Null when the ring does not reach back to it, or does not have its
   * layout (one the reader has not reached, or one it left behind).
   */
  entryPoint(at: LayoutPosition, reads?: ReadonlySet<number>): { seq: number; positions: string[] } | null {
    let from: LayoutPosition = this.base;
    let seq = this.firstSeq;
    if (!sameLayout(at.layout, this.base.layout)) {
      const moved = this.layoutItem(at.layout);
      if (moved === null) return null;
      ({ seq, item: from } = moved);
    }
    const positions = [...at.positions];
    for (let n = 0; n < at.layout.partitions; n++) {
      const floor = from.positions[n] ?? '0-0';
      if (compareIds(positions[n] ?? '0-0', floor) >= 0) continue;
      if (reads !== undefined && !reads.has(n)) positions[n] = floor;
      else return null;
    }
    return { seq, positions };
  }

  /** The move to `layout` in the ring, and the sequence number after it. */
  private layoutItem(layout: StreamLayout): { seq: number; item: LayoutPosition } | null {
    for (let s = this.firstSeq; s < this.nextSeq; s++) {
      const item = this.at(s);
      if (item.kind === 'layout' && sameLayout(item.layout, layout)) return { seq: s + 1, item };
    }
    return null;
  }
}
