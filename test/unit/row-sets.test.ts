import { expect } from 'chai';
import { RowSets } from '../../src/entities/sql/row-sets';

describe("row sets (a statement's rows by name, one jsonb parameter a set)", () => {
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

  it('reads each set from its own parameter, with its columns named and typed as declared', () => {
    expect(rows.from('items', 'v')).to.equal('ROWS FROM (jsonb_to_recordset($1::jsonb) AS (id uuid, n integer)) AS v(id, n)');
    expect(rows.from('tags', 't', 'ord')).to.equal(
      'ROWS FROM (jsonb_to_recordset($2::jsonb) AS (id uuid, at timestamptz, note text)) WITH ORDINALITY AS t(id, at, note, ord)',
    );
    expect(rows.column('tags', 'at')).to.equal("ARRAY(SELECT (r->>'at')::timestamptz FROM jsonb_array_elements($2::jsonb) r)");
  });

  it('passes each set as a JSON array of its rows, in the declared order', () => {
    const at = new Date('2026-01-01T00:00:00.000Z');
    expect(
      rows.values({
        items: [
          { id: 'a', n: 1 },
          { id: 'b', n: null },
        ],
        tags: [{ id: 'c', at }],
      }),
    ).to.deep.equal(['[{"id":"a","n":1},{"id":"b","n":null}]', '[{"id":"c","at":"2026-01-01T00:00:00.000Z"}]']);
  });
});
