"""SQL of holds (app/entitlements/holds.py)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import asyncpg

from app.db import Conn


async def insert_pending(conn: Conn, account_id: int, uid: str, product: str,
                         credit_type_id: int, amount: Decimal, expires: datetime) -> bool:
    """A new hold, pending its decision; False when the uid exists."""
    return await conn.fetchval(
        """INSERT INTO holds (account_id, uid, product_code, credit_type_id, amount, status,
                              expires_at)
           VALUES ($1, $2, $3, $4, $5, 'pending', $6)
           ON CONFLICT (account_id, uid) DO NOTHING RETURNING true""",
        account_id, uid, product, credit_type_id, amount, expires) is not None


async def retry_refused(conn: Conn, account_id: int, uid: str, product: str,
                        credit_type_id: int, amount: Decimal, expires: datetime) -> bool:
    """A refused hold's uid asked again (nothing was held): pending, with the new terms."""
    return await conn.fetchval(
        """UPDATE holds SET status = 'pending', product_code = $3, credit_type_id = $4,
                            amount = $5, expires_at = $6, reason = NULL, updated_at = now()
           WHERE account_id = $1 AND uid = $2 AND status = 'refused' RETURNING true""",
        account_id, uid, product, credit_type_id, amount, expires) is not None


async def hold(conn: Conn, account_id: int, uid: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM holds WHERE account_id = $1 AND uid = $2",
                               account_id, uid)


async def decided(conn: Conn, account_id: int, uid: str, status: str,
                  reason: str | None) -> asyncpg.Record:
    """Record a pending hold's decision. `held` (the debit committed) wins over a `refused`
    the workers may have written meanwhile; a `refused` only replaces `pending`."""
    found = await conn.fetchrow(
        """UPDATE holds SET status = $3, reason = $4, updated_at = now()
           WHERE account_id = $1 AND uid = $2
             AND (status = 'pending' OR ($3 = 'held' AND status = 'refused'))
           RETURNING *""", account_id, uid, status, reason)
    if found is None:
        found = await hold(conn, account_id, uid)
    assert found is not None
    return found


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


async def held_parts(conn: Conn, account_id: int, usage_uid: str) -> list[asyncpg.Record]:
    """The hold's entries, one per balance drawn, in drawdown order."""
    return await conn.fetch(
        """SELECT e.seq, e.balance_id, e.amount, a.code AS owner FROM ledger_entries e
           JOIN accounts a ON a.id = e.account_id
           WHERE e.op_key = $1 AND e.kind = 'hold' ORDER BY e.seq""",
        f"u:{account_id}:{usage_uid}")


async def open_holds(conn: Conn, stuck_s: int, limit: int) -> list[asyncpg.Record]:
    """Held past their expiry, and pending or half-ended for `stuck_s` (a crash's)."""
    return await conn.fetch(
        """SELECT h.*, a.code AS account FROM holds h JOIN accounts a ON a.id = h.account_id
           WHERE h.status IN ('pending', 'held', 'capturing', 'releasing')
             AND ((h.status = 'held' AND h.expires_at <= now())
                  OR (h.status <> 'held'
                      AND h.updated_at <= now() - $1 * interval '1 second'))
           ORDER BY h.expires_at LIMIT $2""", stuck_s, limit)
