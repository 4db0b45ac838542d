"""SQL of the recurring charges real-time drawdown takes: counter pricings and standing charges."""

from __future__ import annotations

from datetime import date
from typing import Any

import asyncpg

from app.db import Conn, Connection

ACCOUNT_PLAN = """
    SELECT ap.id, ap.account_id, ap.plan_id, ap.start_date, ap.end_date, ap.billing_anchor,
           a.code AS account,
           pl.code AS plan, COALESCE(pl.standing_charge, t.standing_charge) AS standing_charge,
           COALESCE(pl.minimum_spend, t.minimum_spend) AS minimum_spend,
           t.bill_frequency, t.bill_interval, t.currency_id, cur.code AS currency,
           cur.decimal_places AS currency_places, p.code AS product
    FROM account_plans ap JOIN accounts a ON a.id = ap.account_id
    JOIN plans pl ON pl.id = ap.plan_id JOIN plan_templates t ON t.id = pl.template_id
    JOIN products p ON p.id = t.product_id JOIN credit_types cur ON cur.id = t.currency_id"""


async def lock_account(conn: Connection, account_id: int) -> None:
    """Serialises the recurring draws of one account (and attaching a plan to it, which locks
    the row FOR UPDATE). NO KEY UPDATE: inserts whose foreign keys point at the account (the
    ledger, usage events) are not held up."""
    await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE", account_id)


async def account_plan(conn: Conn, account_plan_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(ACCOUNT_PLAN + " WHERE ap.id = $1", account_plan_id)


async def account_plans_pricing_counter(conn: Conn, account_id: int,
                                        counter_id: int) -> list[asyncpg.Record]:
    """The account's plans (any date range) that price this counter."""
    return await conn.fetch(
        ACCOUNT_PLAN + """ WHERE ap.account_id = $1 AND EXISTS (
            SELECT 1 FROM pricings pr WHERE pr.plan_id = ap.plan_id AND pr.counter_id = $2)
        ORDER BY ap.id""", account_id, counter_id)


async def active_account_plans(conn: Conn, day: date,
                               account_ids: list[int] | None) -> list[asyncpg.Record]:
    """Account plans in effect on `day` that have something recurring to draw: a standing
    charge or a counter pricing (of all accounts, or of `account_ids`)."""
    return await conn.fetch(
        ACCOUNT_PLAN + """ WHERE ap.start_date <= $1 AND (ap.end_date IS NULL OR ap.end_date > $1)
          AND ($2::int8[] IS NULL OR ap.account_id = ANY($2::int8[]))
          AND (COALESCE(pl.standing_charge, t.standing_charge) > 0 OR EXISTS (
               SELECT 1 FROM pricings pr WHERE pr.plan_id = ap.plan_id
                 AND pr.counter_id IS NOT NULL))
        ORDER BY ap.account_id, ap.id""", day, account_ids)


async def billed(conn: Conn, account_plan_id: int, period_end: date) -> bool:
    return await conn.fetchval("SELECT 1 FROM bills WHERE account_plan_id = $1 AND period_end = $2",
                               account_plan_id, period_end) is not None


async def config_version(conn: Conn) -> int:
    """Moves with every committed change to account plans, plans, templates or pricings."""
    return int(await conn.fetchval("SELECT version FROM rating_config_version"))


async def counter_pricings(conn: Conn, plan_ids: list[int]) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT id, plan_id, counter_id, start_date, end_date, pricing_type, bands, fixed_fee,
                  counter_mode
           FROM pricings WHERE plan_id = ANY($1::int8[]) AND counter_id IS NOT NULL
           ORDER BY id""", plan_ids)


async def settled(conn: Conn, keys: list[tuple[int, str, date]]) -> set[tuple[int, str, date]]:
    """Which (account, charge key, period start) real-time drawdown has settled (drawn up to
    a known charge) at least once."""
    if not keys:
        return set()
    columns = [list(c) for c in zip(*keys, strict=True)]
    rows = await conn.fetch(
        """SELECT c.account_id, c.charge_key, c.period_start FROM rated_charges c
           JOIN unnest($1::int8[], $2::text[], $3::date[]) AS k(a, ck, d)
             ON c.account_id = k.a AND c.charge_key = k.ck AND c.period_start = k.d
           WHERE c.charged IS NOT NULL""", *columns)
    return {(r["account_id"], r["charge_key"], r["period_start"]) for r in rows}


async def lock_charges(conn: Connection,
                       keys: list[tuple[int, str, date, int]]) -> list[asyncpg.Record]:
    """Create-and-lock rated charges (account, key, period start, credit type), in key order
    (the no-op DO UPDATE locks an existing row and returns it as it is)."""
    if not keys:
        return []
    columns = [list(c) for c in zip(*sorted(set(keys)), strict=True)]
    return await conn.fetch(
        """INSERT INTO rated_charges AS c (account_id, charge_key, period_start, credit_type_id)
           SELECT * FROM unnest($1::int8[], $2::text[], $3::date[], $4::int8[])
           ORDER BY 1, 2, 3
           ON CONFLICT (account_id, charge_key, period_start)
           DO UPDATE SET drawn_minor = c.drawn_minor RETURNING c.*""", *columns)


async def save_charges(conn: Connection, charges: list[tuple[Any, ...]],
                       debits: list[tuple[Any, ...]]) -> None:
    """Write back locked charges (account, key, period, exact, drawn_minor, charged,
    given_minor) and insert the debits they owe (account, uid, product, credit type, amount,
    ts, charge key, period start: a give-back of the same charge reverses them)."""
    if charges:
        await conn.execute(
            """UPDATE rated_charges c SET exact = k.e, drawn_minor = k.m, charged = k.g,
                                          given_minor = k.gv
               FROM unnest($1::int8[], $2::text[], $3::date[], $4::numeric[], $5::int8[],
                           $6::numeric[], $7::int8[]) AS k(a, ck, d, e, m, g, gv)
               WHERE c.account_id = k.a AND c.charge_key = k.ck AND c.period_start = k.d""",
            *[list(c) for c in zip(*charges, strict=True)])
    if debits:
        await conn.execute(
            """INSERT INTO rated_debits (account_id, uid, product_code, credit_type, amount, ts,
                                        charge_key, period_start)
               SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[],
                                    $5::numeric[], $6::timestamptz[], $7::text[], $8::date[])
               ON CONFLICT DO NOTHING""", *[list(c) for c in zip(*debits, strict=True)])


async def insert_credits(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Give-backs (account, uid, charge key, period start, product, credit type, amount, ts),
    paid by `giveback.settle` once committed."""
    if rows:
        await conn.execute(
            """INSERT INTO rated_credits (account_id, uid, charge_key, period_start,
                                          product_code, credit_type, amount, ts)
               SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::date[], $5::text[],
                                    $6::text[], $7::numeric[], $8::timestamptz[])
               ON CONFLICT DO NOTHING""", *[list(c) for c in zip(*rows, strict=True)])
