"""SQL of purchases, Stripe customers and stored Stripe events.

A purchase changes status only through the guarded updates below, each a compare-and-set on
the current status: only a pending purchase can fail, only a pending (or granting) one can be
claimed for granting, only a granting one becomes paid.
"""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from app.db import Conn

_PURCHASE = """SELECT p.*, a.code AS account, ct.code AS credit_type, ct.decimal_places,
                      b.expires_at, b.product_codes,
                      (SELECT amount FROM ledger_entries
                       WHERE op_key = 'po:' || p.id AND seq = 1) AS overage_paid
               FROM purchases p JOIN accounts a ON a.id = p.account_id
               JOIN credit_types ct ON ct.id = p.credit_type_id
               JOIN balances b ON b.id = p.balance_id"""

# a purchase is looked at again after 30 s, 1 min, 2 min ... at most hourly
_BACKOFF = "LEAST(interval '30 seconds' * power(2, LEAST(checks, 7)), interval '1 hour')"


# customers

async def customer_link(conn: Conn, account_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM stripe_customers WHERE account_id = $1", account_id)


async def link_customer(conn: Conn, account_id: int, customer_id: str, created_here: bool) -> bool:
    """False when the account is linked already."""
    row = await conn.fetchrow(
        """INSERT INTO stripe_customers (account_id, customer_id, created_here) VALUES ($1, $2, $3)
           ON CONFLICT (account_id) DO NOTHING RETURNING 1""",
        account_id, customer_id, created_here)
    return row is not None


async def account_of_customer(conn: Conn, customer_id: str) -> str | None:
    code: str | None = await conn.fetchval(
        """SELECT a.code FROM stripe_customers s JOIN accounts a ON a.id = s.account_id
           WHERE s.customer_id = $1""", customer_id)
    return code


# purchases

async def insert_purchase(conn: Conn, *, account_id: int, balance_id: int, credit_type_id: int,
                          credits: Decimal, price: Decimal, currency: str, amount_minor: int,
                          method: str, customer_id: str, payment_method_id: str | None,
                          success_url: str | None, cancel_url: str | None, description: str,
                          api_key_id: int, request_key: str, first_check: timedelta,
                          pays_overage: bool) -> int | None:
    """The new purchase's id; None when this API request already created one."""
    purchase_id: int | None = await conn.fetchval(
        """INSERT INTO purchases (account_id, balance_id, credit_type_id, credits, price, currency,
                                  amount_minor, method, stripe_customer_id, payment_method_id,
                                  success_url, cancel_url, description, api_key_id, request_key,
                                  check_after, pays_overage)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                   now() + $16::interval, $17)
           ON CONFLICT (api_key_id, request_key) DO NOTHING
           RETURNING id""",
        account_id, balance_id, credit_type_id, credits, price, currency, amount_minor, method,
        customer_id, payment_method_id, success_url, cancel_url, description, api_key_id,
        request_key, first_check, pays_overage)
    return purchase_id


async def insert_recharge_purchase(conn: Conn, *, recharge_id: int, account_id: int,
                                   balance_id: int, credit_type_id: int, credits: Decimal,
                                   price: Decimal, currency: str, amount_minor: int,
                                   customer_id: str, payment_method_id: str, description: str,
                                   first_check: timedelta, pays_overage: bool) -> int | None:
    """An auto-recharge's purchase (saved card); None when the recharge has one already."""
    purchase_id: int | None = await conn.fetchval(
        """INSERT INTO purchases (account_id, balance_id, credit_type_id, credits, price, currency,
                                  amount_minor, method, stripe_customer_id, payment_method_id,
                                  description, recharge_id, check_after, pays_overage)
           VALUES ($1, $2, $3, $4, $5, $6, $7, 'saved_card', $8, $9, $10, $11,
                   now() + $12::interval, $13)
           ON CONFLICT (recharge_id) DO NOTHING
           RETURNING id""",
        account_id, balance_id, credit_type_id, credits, price, currency, amount_minor,
        customer_id, payment_method_id, description, recharge_id, first_check, pays_overage)
    return purchase_id


async def purchase_by_recharge(conn: Conn, recharge_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(_PURCHASE + " WHERE p.recharge_id = $1", recharge_id)


async def purchase(conn: Conn, purchase_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(_PURCHASE + " WHERE p.id = $1", purchase_id)


async def purchase_by_request(conn: Conn, api_key_id: int, request_key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(_PURCHASE + " WHERE p.api_key_id = $1 AND p.request_key = $2",
                               api_key_id, request_key)


async def purchase_by_intent(conn: Conn, intent_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(_PURCHASE + " WHERE p.payment_intent_id = $1", intent_id)


async def purchase_by_session(conn: Conn, session_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(_PURCHASE + " WHERE p.checkout_session_id = $1", session_id)


async def account_purchases(conn: Conn, account_id: int, after_id: int,
                            limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(_PURCHASE + " WHERE p.account_id = $1 AND p.id > $2 ORDER BY p.id LIMIT $3",
                            account_id, after_id, limit)


async def record_intent(conn: Conn, purchase_id: int, intent_id: str, status: str,
                        next_action: str | None) -> None:
    """What Stripe said about the purchase's PaymentIntent (while the purchase is unsettled)."""
    await conn.execute(
        """UPDATE purchases SET payment_intent_id = COALESCE(payment_intent_id, $2),
                                stripe_status = $3, next_action = $4, last_error = NULL,
                                updated_at = now()
           WHERE id = $1 AND status IN ('pending', 'granting')""",
        purchase_id, intent_id, status, next_action)


async def record_session(conn: Conn, purchase_id: int, session_id: str, url: str | None,
                         status: str | None, intent_id: str | None) -> None:
    await conn.execute(
        """UPDATE purchases SET checkout_session_id = COALESCE(checkout_session_id, $2),
                                checkout_url = COALESCE($3, checkout_url), stripe_status = $4,
                                payment_intent_id = COALESCE(payment_intent_id, $5),
                                last_error = NULL, updated_at = now()
           WHERE id = $1 AND status IN ('pending', 'granting')""",
        purchase_id, session_id, url, status, intent_id)


async def note_error(conn: Conn, purchase_id: int, error: str) -> None:
    await conn.execute("UPDATE purchases SET last_error = $2, updated_at = now() WHERE id = $1",
                       purchase_id, error[:500])


async def claim_granting(conn: Conn, purchase_id: int, intent_id: str | None) -> bool:
    row = await conn.fetchrow(
        """UPDATE purchases SET status = 'granting', stripe_status = 'succeeded',
                                payment_intent_id = COALESCE(payment_intent_id, $2),
                                next_action = NULL, updated_at = now()
           WHERE id = $1 AND status IN ('pending', 'granting') RETURNING 1""",
        purchase_id, intent_id)
    return row is not None


async def mark_paid(conn: Conn, purchase_id: int) -> bool:
    row = await conn.fetchrow(
        """UPDATE purchases SET status = 'paid', paid_at = now(), updated_at = now()
           WHERE id = $1 AND status = 'granting' RETURNING 1""", purchase_id)
    return row is not None


async def mark_failed(conn: Conn, purchase_id: int, code: str, decline_code: str | None,
                      message: str | None) -> bool:
    row = await conn.fetchrow(
        """UPDATE purchases SET status = 'failed', failure_code = $2, decline_code = $3,
                                failure_message = $4, next_action = NULL, updated_at = now()
           WHERE id = $1 AND status = 'pending' RETURNING 1""",
        purchase_id, code, decline_code, message)
    return row is not None


async def mark_refunded(conn: Conn, purchase_id: int, amount_refunded: int) -> bool:
    row = await conn.fetchrow(
        """UPDATE purchases SET status = 'refunded', amount_refunded = $2, updated_at = now()
           WHERE id = $1 AND status = 'paid' RETURNING 1""", purchase_id, amount_refunded)
    return row is not None


async def record_refunded_amount(conn: Conn, purchase_id: int, amount_refunded: int) -> None:
    await conn.execute(
        """UPDATE purchases SET amount_refunded = GREATEST(amount_refunded, $2), updated_at = now()
           WHERE id = $1""", purchase_id, amount_refunded)


async def refunded_taken_back(conn: Conn, purchase_id: int, balance_id: int) -> int:
    """The refunded amount (minor units) up to which partial refunds took their credits back:
    the largest in the keys `rp:<purchase>:<amount refunded>` of the balance's entries."""
    found = await conn.fetchval(
        """SELECT max(split_part(op_key, ':', 3)::bigint) FROM ledger_entries
           WHERE balance_id = $1 AND op_key LIKE $2""", balance_id, f"rp:{purchase_id}:%")
    return int(found or 0)


async def take_back_position(conn: Conn, purchase_id: int,
                             balance_id: int) -> tuple[Decimal, Decimal, Decimal]:
    """What happened to a purchase's credits beside their use, for a refund of a balance no
    longer live: (lapsed: what expiring or being voided removed, taken: what partial refunds
    took out of it while it was live, owed: the overage every take-back so far created)."""
    row = await conn.fetchrow(
        """WITH mine AS (SELECT op_key, kind, amount FROM ledger_entries WHERE balance_id = $1),
                ops AS (SELECT DISTINCT op_key FROM mine
                        WHERE op_key LIKE $2 OR op_key LIKE $3 OR op_key = $4)
           SELECT (SELECT coalesce(-sum(amount), 0) FROM mine
                   WHERE kind IN ('void', 'expire')) AS lapsed,
                  (SELECT coalesce(-sum(amount), 0) FROM mine
                   WHERE kind = 'adjustment' AND op_key IN (SELECT op_key FROM ops)) AS taken,
                  (SELECT coalesce(-sum(amount), 0) FROM ledger_entries
                   WHERE kind = 'overage' AND op_key IN (SELECT op_key FROM ops)) AS owed""",
        balance_id, f"rp:{purchase_id}:%", f"rx:{purchase_id}:%", f"r:{balance_id}")
    assert row is not None  # (an aggregate: always one row)
    return row["lapsed"], row["taken"], row["owed"]


async def insert_lapsed_take_back(conn: Conn, op: str, account_id: int, balance_id: int,
                                  credit_type_id: int, owed: Decimal, description: str) -> bool:
    """A refund's share that a dead balance could not give back, owed as overage: a zero
    `adjustment` on the balance (so its take-backs are found from it) and the `overage` entry,
    once per op key."""
    found = await conn.fetchval(
        """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id, kind,
                                       amount, description, created_at)
           VALUES ($1, 0, $2, $3, $4, 'adjustment', $7, $6, now()),
                  ($1, 1, $2, NULL, $4, 'overage', -$5::numeric, $6, now())
           ON CONFLICT (op_key, seq) DO NOTHING RETURNING 1""",
        op, account_id, balance_id, credit_type_id, owed, description, owed * 0)  # 0 at its places
    return found is not None


async def claim_unsettled(conn: Conn, limit: int) -> list[asyncpg.Record]:
    """Due unsettled purchases, each pushed back by its backoff so that no other process takes
    it meanwhile."""
    rows = await conn.fetch(
        f"""UPDATE purchases SET checks = checks + 1, check_after = now() + {_BACKOFF}
            WHERE id IN (SELECT id FROM purchases
                         WHERE status IN ('pending', 'granting') AND check_after <= now()
                         ORDER BY check_after LIMIT $1 FOR UPDATE SKIP LOCKED)
            RETURNING id""", limit)
    found = [await purchase(conn, r["id"]) for r in rows]
    return [r for r in found if r is not None]


# inbound Stripe events

async def store_event(conn: Conn, event_id: str, event_type: str, payload: bytes,
                      retry_after: timedelta) -> bool:
    """Store an event once; False when it was stored before."""
    row = await conn.fetchrow(
        """INSERT INTO stripe_events (id, type, payload, retry_after)
           VALUES ($1, $2, $3::jsonb, now() + $4::interval)
           ON CONFLICT (id) DO NOTHING RETURNING 1""",
        event_id, event_type, payload.decode(), retry_after)
    return row is not None


async def event_outcome(conn: Conn, event_id: str) -> tuple[bool, str | None]:
    row = await conn.fetchrow("SELECT handled_at, outcome FROM stripe_events WHERE id = $1", event_id)
    return (row is not None and row["handled_at"] is not None), (row["outcome"] if row else None)


async def mark_event_handled(conn: Conn, event_id: str, outcome: str) -> None:
    await conn.execute(
        "UPDATE stripe_events SET handled_at = now(), outcome = $2 WHERE id = $1 AND handled_at IS NULL",
        event_id, outcome)


async def claim_unhandled_events(conn: Conn, limit: int) -> list[tuple[str, str, dict[str, Any]]]:
    rows = await conn.fetch(
        f"""UPDATE stripe_events SET attempts = attempts + 1,
                   retry_after = now() + {_BACKOFF.replace('checks', 'attempts')}
            WHERE id IN (SELECT id FROM stripe_events
                         WHERE handled_at IS NULL AND retry_after <= now()
                         ORDER BY retry_after LIMIT $1 FOR UPDATE SKIP LOCKED)
            RETURNING id, type, payload::text AS payload""", limit)
    return [(r["id"], r["type"], json.loads(r["payload"])) for r in rows]
