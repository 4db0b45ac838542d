"""Charges: an amount in an account plan's currency put on the bill of the period holding its
day (the price of credits granted to an invoiced customer, a set-up fee, a one-off service).

Billed, not drawn from credits: a bill shows its period's charges beside `total` (what its
plan charges, drawn from credits) as `charges` and `charges_total`. The bill run takes a
period's charges into the bill under the account's row lock, and a charge is made under the
same lock only for a period with no bill yet (409 otherwise), so each charge lands on exactly
one bill. A charge not billed yet may be voided.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from app.db import Conn, Connection
from app.errors import Conflict, NotFound, ValidationProblem
from app.ledger.service import account_ref
from app.money import AmountError, fmt, to_scaled
from app.rating import recurring_repository as rrepo
from app.rating import repository as repo
from app.rating.periods import period_of
from app.rating.schemas import ChargeIn, ChargeLine, ChargeOut

if TYPE_CHECKING:
    from app.context import AppContext

_CHARGE = """
    SELECT c.*, a.code AS account, pl.code AS plan, cur.code AS currency,
           cur.decimal_places AS currency_places
    FROM account_charges c JOIN accounts a ON a.id = c.account_id
    JOIN account_plans ap ON ap.id = c.account_plan_id JOIN plans pl ON pl.id = ap.plan_id
    JOIN plan_templates t ON t.id = pl.template_id JOIN credit_types cur ON cur.id = t.currency_id"""


def charge_out(row: asyncpg.Record) -> ChargeOut:
    return ChargeOut(id=row["id"], account=row["account"], account_plan=row["account_plan_id"],
                     plan=row["plan"], day=row["day"], currency=row["currency"],
                     amount=fmt(Decimal(row["amount"]), row["currency_places"]),
                     description=row["description"], bill=row["bill_id"],
                     voided_at=row["voided_at"], created_at=row["created_at"])


def lines(raw: list[dict[str, Any]], places: int) -> tuple[list[ChargeLine], Decimal]:
    """Charge lines (`repository.CHARGE_LINES`, as the bill and bill-to-date queries give
    them) and their sum."""
    out = [ChargeLine(id=c["id"], day=c["day"], description=c["description"],
                      amount=fmt(Decimal(c["amount"]), places)) for c in raw]
    return out, sum((Decimal(c["amount"]) for c in raw), Decimal(0))


async def create(ctx: AppContext, code: str, body: ChargeIn) -> ChargeOut:
    account = await account_ref(ctx, code, field="code")
    day = body.day or datetime.now(UTC).date()
    async with ctx.pool.acquire() as conn, conn.transaction():
        await rrepo.lock_account(conn, account.id)  # (as the bill run: one bill, or before it)
        plan = await _plan_of(conn, account.id, body.account_plan, day)
        try:
            to_scaled(body.amount, plan["currency_places"])
        except AmountError as exc:
            raise ValidationProblem(f"{exc} for currency {plan['currency']!r}",
                                    field="amount") from exc
        _, end = period_of(plan["anchor"], plan["bill_frequency"], plan["bill_interval"], day)
        if await rrepo.billed(conn, plan["account_plan_id"], end):
            raise Conflict(f"the period holding {day} is billed: date the charge later",
                           field="day")
        charge_id = await conn.fetchval(
            """INSERT INTO account_charges (account_id, account_plan_id, day, amount, description)
               VALUES ($1, $2, $3, $4, $5) RETURNING id""",
            account.id, plan["account_plan_id"], day, body.amount, body.description)
    return await read(ctx.pool, int(charge_id))


async def _plan_of(conn: Connection, account_id: int, account_plan: int | None,
                   day: date) -> asyncpg.Record:
    """The account plan the charge goes on: the one named (it must cover `day`), or the one
    plan of the account covering it."""
    plans = await repo.plans_at(conn, account_id, day)
    if account_plan is not None:
        named = [p for p in plans if p["account_plan_id"] == account_plan]
        if not named:
            raise ValidationProblem(f"the account has no plan {account_plan} covering {day}",
                                    field="account_plan")
        return named[0]
    if not plans:
        raise ValidationProblem(f"no plan of the account covers {day}", field="day")
    if len(plans) > 1:
        raise ValidationProblem(
            f"{len(plans)} plans of the account cover {day}: name one (account_plan: "
            f"{', '.join(str(p['account_plan_id']) for p in plans)})", field="account_plan")
    return plans[0]


async def read(conn: Conn, charge_id: int) -> ChargeOut:
    row = await conn.fetchrow(_CHARGE + " WHERE c.id = $1", charge_id)
    if row is None:
        raise NotFound(f"no charge {charge_id}", field="id")
    return charge_out(row)


async def of_account(conn: Conn, account_id: int, after_id: int, limit: int) -> list[ChargeOut]:
    rows = await conn.fetch(_CHARGE + " WHERE c.account_id = $1 AND c.id > $2 ORDER BY c.id "
                            "LIMIT $3", account_id, after_id, limit)
    return [charge_out(r) for r in rows]


async def void(ctx: AppContext, charge_id: int) -> ChargeOut:
    """Void a charge not billed yet (again: answered as it is); a billed one is a 409."""
    found = await ctx.pool.fetchval("SELECT account_id FROM account_charges WHERE id = $1",
                                    charge_id)
    if found is None:
        raise NotFound(f"no charge {charge_id}", field="id")
    async with ctx.pool.acquire() as conn, conn.transaction():
        await rrepo.lock_account(conn, found)  # (the bill run takes charges under it)
        bill_id = await conn.fetchval("SELECT bill_id FROM account_charges WHERE id = $1",
                                      charge_id)
        if bill_id is not None:
            raise Conflict(f"charge {charge_id} is on bill {bill_id}", field="id")
        await conn.execute("UPDATE account_charges SET voided_at = now() WHERE id = $1 "
                           "AND voided_at IS NULL AND bill_id IS NULL", charge_id)
    return await read(ctx.pool, charge_id)


async def insert_bill(conn: Connection, values: tuple[Any, ...]) -> tuple[int, Decimal]:
    """The bill run's: write a bill, taking into it the period's charges not voided (the
    plan's last period those dated after it too, made before its end moved earlier), in one
    statement. `values`: the bill's columns up to `settled`, then whether the period is the
    plan's last. Its id and the charges' total."""
    row = await conn.fetchrow(
        """WITH taken AS (
               SELECT id, amount FROM account_charges
               WHERE account_plan_id = $2 AND day >= $3 AND (day < $4 OR $15)
                 AND voided_at IS NULL FOR UPDATE),
           bill AS (
               INSERT INTO bills (account_id, account_plan_id, period_start, period_end,
                                  currency_id, standing_charge, pricings, subtotal,
                                  minimum_spend, minimum_topup, total, credit_type_id, drawn,
                                  settled, charges_total)
               VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, $10, $11, $12, $13, $14,
                       (SELECT COALESCE(sum(amount), 0) FROM taken))
               RETURNING id, charges_total),
           marked AS (UPDATE account_charges SET bill_id = (SELECT id FROM bill)
                      WHERE id IN (SELECT id FROM taken))
           SELECT id, charges_total FROM bill""", *values)
    assert row is not None
    return int(row["id"]), Decimal(row["charges_total"])
