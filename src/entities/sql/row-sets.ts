/**
 * Sets of rows as a statement's parameters, declared by name. A statement that writes many rows at once takes each
 * set as one typed array per column and `unnest`s them, so its text is the same for any number of rows and is
 * prepared once per connection. Counting those parameters by hand ($37 is the new attempts' ids, ...) is where such
 * a statement goes wrong, so a statement declares each set's columns once, by name and PostgreSQL type, and this
 * numbers them: `unnest` gives the SQL for a set, `column` one column's array, and `values` the parameter list for
 * rows given as objects.
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
    /** the set's first parameter; its other columns follow in order */
    readonly first: number;
  }>;

  constructor(sets: { readonly [S in keyof Input]: Columns<RowOf<Input, S>> }) {
    let next = 1;
    this.sets = (Object.keys(sets) as Array<keyof Input>).map((set) => {
      const columns = sets[set] as Readonly<Record<string, string>>;
      const first = next;
      next += Object.keys(columns).length;
      return { set, columns: Object.keys(columns), types: Object.values(columns), first };
    });
  }

  /**
   * The set as a FROM item: `unnest($1::uuid[], $2::integer[]) AS alias(id, version)`; with `ordinality`, the
   * rows' order as one more column of that name (`WITH ORDINALITY`).
   */
  unnest<S extends keyof Input & string>(set: S, alias: string, ordinality?: string): string {
    const { columns, types, first } = this.spec(set);
    const arrays = types.map((type, i) => `$${first + i}::${type}[]`).join(', ');
    const names = [...columns, ...(ordinality === undefined ? [] : [ordinality])].join(', ');
    return `unnest(${arrays})${ordinality === undefined ? '' : ' WITH ORDINALITY'} AS ${alias}(${names})`;
  }

  /** One column's array parameter, `$1::uuid[]` (for a lock on the set's ids, say). */
  column<S extends keyof Input & string>(set: S, column: keyof RowOf<Input, S> & string): string {
    const { columns, types, first } = this.spec(set);
    const i = columns.indexOf(column);
    return `$${first + i}::${types[i] ?? ''}[]`;
  }

  /** The parameter list for these rows: one array per column, in the declared order. */
  values(input: Input): unknown[] {
    return this.sets.flatMap(({ set, columns }) => {
      const rows = input[set] as ReadonlyArray<Readonly<Record<string, unknown>>>;
      return columns.map((column) => rows.map((row) => row[column] ?? null));
    });
  }

  private spec(set: keyof Input): { readonly columns: readonly string[]; readonly types: readonly string[]; readonly first: number } {
    const spec = this.sets.find((s) => s.set === set);
    if (spec === undefined) throw new Error(`no row set ${String(set)}`);
    return spec;
  }
}
