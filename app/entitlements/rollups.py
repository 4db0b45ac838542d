"""Usage rollups (migration 032): the client's usage events summed per account, UTC hour of
their timestamp, product and credit type, so that a usage summary over whole hours reads sums
instead of every event (app/entitlements/history.py).

A pass sums the events written by transactions with `horizon_old <= xid < horizon_new` and moves
the cursor to `horizon_new`, the xmin of a snapshot taken in the pass: every transaction below
it has ended, so the events it sums are final, and an event committed late (a journal entry a
dead process left, flushed by another) has an xid at or above the horizon and is summed by a
later pass. A summary adds to the sums the events at or above the cursor's horizon, read in the
same statement, so each event is counted once whichever side of a pass it falls on.

One process at a time: the cursor row is taken with `SKIP LOCKED`; the others skip the pass.
Holds (what they capture changes later) and reversals are not summed: a summary reads them live.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.db import Connection, xid_window
from app.entitlements.history_repository import KIND_FILTERS

if TYPE_CHECKING:
    from app.context import AppContext

_ROLL = f"""
    INSERT INTO usage_rollups AS r (account_id, hour, product_code, credit_type_id, events,
                                    amount, overage)
    SELECT e.account_id, date_trunc('hour', e.event_time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           e.product_code, e.credit_type_id, count(*), sum(e.amount), sum(e.overage)
    FROM usage_events e
    WHERE e.xid >= $1 AND e.xid < $2 AND {KIND_FILTERS['usage']}
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (account_id, hour, product_code, credit_type_id) DO UPDATE
        SET events = r.events + excluded.events, amount = r.amount + excluded.amount,
            overage = r.overage + excluded.overage"""


async def roll_up(conn: Connection) -> int | None:
    """One pass: sum the events written since the last one into the rollups. Returns the rollup
    rows written, or None when there was nothing to sum or another process holds the cursor.
    With nothing new it writes nothing (no transaction id, no WAL)."""
    async with conn.transaction():
        window = await xid_window(
            conn, "usage_rollup_cursor",
            "SELECT EXISTS (SELECT 1 FROM usage_events WHERE xid >= $1 AND xid < $2)")
        if window is None:
            return None
        old, new = window
        status = await conn.execute(_ROLL, old, new)
        await conn.execute("UPDATE usage_rollup_cursor SET horizon = $1, updated_at = now() "
                           "WHERE id = 1", new)
    return int(status.split()[-1])


async def roll_up_due(ctx: AppContext) -> int | None:
    """The workers' pass (every process; one at a time does it)."""
    async with ctx.pool.acquire() as conn:
        return await roll_up(conn)
