"""SQL of holds (app/entitlements/holds.py)."""

from __future__ import annotations

from decimal import Decimal

import asyncpg

from app.db import Conn


async def hold(conn: Conn, account_id: int, uid: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM holds WHERE account_id = $1 AND uid = $2",
                               account_id, uid)


async def claim_end(conn: Conn, account_id: int, uid: str, final: str,
                    captured: Decimal | None) -> asyncpg.Record | None:
    """held -> capturing (final `captured`) or releasing (final `released`, `expired`); None
    when the hold is not held (another caller ended it, or is ending it)."""
    return await conn.fetchrow(
        """UPDATE holds SET status = CASE WHEN $3 = 'captured' THEN 'capturing'
                                           ELSE 'releasing' END,
                            final_status = $3, captured = $4, updated_at = now()
           WHERE account_id = $1 AND uid = $2 AND status = 'held' RETURNING *""",
        account_id, uid, final, captured)


async def finished(conn: Conn, account_id: int, uid: str) -> None:
    await conn.execute(
        """UPDATE holds SET status = final_status, updated_at = now()
           WHERE account_id = $1 AND uid = $2 AND status IN ('capturing', 'releasing')""",
        account_id, uid)


async def open_holds(conn: Conn, stuck_s: int, limit: int) -> list[asyncpg.Record]:
    """Held past their expiry, and half-ended for `stuck_s` (a crash's)."""
    return await conn.fetch(
        """SELECT h.*, a.code AS account FROM holds h JOIN accounts a ON a.id = h.account_id
           WHERE h.status IN ('held', 'capturing', 'releasing')
             AND ((h.status = 'held' AND h.expires_at <= now())
                  OR (h.status <> 'held'
                      AND h.updated_at <= now() - $1 * interval '1 second'))
           ORDER BY h.expires_at LIMIT $2""", stuck_s, limit)
