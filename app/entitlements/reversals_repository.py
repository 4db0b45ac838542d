"""SQL of usage reversals (app/entitlements/reversals.py)."""

from __future__ import annotations

from decimal import Decimal

import asyncpg

from app.db import Conn


async def reversal(conn: Conn, account_id: int, uid: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM usage_reversals WHERE account_id = $1 AND uid = $2", account_id, uid)


async def claim(conn: Conn, account_id: int, uid: str, amount: Decimal,
                reason: str) -> tuple[asyncpg.Record, bool]:
    """The event's reversal, and whether this call wrote it (the first one fixes the amount)."""
    row = await conn.fetchrow(
        """INSERT INTO usage_reversals (account_id, uid, amount, reason, status)
           VALUES ($1, $2, $3, $4, 'reversing') ON CONFLICT DO NOTHING RETURNING *""",
        account_id, uid, amount, reason)
    if row is not None:
        return row, True
    found = await reversal(conn, account_id, uid)
    assert found is not None  # reversals are never deleted
    return found, False


async def finished(conn: Conn, account_id: int, uid: str) -> None:
    await conn.execute(
        """UPDATE usage_reversals SET status = 'reversed', updated_at = now()
           WHERE account_id = $1 AND uid = $2 AND status = 'reversing'""", account_id, uid)


async def stuck(conn: Conn, stuck_s: int, limit: int) -> list[asyncpg.Record]:
    """Reversals a crash left half-done `stuck_s` ago or more."""
    return await conn.fetch(
        """SELECT r.*, a.code AS account FROM usage_reversals r
           JOIN accounts a ON a.id = r.account_id
           WHERE r.status = 'reversing' AND r.updated_at <= now() - $1 * interval '1 second'
           ORDER BY r.updated_at LIMIT $2""", stuck_s, limit)
