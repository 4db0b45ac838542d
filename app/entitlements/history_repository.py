"""SQL of an account's usage history (app/entitlements/history.py): the list and a summary of
any range read the index `usage_events (account_id, recorded_at)` (migration 028); a summary
over whole hours reads the rollups (migration 032, app/entitlements/rollups.py)."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from app.db import CUSTOM_PLANS, Conn, Connection, Where

# What a usage uid says about who wrote the event (app/entitlements/schemas.py RESERVED_UID):
# a hold's is h0:<hold uid>, the rating engine's r…, s…, c…, b…; anything else is the client's.
KIND_FILTERS = {
    "usage": r"e.uid !~ '^[rscbh][0-9]+:'",
    "hold": r"e.uid ~ '^h[0-9]+:'",
    "rated": r"e.uid ~ '^[rscb][0-9]+:'",
}


async def events(conn: Conn, account_id: int, before: tuple[datetime, str] | None,
                 product: str | None, kind: str | None, limit: int) -> list[asyncpg.Record]:
    """Newest recorded first, ties by uid descending; `before`: the last row of the page before
    (the index is read from there down, so a deep page costs what a first one does)."""
    where = Where(account_id, limit)
    where.add("e.account_id = $1")
    if before is not None:  # the index range first, then the exact position within it
        where.add("e.recorded_at <= {0} AND (e.recorded_at, e.uid) < ({0}, {1})", *before)
    if product is not None:
        where.add("e.product_code = {}", product)
    if kind is not None:
        where.add(KIND_FILTERS[kind])
    return await conn.fetch(
        f"""SELECT e.uid, e.product_code, e.credit_type_id, e.amount, e.overage, e.event_time,
                   e.recorded_at, r.amount AS reversed
            FROM usage_events e
            LEFT JOIN usage_reversals r ON r.account_id = e.account_id AND r.uid = e.uid
            WHERE {where}
            ORDER BY e.recorded_at DESC, e.uid DESC LIMIT $2""",
        *where.args)


async def summary(conn: Conn, account_id: int, window: str, start: datetime, end: datetime,
                  recorded_from: datetime, recorded_to: datetime, product: str | None,
                  credit_type_id: int | None) -> list[asyncpg.Record]:
    """Per UTC `window` (hour, day) of the events' timestamps in [start, end), product and credit
    type: the client's usage events (their amounts, what reversals gave back, their overage) and
    captured holds (what was captured). `recorded_from`/`recorded_to` bound the index range: an
    event's timestamp is accepted only within a window around the time it is recorded."""
    where = Where(account_id, window)
    where.add("e.account_id = $1")
    where.add("e.recorded_at >= {} AND e.recorded_at < {}", recorded_from, recorded_to)
    where.add("e.event_time >= {} AND e.event_time < {}", start, end)
    where.add(f"({KIND_FILTERS['usage']} OR e.uid LIKE 'h0:%')")
    if product is not None:
        where.add("e.product_code = {}", product)
    if credit_type_id is not None:
        where.add("e.credit_type_id = {}", credit_type_id)
    return await conn.fetch(
        f"""WITH used AS (
              SELECT date_trunc($2, e.event_time AT TIME ZONE 'UTC') AS bucket, e.product_code,
                     e.credit_type_id, e.overage, COALESCE(r.amount, 0) AS reversed,
                     CASE WHEN e.uid LIKE 'h0:%' THEN h.captured ELSE e.amount END AS amount
              FROM usage_events e
              LEFT JOIN usage_reversals r ON r.account_id = e.account_id AND r.uid = e.uid
              LEFT JOIN holds h ON e.uid LIKE 'h0:%' AND h.account_id = e.account_id
                                   AND h.uid = substr(e.uid, 4)
              WHERE {where})
            SELECT bucket AT TIME ZONE 'UTC' AS bucket, product_code, credit_type_id,
                   count(*) AS events, sum(amount) AS amount, sum(reversed) AS reversed,
                   sum(overage) AS overage
            FROM used WHERE amount > 0
            GROUP BY bucket, product_code, credit_type_id
            ORDER BY bucket, product_code, credit_type_id""",
        *where.args)


async def summary_rolled(conn: Connection, account_id: int, window: str, start: datetime,
                         end: datetime, product: str | None,
                         credit_type_id: int | None) -> list[asyncpg.Record]:
    """What `summary` answers, for `start` and `end` on whole hours, from the rollups plus the
    events no rollup pass has summed yet (xid at or above the cursor's horizon), the holds'
    captures and the reversals (both read live: they change after the event).

    The horizon and the rollups are read in one repeatable-read snapshot, so each event is on
    one side of it. The horizon is a parameter planned with its value (a custom plan): the
    events above it, a few seconds' worth, are found through the BRIN index on `xid`, where a
    generic plan would read the account's whole history through its other indexes."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _summary_rolled(conn, account_id, window, start, end,
                                     await rollup_horizon(conn), product, credit_type_id)


async def rollup_horizon(conn: Connection) -> int:
    """The rollup cursor's horizon (the events at or above it are not summed yet); the rest of
    the caller's transaction is planned with its parameters' values (CUSTOM_PLANS), so that a
    statement on `xid >= horizon` reads the BRIN index's few recent pages."""
    horizon: int = await conn.fetchval(
        f"SELECT {CUSTOM_PLANS}, horizon FROM usage_rollup_cursor WHERE id = 1", column=1)
    return horizon


async def _summary_rolled(conn: Connection, account_id: int, window: str, start: datetime,
                          end: datetime, horizon: int, product: str | None,
                          credit_type_id: int | None) -> list[asyncpg.Record]:
    where = Where(account_id, window, start, end, horizon)
    if product is not None:
        where.add("e.product_code = {}", product)
    if credit_type_id is not None:
        where.add("e.credit_type_id = {}", credit_type_id)
    extra = f"AND {where}" if where.args[5:] else ""
    return await conn.fetch(
        f"""WITH parts AS (
              SELECT e.hour AS at, e.product_code, e.credit_type_id, e.events, e.amount,
                     0::numeric AS reversed, e.overage
              FROM usage_rollups e
              WHERE e.account_id = $1 AND e.hour >= $3 AND e.hour < $4 {extra}
              UNION ALL
              SELECT e.event_time, e.product_code, e.credit_type_id, 1, e.amount, 0, e.overage
              FROM usage_events e
              WHERE e.xid >= $5 AND e.account_id = $1 AND e.event_time >= $3
                AND e.event_time < $4 AND {KIND_FILTERS['usage']} {extra}
              UNION ALL
              SELECT e.event_time, e.product_code, e.credit_type_id, 1, h.captured, 0, e.overage
              FROM usage_events e
              JOIN holds h ON h.account_id = e.account_id AND h.uid = substr(e.uid, 4)
              WHERE e.account_id = $1 AND e.uid LIKE 'h0:%' AND e.event_time >= $3
                AND e.event_time < $4 AND h.captured > 0 {extra}
              UNION ALL
              SELECT e.event_time, e.product_code, e.credit_type_id, 0, 0, r.amount, 0
              FROM usage_reversals r
              JOIN usage_events e ON e.account_id = r.account_id AND e.uid = r.uid
              WHERE r.account_id = $1 AND e.event_time >= $3 AND e.event_time < $4
                AND {KIND_FILTERS['usage']} {extra})
            SELECT date_trunc($2, at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS bucket,
                   product_code, credit_type_id, sum(events) AS events, sum(amount) AS amount,
                   sum(reversed) AS reversed, sum(overage) AS overage
            FROM parts
            GROUP BY 1, 2, 3 HAVING sum(events) > 0
            ORDER BY 1, 2, 3""",
        *where.args)
