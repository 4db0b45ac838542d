"""Bill-to-date: each pricing's quantity, bands applied and amount for a period, exactly."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

import asyncpg

from app.db import Conn
from app.errors import NotFound
from app.money import fmt
from app.rating import charges
from app.rating import repository as repo
from app.rating.drawdown import _state
from app.rating.periods import counted, covered, period_of
from app.rating.pricing import (
    Band,
    aggregate,
    charge,
    counter_charge,
    counter_levels,
    prorate,
    quantity,
)
from app.rating.schemas import AccountUsageOut, BandApplied, PlanUsage, PricingUsage

if TYPE_CHECKING:
    from app.context import AppContext


def bands_applied(kind: str, bands: list[Band], units: Decimal) -> list[BandApplied]:
    applied, lower = [], Decimal(0)
    for band in bands:
        upper = units if band.up_to is None else min(units, band.up_to)
        reached = units > lower and (band.up_to is None or units <= band.up_to)
        if kind == "tiered" and upper > lower:
            applied.append(BandApplied(up_to=_s(band.up_to), price=f"{band.price:f}",
                                       units=f"{upper - lower:f}",
                                       amount=f"{(upper - lower) * band.price:f}"))
        elif kind != "tiered" and reached:
            amount = band.price if kind == "stair_step" else units * band.price
            applied.append(BandApplied(up_to=_s(band.up_to), price=f"{band.price:f}",
                                       units=f"{units:f}", amount=f"{amount:f}"))
        if band.up_to is None or units <= band.up_to:
            break
        lower = band.up_to
    return applied


def _s(value: Decimal | None) -> str | None:
    return None if value is None else f"{value:f}"


def _bands(pricing: asyncpg.Record) -> list[Band]:
    return [Band(None if b["up_to"] is None else Decimal(b["up_to"]), Decimal(b["price"]))
            for b in json.loads(pricing["bands"])]


async def pricing_usage(conn: Conn, account_id: int, pricing: asyncpg.Record,
                        start: date, end: date, since: date, until: date) -> list[PricingUsage]:
    """A pricing's lines for the period [start, end): one per segment (one for a counter, of
    the levels of the days it counts within the plan's cover [since, until):
    `periods.counted`)."""
    bands, fee = _bands(pricing), Decimal(pricing["fixed_fee"])
    kind = pricing["pricing_type"]
    if pricing["counter_id"] is not None:
        levels = await repo.counter_levels(conn, account_id, pricing["counter_id"])
        spans = counter_levels(levels, *counted(since, until, pricing["start_date"],
                                                pricing["end_date"]))
        amount = counter_charge(kind, bands, fee, spans, (end - start).days,
                                pricing["counter_mode"])
        peak = max((lvl for lvl, _ in spans), default=Decimal(0))
        return [PricingUsage(pricing=pricing["id"], aggregation=None, counter=pricing["counter"],
                             segment=None, quantity=f"{peak:f}", bands=[],
                             fixed_fee=f"{fee:f}", amount=f"{amount:f}")]
    out = []
    for row in await repo.states_of(conn, account_id, pricing["id"], start):
        state = _state(row)
        units = quantity(aggregate(pricing["function"], state),
                         Decimal(pricing["quantity_per_unit"]), pricing["rounding"])
        amount = charge(kind, bands, fee, units, state.count > 0)
        out.append(PricingUsage(
            pricing=pricing["id"], aggregation=pricing["aggregation"], counter=None,
            segment=row["segment"] if pricing["segment_field"] else None, quantity=f"{units:f}",
            bands=bands_applied(kind, bands, units) if units > 0 else [],
            fixed_fee=f"{fee if state.count else 0:f}", amount=f"{amount:f}"))
    return out


async def bill_to_date(ctx: AppContext, code: str, at: date | None) -> AccountUsageOut:
    account = await ctx.catalog.account(code)
    if account is None:
        raise NotFound(f"no account {code!r}", field="code")
    day = at or datetime.now(UTC).date()
    plans = []
    for plan in await repo.plans_at(ctx.pool, account.id, day):
        period = start, end = period_of(plan["anchor"], plan["bill_frequency"],
                                        plan["bill_interval"], day)
        since, until = covered(period, plan["plan_start"], plan["plan_end"])
        usages: list[PricingUsage] = []
        for pricing in await repo.pricings_in(ctx.pool, plan["id"], start, end):
            usages += await pricing_usage(ctx.pool, account.id, pricing, start, end, since, until)
        standing = prorate(Decimal(plan["standing_charge"]), period, since, until)
        total = standing + sum((Decimal(u.amount) for u in usages), Decimal(0))
        places = account.credit_type.decimal_places if account.credit_type else 0
        read = await repo.period_drawn(ctx.pool, account.id, start, end, plan["id"],
                                       plan["account_plan_id"])
        period_charges, charges_total = charges.lines(json.loads(read["charge_lines"]),
                                                      plan["currency_places"])
        plans.append(PlanUsage(
            plan=plan["code"], currency=plan["currency"], period_start=start, period_end=end,
            covered_from=since, covered_until=until, standing_charge=f"{standing:f}",
            minimum_spend=f"{prorate(Decimal(plan['minimum_spend']), period, since, until):f}",
            pricings=usages, total=f"{total:f}", charges=period_charges,
            charges_total=fmt(charges_total, plan["currency_places"]),
            drawn=fmt(Decimal(read["drawn"]).scaleb(-places), places),
            standing_charge_drawn=fmt(Decimal(read["standing"]).scaleb(-places), places),
            covered=fmt(Decimal(read["covered"]), places),
            overage=fmt(Decimal(read["overage"]), places),
            credit_type=account.credit_type.code if account.credit_type else ""))
    return AccountUsageOut(account=code, plans=plans)
