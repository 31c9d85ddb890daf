/**
 * The one lock order (docs/architecture.md, "One lock order"). Every statement that can lock more than one row of
 * `deployments` or `attempts` first locks them in a CTE made by `lockedInIdOrder`, by primary key ascending, and
 * writes only rows it has locked there (its UPDATE joins the CTE); a statement that writes both tables locks its
 * attempts after its deployments. So no row-lock cycle forms among the writers of deployments and attempts: no two
 * of them each hold a row the other waits for. The order covers those row locks only; other waits are outside it (a
 * claim INSERT waiting on an uncommitted duplicate key, an ON CONFLICT waiting on another transaction, the one-event
 * path's FOR UPDATE), so a deadlock PostgreSQL breaks is still retried (`retryLockConflicts`): the retry is a
 * safety net.
 *
 * Sorting the input arrays is not enough: an `UPDATE ... FROM unnest(...)` locks rows in the order its join
 * produces them, the array's in a nested loop driven by it, the heap's in a hash join that scans the table, and the
 * planner picks by the batch's size and the table's statistics (test/integration/lock-order.test.ts shows each).
 * A `SELECT ... ORDER BY id FOR NO KEY UPDATE` locks after it sorts (its LockRows sits above the sort, or above an
 * index scan in id order), whatever the plan. `FOR NO KEY UPDATE` is the lock the UPDATE takes itself (no write
 * here changes a key), so it blocks nothing the UPDATE did not: not the key-share locks of foreign-key checks.
 * `MATERIALIZED`: the CTE stays a step of its own, never folded into the UPDATE's join.
 */

/**
 * The body of a CTE that locks the rows of `table` whose ids are in `ids` (an SQL expression of type uuid[]), and
 * that meet `where` (a condition on the table's columns) if given, in id order; it returns their ids.
 */
export function lockedInIdOrder(table: 'deployments' | 'attempts', ids: string, where?: string): string {
  const condition = where === undefined ? '' : ` AND ${where}`;
  return `MATERIALIZED (SELECT id FROM ${table} WHERE id = ANY(${ids})${condition} ORDER BY id FOR NO KEY UPDATE)`;
}
