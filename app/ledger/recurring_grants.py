"""Recurring grants: an allotment of credits every period, what a period leaves unused rolled
over into the next one up to a percentage and a cap.

Each period's credits are a balance of their own, effective from the period's first day and
expiring when it ends (midnight UTC), with the grant's products and priority. The workers
(every pass, and the create call for the period under way) grant each period once: the
period's balance id is reserved in `recurring_grant_periods` (whoever asks first), and the
grant is the ledger operation `g:<balance>`, so several processes grant it once. A period that
was entirely over before it could be granted (created with a past start, or the workers down
for all of it) is skipped, not granted late.

When a period ends, its balance expires (`x:<balance>`, as any expiry; the pass does it itself
rather than wait for the expiry worker) and `min(expired * rollover_percent / 100, rollover_max)`,
rounded down at the credit type's places, is added to the next period's balance as a
`rollover` entry keyed `o:<expired balance>` (event `credits.rolled_over`). So rolled-over
credits expire with the next period's and may roll again, within the same terms. Nothing rolls
over after the last period, or into a next period that was never granted.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import TYPE_CHECKING

import asyncpg

from app.config.catalog import CreditTypeRef
from app.config.repository import existing_products
from app.db import Connection
from app.errors import (
    STORE_ERRORS,
    Conflict,
    NotFound,
    Unavailable,
    ValidationProblem,
    one_by_one,
)
from app.ledger import repository as repo
from app.ledger.schemas import (
    Allotment,
    RecurringGrantIn,
    RecurringGrantOut,
    RecurringGrantPeriodOut,
)
from app.ledger.service import (
    account_ref,
    expire_balance,
    grant_reserved,
    resolve_credit_type,
    roll_over,
    scaled,
)
from app.money import fmt
from app.rating.periods import covered, period_of

if TYPE_CHECKING:
    from app.context import AppContext

log = logging.getLogger(__name__)
_NOT_NOW: tuple[type[BaseException], ...] = (*STORE_ERRORS, Unavailable)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), UTC)


async def check_allotment(ctx: AppContext, body: Allotment, credit_type: CreditTypeRef,
                          at: str = "") -> None:
    """The amounts fit the credit type's places and the products exist (fields named `at` +
    the field: `credits.0.amount` for a plan's)."""
    scaled(body.amount, credit_type, f"{at}amount")
    if body.rollover_max is not None:
        scaled(body.rollover_max, credit_type, f"{at}rollover_max")
    if body.products:
        unknown = sorted(set(body.products) - await existing_products(ctx.pool, body.products))
        if unknown:
            raise ValidationProblem(f"unknown products: {', '.join(unknown)}",
                                    field=f"{at}products")


def product_set(codes: list[str] | None) -> list[str] | None:
    """A product scope as stored: sorted, once each; None for every product."""
    return sorted(set(codes)) if codes else None


async def create(ctx: AppContext, code: str, body: RecurringGrantIn) -> RecurringGrantOut:
    account = await account_ref(ctx, code)
    credit_type = await resolve_credit_type(ctx, account, body.credit_type)
    await check_allotment(ctx, body, credit_type)
    start = body.start or datetime.now(UTC).date()
    if body.end is not None and body.end <= start:
        raise ValidationProblem("must be after start", field="end")
    grant_id = await repo.insert_recurring_grant(ctx.pool, {
        "account_id": account.id, "credit_type_id": credit_type.id, "amount": body.amount,
        "frequency": body.frequency, "interval": body.interval, "start": start, "end": body.end,
        "products": product_set(body.products),
        "priority": body.priority, "description": body.description,
        "rollover_percent": body.rollover_percent, "rollover_max": body.rollover_max})
    await grant_first(ctx, [grant_id])
    return await read(ctx, grant_id)


async def grant_first(ctx: AppContext, grant_ids: list[int]) -> None:
    """Grant the period under way of new recurring grants, at once (their creation answers
    without it if the stores fail now: the grants are committed, and a retry must not make
    second ones; the workers' next pass grants the period)."""
    for grant_id in grant_ids:
        try:
            await grant_period(ctx, grant_id, datetime.now(UTC).date())
        except _NOT_NOW as exc:
            log.warning("recurring grant %s: first period left to the workers: %r", grant_id,
                        exc)


async def insert_for_plan(conn: Connection, account_id: int, account_plan_id: int,
                          plan: asyncpg.Record, start: date, end: date | None,
                          anchor: date) -> list[int]:
    """The recurring grants of a plan's included credits for an account plan just attached
    (in its transaction): the plan's frequency, counted from its billing anchor."""
    return [await repo.insert_recurring_grant(conn, {
        "account_id": account_id, "credit_type_id": credit["credit_type_id"],
        "amount": Decimal(credit["amount"]), "frequency": plan["bill_frequency"],
        "interval": plan["bill_interval"], "start": start, "end": end,
        "products": credit["products"], "priority": credit["priority"],
        "description": credit["description"],
        "rollover_percent": Decimal(credit["rollover_percent"]),
        "rollover_max": None if credit["rollover_max"] is None
        else Decimal(credit["rollover_max"]),
        "account_plan_id": account_plan_id, "plan_credit_id": credit["id"], "anchor": anchor})
        for credit in json.loads(plan["credits"])]


async def grant_period(ctx: AppContext, grant_id: int, day: date) -> int:
    """Grant the period of a recurring grant that holds `day` (once); 1 if it had one."""
    row = await repo.recurring_grant(ctx.pool, grant_id)
    if row is None:
        raise NotFound(f"no recurring grant {grant_id}", field="id")
    return await _grant_period(ctx, row, day)


async def read(ctx: AppContext, grant_id: int) -> RecurringGrantOut:
    row = await repo.recurring_grant(ctx.pool, grant_id)
    if row is None:
        raise NotFound(f"no recurring grant {grant_id}", field="id")
    out = grant_out(row)
    out.periods = [RecurringGrantPeriodOut(period_start=p["period_start"],
                                           period_end=p["period_end"],
                                           balance_id=p["balance_id"], rolled_over=p["rolled"])
                   for p in await repo.periods_of(ctx.pool, grant_id)]
    return out


def grant_out(row: asyncpg.Record) -> RecurringGrantOut:
    dp = row["decimal_places"]
    return RecurringGrantOut(
        id=row["id"], account=row["account"], credit_type=row["credit_type"],
        amount=fmt(Decimal(row["amount"]), dp), frequency=row["frequency"],
        interval=row["interval_count"], start=row["start_date"], end=row["end_date"],
        products=row["product_codes"], priority=row["priority"],
        description=row["description"], rollover_percent=f"{Decimal(row['rollover_percent']):f}",
        rollover_max=None if row["rollover_max"] is None
        else fmt(Decimal(row["rollover_max"]), dp), account_plan=row["account_plan_id"],
        next_start=row["next_start"], created_at=row["created_at"])


async def end(ctx: AppContext, grant_id: int, day: date | None) -> RecurringGrantOut:
    row = await repo.recurring_grant(ctx.pool, grant_id)
    if row is None:
        raise NotFound(f"no recurring grant {grant_id}", field="id")
    if row["account_plan_id"] is not None:
        raise Conflict(f"these are account plan {row['account_plan_id']}'s included credits: "
                       "they end with it (POST /v1/accounts/{code}/plans/{id}/end)", field="id")
    day = day or datetime.now(UTC).date() + timedelta(days=1)
    if day <= row["start_date"]:
        raise ValidationProblem(f"must be after the grant's start {row['start_date']}",
                                field="end")
    await repo.end_recurring_grant(ctx.pool, grant_id, day)
    return await read(ctx, grant_id)


async def grant_due(ctx: AppContext, now: datetime | None = None, limit: int = 500) -> int:
    """Worker: grant every period under way that is not granted yet, then settle the periods
    that ended (expiry and rollover). Returns how many periods it granted or settled."""
    now = now or datetime.now(UTC)
    today = now.date()
    done = await one_by_one(await repo.due_recurring_grants(ctx.pool, today, limit),
                            lambda row: _grant_period(ctx, row, today), "recurring grant")
    return done + await one_by_one(await repo.unrolled_periods(ctx.pool, today, limit),
                                   lambda period: _settle(ctx, period, today),
                                   "recurring grant period")


def _anchor(row: asyncpg.Record) -> date:
    anchor: date = row["anchor_date"] or row["start_date"]
    return anchor


async def _grant_period(ctx: AppContext, row: asyncpg.Record, today: date) -> int:
    """Grant the period holding `today` (earlier ones are over: skipped); 1 if it is due.
    A plan's included credits are granted for the days of the period the account plan
    covers, prorated by day (rounded down), and expire when the cover ends."""
    if today < row["start_date"]:
        return 0
    start, end = period_of(_anchor(row), row["frequency"], row["interval_count"], today)
    if row["end_date"] is not None and start >= row["end_date"]:
        await repo.advance_recurring_grant(ctx.pool, row["id"], row["end_date"])
        return 0
    credit_type = await ctx.catalog.credit_type_by_id(row["credit_type_id"])
    amount, since, until = Decimal(row["amount"]), start, end
    if row["account_plan_id"] is not None:
        since, until = covered((start, end), row["start_date"], row["end_date"])
        amount = (amount * (until - since).days / (end - start).days).quantize(
            Decimal(1).scaleb(-credit_type.decimal_places), ROUND_DOWN)
        if amount <= 0:  # (a day of a long period, for a small allotment)
            await repo.advance_recurring_grant(ctx.pool, row["id"], end)
            return 0
    account = await account_ref(ctx, row["account"])
    balance_id = await repo.reserve_period(ctx.pool, row["id"], since, until)
    await grant_reserved(
        ctx, account, credit_type, balance_id, scaled(amount, credit_type),
        products=row["product_codes"], priority=row["priority"],
        description=row["description"] or f"recurring grant {row['id']}: {since} to {until}",
        source="recurring", effective=_midnight(since), expires=_midnight(until))
    await repo.advance_recurring_grant(ctx.pool, row["id"], end)
    return 1


async def _settle(ctx: AppContext, period: asyncpg.Record, today: date) -> int:
    """A period that ended: expire its balance and roll over into the next period's."""
    grant_id, expired_id = period["id"], period["balance_id"]
    next_id = period["next_balance_id"]
    if next_id is None:
        next_start = period["period_end"]
        _, next_end = period_of(_anchor(period), period["frequency"],
                                period["interval_count"], next_start)
        ended = period["end_date"] is not None and next_start >= period["end_date"]
        if not ended and next_end > today:
            return 0  # the next period is under way and not granted yet: the next pass
    await expire_balance(ctx, expired_id)
    expired = await repo.op_amount(ctx.pool, f"x:{expired_id}")
    if expired is None and await _still_live(ctx, expired_id):
        return 0  # another process's expiry is not committed yet: the next pass
    account = await account_ref(ctx, period["account"])
    credit_type = await ctx.catalog.credit_type_by_id(period["credit_type_id"])
    places = Decimal(1).scaleb(-credit_type.decimal_places)
    unused = -(expired or Decimal(0))
    rolled = (unused * Decimal(period["rollover_percent"]) / 100).quantize(places, ROUND_DOWN)
    if period["rollover_max"] is not None:
        rolled = min(rolled, Decimal(period["rollover_max"]))
    if next_id is not None and rolled > 0:
        await roll_over(ctx, account, credit_type, next_id, scaled(rolled, credit_type),
                        expired_id)
    await repo.mark_rolled(ctx.pool, grant_id, period["period_start"])
    return 1


async def _still_live(ctx: AppContext, balance_id: int) -> bool:
    row = await repo.balance(ctx.pool, balance_id)
    return row is not None and row["status"] == "active"
