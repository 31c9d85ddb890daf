/**
 * A SQL statement with the type of its rows. Every statement the product runs is one of these, defined in this
 * folder, and runs as a named prepared statement (see runner.ts): its name is derived from its text, so the same
 * text has the same name on every connection and in every process, with no registry to keep. Two kinds are not
 * prepared: `plain` (no parameters) and `plannedPerCall` (batches whose size a cached plan cannot see).
 */
import { createHash } from 'node:crypto';

export interface Statement<Row = Record<string, unknown>> {
  readonly text: string;
  /** the prepared statement's name: `lf_` + the first 24 hex digits of the text's SHA-1; '' for one never prepared */
  readonly name: string;
  /** carries the row type only; never set */
  readonly row?: Row;
}

/** Defines a statement, named by its text. Every statement is a constant of this folder, made once when it loads (the
 * transition write too: one fixed text for any number of rows, row-sets.ts), so no text is hashed per call. */
export function sql<Row = Record<string, unknown>>(text: string): Statement<Row> {
  return { text, name: `lf_${createHash('sha1').update(text).digest('hex').slice(0, 24)}` };
}

/**
 * A statement sent unprepared, in the simple query protocol: transaction control, LISTEN, and `SET a; SET b`,
 * which PostgreSQL cannot prepare. It takes no parameters.
 */
export function plain(text: string): Statement<never> {
  return { text, name: '' };
}

/**
 * A statement with parameters that PostgreSQL plans for each call's values (sent as the unnamed statement, so no
 * plan is cached): for a batch over arrays whose length runs from one to 100,000. A named statement gets a generic
 * plan from its sixth run on a connection, and a generic plan cannot see an array's length: it takes `unnest` for
 * 10 rows and joins by nested loops, so the stamp flush took 4 s for 5,000 stamps and grew with the square (issue
 * 27). Planning costs far less than such a statement's work.
 */
export function plannedPerCall<Row = Record<string, unknown>>(text: string): Statement<Row> {
  return { text, name: '' };
}
