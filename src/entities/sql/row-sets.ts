/**
 * Sets of rows as a statement's parameters, declared by name. A statement that writes many rows at once takes each
 * set as ONE jsonb parameter, an array of row objects, read back as a table by `jsonb_to_recordset` with the set's
 * column names and types; so its text is the same for any number of rows, is prepared once per connection, and
 * names every column where it is used (no `$37` to count: the group-commit write once had 61 positional arrays).
 *
 * Why jsonb and not one typed array per column (`unnest($1::uuid[], ...)`): the planner sees into an array
 * parameter, so it costed a lone event's write (arrays of one) below its generic plan and planned every call
 * afresh (about 0.6 ms of planning a write, measured); it cannot see into jsonb, so the generic plan costs the same
 * and each connection keeps it (test/integration/transition-plan-cache.test.ts). Rows are estimated at 100 a set,
 * whatever their number.
 */

/** Each column of a row set, in the statement's order, with its PostgreSQL type (`uuid`, `timestamptz`, ...). */
export type Columns<Row> = { readonly [K in keyof Row]-?: string };

/** The row sets a statement takes: each an array of rows. */
export type RowSetInput = Readonly<Record<string, readonly object[]>>;

type RowOf<Input extends RowSetInput, S extends keyof Input> = Input[S][number];

export class RowSets<Input extends RowSetInput> {
  private readonly sets: ReadonlyArray<{
    readonly set: keyof Input;
    readonly columns: readonly string[];
    readonly types: readonly string[];
    /** the set's parameter */
    readonly param: string;
  }>;

  constructor(sets: { readonly [S in keyof Input]: Columns<RowOf<Input, S>> }) {
    this.sets = (Object.keys(sets) as Array<keyof Input>).map((set, i) => {
      const columns = sets[set] as Readonly<Record<string, string>>;
      return { set, columns: Object.keys(columns), types: Object.values(columns), param: `$${i + 1}::jsonb` };
    });
  }

  /**
   * The set as a FROM item, `ROWS FROM (jsonb_to_recordset($1::jsonb) AS (id uuid, version integer)) AS alias(id,
   * version)`; with `ordinality`, the rows' order as one more column of that name (`WITH ORDINALITY`).
   */
  from<S extends keyof Input & string>(set: S, alias: string, ordinality?: string): string {
    const { columns, types, param } = this.spec(set);
    const definition = columns.map((column, i) => `${column} ${types[i] ?? ''}`).join(', ');
    const names = [...columns, ...(ordinality === undefined ? [] : [ordinality])].join(', ');
    return `ROWS FROM (jsonb_to_recordset(${param}) AS (${definition}))${ordinality === undefined ? '' : ' WITH ORDINALITY'} AS ${alias}(${names})`;
  }

  /** One column of the set as an array (for a lock on the set's ids, say). */
  column<S extends keyof Input & string>(set: S, column: keyof RowOf<Input, S> & string): string {
    const { columns, types, param } = this.spec(set);
    const type = types[columns.indexOf(column)] ?? '';
    return `ARRAY(SELECT (r->>'${column}')::${type} FROM jsonb_array_elements(${param}) r)`;
  }

  /** The number of parameters the sets take (`$1` to `$count`): a statement's own parameters follow. */
  get count(): number {
    return this.sets.length;
  }

  /** The parameter list for these rows: each set as a JSON array of its rows (dates as ISO 8601). */
  values(input: Input): string[] {
    return this.sets.map(({ set }) => JSON.stringify(input[set]));
  }

  private spec(set: keyof Input): { readonly columns: readonly string[]; readonly types: readonly string[]; readonly param: string } {
    const spec = this.sets.find((s) => s.set === set);
    if (spec === undefined) throw new Error(`no row set ${String(set)}`);
    return spec;
  }
}
