"""SQL of auto-recharge configs and recharges.

A recharge moves pending -> processing -> succeeded | failed, each step a compare-and-set on
the status; the partial unique index `auto_recharges_one_in_flight` keeps at most one pending or
processing recharge per account and credit type, so every insert here is `ON CONFLICT DO
NOTHING`: a second trigger while one is in flight starts nothing.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import asyncpg

from app.db import Conn

_CONFIG = """SELECT c.*, a.code AS account, ct.code AS credit_type, ct.decimal_places
             FROM auto_recharge_configs c JOIN accounts a ON a.id = c.account_id
             JOIN credit_types ct ON ct.id = c.credit_type_id"""

_RECHARGE = """SELECT r.*, a.code AS account, ct.code AS credit_type, ct.decimal_places,
                      c.enabled, c.recharge_to, c.price_per_credit, c.currency, c.expires_in_days,
                      c.product_codes, c.payment_method_id, c.max_per_day, c.min_charge,
                      c.pays_overage
               FROM auto_recharges r JOIN accounts a ON a.id = r.account_id
               JOIN credit_types ct ON ct.id = r.credit_type_id
               LEFT JOIN auto_recharge_configs c
                 ON c.account_id = r.account_id AND c.credit_type_id = r.credit_type_id"""

# a claimed recharge is looked at again (or taken over from a dead runner) after 1 min, 2, 4 ...
# at most hourly
_BACKOFF = "LEAST(interval '1 minute' * power(2, LEAST(attempts, 6)), interval '1 hour')"
IN_FLIGHT = "('pending', 'processing')"


# configs

async def config(conn: Conn, account_id: int, credit_type_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(_CONFIG + " WHERE c.account_id = $1 AND c.credit_type_id = $2",
                               account_id, credit_type_id)


async def configs(conn: Conn, account_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(_CONFIG + " WHERE c.account_id = $1 ORDER BY ct.code", account_id)


async def save_config(conn: Conn, account_id: int, credit_type_id: int, *, enabled: bool,
                      threshold: Decimal, recharge_to: Decimal, price_per_credit: Decimal,
                      currency: str, expires_in_days: int | None, products: list[str] | None,
                      payment_method_id: str | None, max_per_day: int,
                      min_charge: Decimal, pays_overage: bool) -> None:
    """Create or replace; saving clears the reason creditgate disabled it for."""
    await conn.execute(
        """INSERT INTO auto_recharge_configs
               (account_id, credit_type_id, enabled, threshold, recharge_to, price_per_credit,
                currency, expires_in_days, product_codes, payment_method_id, max_per_day,
                min_charge, pays_overage, disabled_reason, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, NULL, clock_timestamp())
           ON CONFLICT (account_id, credit_type_id) DO UPDATE SET
               enabled = EXCLUDED.enabled, threshold = EXCLUDED.threshold,
               recharge_to = EXCLUDED.recharge_to, price_per_credit = EXCLUDED.price_per_credit,
               currency = EXCLUDED.currency, expires_in_days = EXCLUDED.expires_in_days,
               product_codes = EXCLUDED.product_codes,
               payment_method_id = EXCLUDED.payment_method_id,
               max_per_day = EXCLUDED.max_per_day, min_charge = EXCLUDED.min_charge,
               pays_overage = EXCLUDED.pays_overage,
               disabled_reason = NULL, updated_at = EXCLUDED.updated_at""",
        account_id, credit_type_id, enabled, threshold, recharge_to, price_per_credit, currency,
        expires_in_days, products, payment_method_id, max_per_day, min_charge, pays_overage)


async def disable_config(conn: Conn, account_id: int, credit_type_id: int, reason: str) -> bool:
    row = await conn.fetchrow(
        """UPDATE auto_recharge_configs SET enabled = false, disabled_reason = $3,
                                            updated_at = clock_timestamp()
           WHERE account_id = $1 AND credit_type_id = $2 AND enabled RETURNING 1""",
        account_id, credit_type_id, reason)
    return row is not None


# recharges

async def start(conn: Conn, account_id: int, credit_type_id: int, trigger_key: str,
                available: Decimal, unchanged_since: datetime | None = None) -> int | None:
    """Start a recharge buying `recharge_to - available`; None when the config is not enabled,
    one is in flight, or (with `unchanged_since`) a recharge moved since the balance was read."""
    recharge_id: int | None = await conn.fetchval(
        f"""INSERT INTO auto_recharges (account_id, credit_type_id, trigger_key, available, credits)
            SELECT c.account_id, c.credit_type_id, $3, $4, c.recharge_to - $4
            FROM auto_recharge_configs c
            WHERE c.account_id = $1 AND c.credit_type_id = $2 AND c.enabled
              AND c.recharge_to > $4
              AND NOT EXISTS (SELECT 1 FROM auto_recharges r
                              WHERE r.account_id = $1 AND r.credit_type_id = $2
                                AND (r.status IN {IN_FLIGHT} OR r.updated_at >= $5))
            ON CONFLICT DO NOTHING
            RETURNING id""",
        account_id, credit_type_id, trigger_key, available, unchanged_since)
    return recharge_id


async def claim_due(conn: Conn, limit: int) -> list[asyncpg.Record]:
    """Due recharges: new ones, processing ones whose retry time (or a dead runner's lease) has
    come, and processing ones whose purchase settled meanwhile; each pushed back by its backoff
    while worked on."""
    rows = await conn.fetch(
        f"""UPDATE auto_recharges SET status = 'processing', attempts = attempts + 1,
                   retry_after = clock_timestamp() + {_BACKOFF}, updated_at = clock_timestamp()
            WHERE id IN (
                SELECT r.id FROM auto_recharges r
                WHERE r.status IN {IN_FLIGHT}
                  AND (r.retry_after <= now()
                       OR EXISTS (SELECT 1 FROM purchases p WHERE p.id = r.purchase_id
                                  AND p.status IN ('paid', 'failed', 'refunded')))
                ORDER BY r.retry_after LIMIT $1 FOR UPDATE SKIP LOCKED)
            RETURNING id""", limit)
    return await conn.fetch(_RECHARGE + " WHERE r.id = ANY($1::int8[]) ORDER BY r.id",
                            [r["id"] for r in rows])


async def recharge(conn: Conn, recharge_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(_RECHARGE + " WHERE r.id = $1", recharge_id)


async def account_recharges(conn: Conn, account_id: int, after_id: int,
                            limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(_RECHARGE + " WHERE r.account_id = $1 AND r.id > $2 "
                            "ORDER BY r.id LIMIT $3", account_id, after_id, limit)


async def charges_today(conn: Conn, account_id: int, credit_type_id: int, recharge_id: int) -> int:
    """Recharges of this UTC day that sent a charge to Stripe (paid or not), other than this."""
    count: int = await conn.fetchval(
        """SELECT count(*) FROM auto_recharges
           WHERE account_id = $1 AND credit_type_id = $2 AND id <> $3
             AND purchase_id IS NOT NULL
             AND created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'""",
        account_id, credit_type_id, recharge_id)
    return count


async def link_purchase(conn: Conn, recharge_id: int, purchase_id: int) -> None:
    await conn.execute("UPDATE auto_recharges SET purchase_id = $2 WHERE id = $1 "
                       "AND purchase_id IS NULL", recharge_id, purchase_id)


async def fix_owed(conn: Conn, recharge_id: int, owed: Decimal) -> asyncpg.Record:
    """Add what the account owes to the credits the recharge buys, once: a later call (a retry,
    a second runner) finds it fixed and gets the recharge as it is."""
    await conn.execute(
        """UPDATE auto_recharges SET owed = $2, credits = credits + $2,
                                      updated_at = clock_timestamp()
           WHERE id = $1 AND owed IS NULL AND purchase_id IS NULL""", recharge_id, owed)
    row = await recharge(conn, recharge_id)
    assert row is not None
    return row


async def finish(conn: Conn, recharge_id: int, status: str, reason: str | None) -> bool:
    """processing -> succeeded | failed; False when it was finished already."""
    row = await conn.fetchrow(
        """UPDATE auto_recharges SET status = $2, reason = $3, updated_at = clock_timestamp()
           WHERE id = $1 AND status IN ('pending', 'processing') RETURNING 1""",
        recharge_id, status, reason)
    return row is not None


async def db_now(conn: Conn) -> datetime:
    now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return now


async def sweep_candidates(conn: Conn, after: tuple[int, int], limit: int) -> list[asyncpg.Record]:
    """Enabled configs after `after` (account id, credit type id) with nothing in flight, except
    those the daily limit stopped today."""
    return await conn.fetch(
        f"""SELECT c.account_id, c.credit_type_id, c.threshold, a.code AS account, a.root_id,
                   ct.code AS credit_type, ct.decimal_places
            FROM auto_recharge_configs c JOIN accounts a ON a.id = c.account_id
            JOIN credit_types ct ON ct.id = c.credit_type_id
            WHERE c.enabled AND (c.account_id, c.credit_type_id) > ($2, $3)
              AND NOT EXISTS (
                  SELECT 1 FROM auto_recharges r
                  WHERE r.account_id = c.account_id AND r.credit_type_id = c.credit_type_id
                    AND (r.status IN {IN_FLIGHT}
                         OR (r.status = 'failed' AND r.reason = 'daily_limit'
                             AND r.created_at >= date_trunc('day', now() AT TIME ZONE 'UTC')
                                                 AT TIME ZONE 'UTC')))
            ORDER BY c.account_id, c.credit_type_id LIMIT $1""", limit, after[0], after[1])
