import { expect } from 'chai';
import { RowSets } from '../../src/entities/sql/row-sets';

describe('row sets (a statement\'s rows as named, typed arrays)', () => {
  interface Item {
    readonly id: string;
    readonly n: number | null;
  }
  interface Tag {
    readonly id: string;
    readonly at: Date;
    readonly note?: string;
  }
  const rows = new RowSets<{ items: readonly Item[]; tags: readonly Tag[] }>({
    items: { id: 'uuid', n: 'integer' },
    tags: { id: 'uuid', at: 'timestamptz', note: 'text' },
  });

  it('numbers every column of every set once, in the declared order', () => {
    expect(rows.unnest('items', 'v')).to.equal('unnest($1::uuid[], $2::integer[]) AS v(id, n)');
    expect(rows.unnest('tags', 't', 'ord')).to.equal('unnest($3::uuid[], $4::timestamptz[], $5::text[]) WITH ORDINALITY AS t(id, at, note, ord)');
    expect(rows.column('tags', 'at')).to.equal('$4::timestamptz[]');
  });

  it('gives one array per column, in the same order, a missing value as null', () => {
    const at = new Date('2026-01-01T00:00:00.000Z');
    expect(rows.values({ items: [{ id: 'a', n: 1 }, { id: 'b', n: null }], tags: [{ id: 'c', at }] })).to.deep.equal([
      ['a', 'b'],
      [1, null],
      ['c'],
      [at],
      [null],
    ]);
  });
});
