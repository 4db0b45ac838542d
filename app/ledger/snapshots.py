"""Balance snapshots: a rebuild of the hot state reads a balance's (and an account's overage's)
snapshot plus the ledger entries after it, not its whole history (migration 025).

A snapshot is `(horizon, amount)`: `amount` is the sum of the entries whose transaction id
(`ledger_entries.xid`, set by Postgres on insert) is below `horizon`, or that have none (written
before migration 025). It is taken in a repeatable-read transaction with `horizon` = the xmin
of that transaction's snapshot: every transaction below it has ended, so the set of entries it
sums is final, and each entry is in the snapshot or after it, never both, never neither,
whatever order flushes commit in. A newer snapshot is the older one plus the entries between
the two horizons; it replaces the older one only if its horizon is higher.

Which to take: each worker pass (one process at a time: the cursor row is locked with SKIP
LOCKED) counts the entries written since the last pass, by entry id, into each snapshot's
`tail_entries`, and snapshots those whose tail reached `every` entries. Counting by id may miss
an entry that committed late; that only delays a snapshot, the sums never go by id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg

from app.db import Connection

if TYPE_CHECKING:
    from app.context import AppContext

COUNT_CHUNK = 200_000  # entries counted per statement (a pass after a long pause takes several)

_BALANCE = """
    INSERT INTO balance_snapshots AS s (balance_id, horizon, amount)
    SELECT $1, $2, COALESCE(old.amount, 0) + COALESCE((
               SELECT sum(e.amount) FROM ledger_entries e
               WHERE e.balance_id = $1 AND e.xid >= COALESCE(old.horizon, '0')
                 AND e.xid < $2), 0)
    FROM (SELECT 1) one LEFT JOIN balance_snapshots old ON old.balance_id = $1
    ON CONFLICT (balance_id) DO UPDATE
        SET horizon = excluded.horizon, amount = excluded.amount, tail_entries = 0,
            taken_at = now()
        WHERE s.horizon < excluded.horizon"""

_OVERAGE = """
    INSERT INTO overage_snapshots AS s (account_id, credit_type_id, horizon, amount)
    SELECT $1, $2, $3, COALESCE(old.amount, 0) + COALESCE((
               SELECT sum(e.amount) FROM ledger_entries e
               WHERE e.kind = 'overage' AND e.account_id = $1 AND e.credit_type_id = $2
                 AND e.xid >= COALESCE(old.horizon, '0') AND e.xid < $3), 0)
    FROM (SELECT 1) one LEFT JOIN overage_snapshots old
        ON old.account_id = $1 AND old.credit_type_id = $2
    ON CONFLICT (account_id, credit_type_id) DO UPDATE
        SET horizon = excluded.horizon, amount = excluded.amount, tail_entries = 0,
            taken_at = now()
        WHERE s.horizon < excluded.horizon"""


async def _take(conn: Connection, sql: str, *key: int) -> bool:
    """One snapshot in its own repeatable-read transaction; False when a concurrent snapshot
    of the same balance won (it is as good)."""
    try:
        async with conn.transaction(isolation="repeatable_read"):
            horizon = await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())")
            await conn.execute(sql, *key, horizon)
    except (asyncpg.SerializationError, asyncpg.UniqueViolationError):
        return False
    return True


async def snapshot_balance(conn: Connection, balance_id: int) -> bool:
    return await _take(conn, _BALANCE, balance_id)


async def snapshot_overage(conn: Connection, account_id: int, credit_type_id: int) -> bool:
    return await _take(conn, _OVERAGE, account_id, credit_type_id)


async def _count_new(conn: Connection, every: int) -> tuple[list[asyncpg.Record],
                                                          list[asyncpg.Record]] | None:
    """Add the entries written since the cursor to the tails they lengthen, and return the
    balances and overages whose tail has reached `every`; None when another process is
    counting, or nothing is new."""
    async with conn.transaction():
        last = await conn.fetchval(
            "SELECT last_entry FROM snapshot_cursor WHERE id = 1 FOR UPDATE SKIP LOCKED")
        if last is None:
            return None
        top = await conn.fetchval("SELECT max(id) FROM ledger_entries")
        if top is None or top <= last:
            return None
        top = min(top, last + COUNT_CHUNK)
        balances = await conn.fetch(
            """INSERT INTO balance_snapshots AS s (balance_id, horizon, amount, tail_entries)
               SELECT balance_id, '0', 0, count(*) FROM ledger_entries
               WHERE id > $1 AND id <= $2 AND balance_id IS NOT NULL GROUP BY balance_id
               ON CONFLICT (balance_id) DO UPDATE
                   SET tail_entries = s.tail_entries + excluded.tail_entries
               RETURNING balance_id, tail_entries""", last, top)
        overages = await conn.fetch(
            """INSERT INTO overage_snapshots AS s (account_id, credit_type_id, horizon, amount,
                                                   tail_entries)
               SELECT account_id, credit_type_id, '0', 0, count(*) FROM ledger_entries
               WHERE id > $1 AND id <= $2 AND kind = 'overage'
               GROUP BY account_id, credit_type_id
               ON CONFLICT (account_id, credit_type_id) DO UPDATE
                   SET tail_entries = s.tail_entries + excluded.tail_entries
               RETURNING account_id, credit_type_id, tail_entries""", last, top)
        await conn.execute("UPDATE snapshot_cursor SET last_entry = $1, updated_at = now() "
                           "WHERE id = 1", top)
    return ([r for r in balances if r["tail_entries"] >= every],
            [r for r in overages if r["tail_entries"] >= every])


async def take_due(ctx: AppContext, every: int) -> int:
    """Worker: count the entries written since the last pass; snapshot each balance and
    overage whose tail reached `every` entries. Returns the snapshots taken."""
    taken = 0
    async with ctx.pool.acquire() as conn:
        while (due := await _count_new(conn, every)) is not None:
            balances, overages = due
            for row in balances:
                taken += await snapshot_balance(conn, row["balance_id"])
            for row in overages:
                taken += await snapshot_overage(conn, row["account_id"], row["credit_type_id"])
    return taken
