"""Rules of the rating configuration: meters, aggregations, counters, plans and pricings."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg
from pydantic import BaseModel

from app.db import Connection
from app.errors import Conflict, NotFound, ValidationProblem
from app.ledger import recurring_grants
from app.ledger import repository as lrepo
from app.ledger.service import account_ref
from app.rating import recurring
from app.rating import recurring_repository as rrepo
from app.rating import repository as repo
from app.rating.expressions import ExpressionError, fields, parse
from app.rating.periods import billing_anchor, period_of
from app.rating.pricing import Band, check_bands
from app.rating.schemas import (
    AccountPlanAttached,
    AccountPlanIn,
    AccountPlanOut,
    AggregationIn,
    AggregationOut,
    BandIn,
    ConversionRateIn,
    ConversionRateOut,
    CounterAdjustmentIn,
    CounterAdjustmentOut,
    CounterIn,
    CounterOut,
    MeterIn,
    MeterOut,
    PlanIn,
    PlanOut,
    PlanTemplateIn,
    PlanTemplateOut,
    PricingIn,
    PricingOut,
)
from app.settings import CLOCK_SLACK

if TYPE_CHECKING:
    from app.context import AppContext
    from app.settings import Settings

NUMERIC = ("measure",)


async def _unique(write: Awaitable[Any], what: str) -> Any:
    try:
        return await write
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"a {what} with this code exists", field="code") from exc


async def required_id(ctx: AppContext, table: str, code: str, field: str) -> int:
    found = await repo.id_of(ctx.pool, table, code)
    if found is None:
        raise ValidationProblem(f"unknown {table.rstrip('s').replace('_', ' ')} {code!r}",
                                field=field)
    return found


async def optional_product(ctx: AppContext, code: str | None) -> int | None:
    return None if code is None else await required_id(ctx, "products", code, "product")


def text(value: Any) -> str:
    return f"{Decimal(value):f}"


# --- meters --------------------------------------------------------------------------------

def check_meter_fields(body: MeterIn) -> None:
    seen: set[str] = set()
    numeric: set[str] = set()
    for i, data_field in enumerate(body.data_fields):
        if data_field.code in seen:
            raise ValidationProblem("field codes must be unique", field=f"data_fields.{i}.code")
        seen.add(data_field.code)
        if data_field.category in NUMERIC:
            numeric.add(data_field.code)
    for i, derived in enumerate(body.derived_fields):
        where = f"derived_fields.{i}"
        if derived.code in seen:
            raise ValidationProblem("field codes must be unique", field=f"{where}.code")
        try:
            names = fields(parse(derived.expression))
        except ExpressionError as exc:
            raise ValidationProblem(f"expression {exc}", field=f"{where}.expression") from exc
        unknown = names - numeric
        if unknown:
            raise ValidationProblem(
                f"{sorted(unknown)[0]!r} is not a measure or an earlier derived field",
                field=f"{where}.expression")
        seen.add(derived.code)
        numeric.add(derived.code)


def meter_out(row: asyncpg.Record) -> BaseModel:
    return MeterOut(code=row["code"], name=row["name"], product=row["product"],
                    data_fields=json.loads(row["data_fields"]),
                    derived_fields=json.loads(row["derived_fields"]), created_at=row["created_at"])


async def create_meter(ctx: AppContext, body: MeterIn) -> BaseModel:
    check_meter_fields(body)
    product_id = await optional_product(ctx, body.product)
    await _unique(repo.insert_meter(
        ctx.pool, body.code, body.name, product_id,
        [f.model_dump() for f in body.data_fields], [f.model_dump() for f in body.derived_fields]),
        "meter")
    return await read(ctx, "meters", body.code)


# --- aggregations and counters -------------------------------------------------------------

def meter_field_kinds(meter: asyncpg.Record) -> dict[str, str]:
    kinds = {f["code"]: f["category"] for f in json.loads(meter["data_fields"])}
    kinds.update({f["code"]: "derived" for f in json.loads(meter["derived_fields"])})
    return kinds


async def create_aggregation(ctx: AppContext, body: AggregationIn) -> BaseModel:
    meter = await repo.by_code(ctx.pool, "meters", body.meter)
    if meter is None:
        raise ValidationProblem(f"unknown meter {body.meter!r}", field="meter")
    kinds = meter_field_kinds(meter)
    kind = kinds.get(body.target_field)
    if kind is None:
        raise ValidationProblem(f"meter {body.meter!r} has no field {body.target_field!r}",
                                field="target_field")
    if kind not in ("measure", "derived") and body.function not in ("COUNT", "UNIQUE"):
        raise ValidationProblem(f"{body.function} needs a numeric field (a measure or a "
                                "derived field)", field="target_field")
    if body.segment_field is not None and kinds.get(body.segment_field) not in ("who", "what", "where"):
        raise ValidationProblem("must be a dimension field (who, what or where) of the meter",
                                field="segment_field")
    values = {**body.model_dump(), "meter_id": meter["id"]}
    await _unique(repo.insert_aggregation(ctx.pool, values), "aggregation")
    return await read(ctx, "aggregations", body.code)


async def create_counter(ctx: AppContext, body: CounterIn) -> BaseModel:
    product_id = await optional_product(ctx, body.product)
    await _unique(repo.insert_counter(ctx.pool, body.code, body.name, body.unit, product_id),
                  "counter")
    return await read(ctx, "counters", body.code)


# --- plans -----------------------------------------------------------------------------------

async def create_template(ctx: AppContext, body: PlanTemplateIn) -> BaseModel:
    values = {**body.model_dump(),
              "product_id": await required_id(ctx, "products", body.product, "product"),
              "currency_id": await required_id(ctx, "credit_types", body.currency, "currency")}
    await _unique(repo.insert_template(ctx.pool, values), "plan template")
    return await read(ctx, "plan_templates", body.code)


async def create_plan(ctx: AppContext, body: PlanIn) -> BaseModel:
    template_id = await required_id(ctx, "plan_templates", body.template, "template")
    credits = []
    for i, allotment in enumerate(body.credits):
        credit_type = await ctx.catalog.credit_type(allotment.credit_type)
        if credit_type is None:
            raise ValidationProblem(f"unknown credit type {allotment.credit_type!r}",
                                    field=f"credits.{i}.credit_type")
        await recurring_grants.check_allotment(ctx, allotment, credit_type, f"credits.{i}.")
        credits.append((credit_type.id, allotment.amount,
                        recurring_grants.product_set(allotment.products),
                        allotment.priority, allotment.description, allotment.rollover_percent,
                        allotment.rollover_max))
    async with ctx.pool.acquire() as conn, conn.transaction():
        plan_id = await _unique(repo.insert_plan(conn, body.code, body.name, template_id,
                                                 body.standing_charge, body.minimum_spend),
                                "plan")
        await repo.insert_plan_credits(conn, plan_id, credits)
    return await read(ctx, "plans", body.code)


def bands_of(raw: list[BandIn]) -> list[Band]:
    return [Band(b.up_to, b.price) for b in raw]


def check_pricing(body: PricingIn) -> None:
    if (body.aggregation is None) == (body.counter is None):
        raise ValidationProblem("name exactly one of aggregation or counter", field="aggregation")
    if body.end_date is not None and body.end_date <= body.start_date:
        raise ValidationProblem("must be after start_date", field="end_date")
    problem = check_bands(bands_of(body.bands))
    if problem:
        raise ValidationProblem(problem, field="bands")
    if body.type == "per_unit" and len(body.bands) != 1:
        raise ValidationProblem("per_unit takes exactly one (open-ended) band", field="bands")


async def create_pricing(ctx: AppContext, body: PricingIn) -> PricingOut:
    check_pricing(body)
    plan_id = await required_id(ctx, "plans", body.plan, "plan")
    aggregation_id = None if body.aggregation is None else \
        await required_id(ctx, "aggregations", body.aggregation, "aggregation")
    counter_id = None if body.counter is None else \
        await required_id(ctx, "counters", body.counter, "counter")
    async with ctx.pool.acquire() as conn, conn.transaction():
        await repo.lock_plan(conn, plan_id)  # serialises the overlap check per plan
        if await repo.overlapping_pricing(conn, plan_id, aggregation_id, counter_id,
                                          body.start_date, body.end_date):
            raise Conflict("this plan already prices this aggregation or counter for an "
                           "overlapping date range", field="start_date")
        pricing_id = await repo.insert_pricing(conn, {
            "plan_id": plan_id, "aggregation_id": aggregation_id, "counter_id": counter_id,
            "start_date": body.start_date, "end_date": body.end_date, "pricing_type": body.type,
            "bands": json.dumps([{"up_to": None if b.up_to is None else f"{b.up_to:f}",
                                  "price": f"{b.price:f}"} for b in body.bands]),
            "fixed_fee": body.fixed_fee, "counter_mode": body.counter_mode})
        if aggregation_id is not None:  # it may cover measurements stored unrated
            await repo.request_rerate(conn, await repo.accounts_on_plan(conn, plan_id),
                                      "pricings", pricing_id)
    row = await repo.pricing(ctx.pool, pricing_id)
    assert row is not None
    return pricing_out(row)


def pricing_out(row: asyncpg.Record | Mapping[str, Any]) -> PricingOut:
    return PricingOut(id=row["id"], plan=row["plan"], aggregation=row["aggregation"],
                      counter=row["counter"], start_date=row["start_date"],
                      end_date=row["end_date"], type=row["pricing_type"],
                      bands=json.loads(row["bands"]), fixed_fee=text(row["fixed_fee"]),
                      counter_mode=row["counter_mode"], created_at=row["created_at"])


async def attach_plan(ctx: AppContext, code: str, body: AccountPlanIn) -> AccountPlanAttached:
    """Attach a plan; its started periods' standing charge and counter charges are drawn."""
    account = await account_ref(ctx, code, field="code")
    account_id = account.id
    plan = await repo.by_code(ctx.pool, "plans", body.plan)
    if plan is None:
        raise ValidationProblem(f"unknown plan {body.plan!r}", field="plan")
    if body.end_date is not None and body.end_date <= body.start_date:
        raise ValidationProblem("must be after start_date", field="end_date")
    async with ctx.pool.acquire() as conn, conn.transaction():
        await repo.lock_account(conn, account_id)
        if await repo.overlapping_account_plan(conn, account_id, plan["product"],
                                               body.start_date, body.end_date):
            raise Conflict("the account already has a plan for this product in an overlapping "
                           "date range", field="start_date")
        anchor = billing_anchor(body.billing, plan["bill_frequency"], body.start_date)
        shared = await _shared_period(conn, account_id, plan["id"], body.start_date,
                                      body.end_date, anchor)
        if shared is not None:
            raise Conflict(f"the account's other attachment of this plan has the billing period "
                           f"starting {shared} too: attach it from the next period's first day, "
                           "or bill it by anniversary", field="start_date")
        ap_id = await repo.insert_account_plan(conn, account_id, plan["id"], body.start_date,
                                               body.end_date, anchor)
        await repo.request_rerate(conn, [account_id], "account_plans", ap_id)
        draws = await recurring.on_attach(conn, account, ap_id)
        grants = await recurring_grants.insert_for_plan(conn, account_id, ap_id, plan,
                                                        body.start_date, body.end_date, anchor)
    await recurring_grants.grant_first(ctx, grants)
    await recurring.send(ctx, draws)
    rows = await repo.account_plans(ctx.pool, account_id)
    return next(AccountPlanAttached.model_validate({**dict(r), "debits": [d.debit() for d in draws]})
                for r in rows if r["id"] == ap_id)


def _edge_periods(anchor: date, frequency: str, interval: int, start: date,
                  end: date | None) -> set[date]:
    """The starts of an attachment's first and last billing periods."""
    starts = {period_of(anchor, frequency, interval, start)[0]}
    if end is not None and end > start:
        starts.add(period_of(anchor, frequency, interval, end - timedelta(days=1))[0])
    return starts


async def _shared_period(conn: Connection, account_id: int, plan_id: int, start: date,
                         end: date | None, anchor: date, other_than: int = 0) -> date | None:
    """A billing period an attachment [start, end) of a plan would share with another
    attachment of the same plan to the account: one ended within a period and the plan
    attached again within it, with both periods counted from the same day (calendar billing,
    as a rule). Their usage would rate into one aggregation state and running charge (keyed
    by pricing and period start), and each of their bills would show all of it, so this is
    refused. (They never overlap in days, so only an edge period can be shared.)"""
    for other in await repo.plan_attachments(conn, account_id, plan_id):
        if other["id"] == other_than:
            continue
        frequency, interval = other["bill_frequency"], other["bill_interval"]
        shared = _edge_periods(anchor, frequency, interval, start, end) & _edge_periods(
            other["billing_anchor"], frequency, interval, other["start_date"], other["end_date"])
        if shared:
            return min(shared)
    return None


def earliest_end(settings: Settings, now: datetime | None = None) -> date:
    """The first day an account plan or a pricing may end on: the day after the latest one a
    measurement may be dated on now. So no measurement rated under it falls outside it, none
    stored unrated (or rated by another) falls inside one extended, and nothing has to be
    re-rated. CLOCK_SLACK beyond the timestamps a measurement may carry
    (`usage_future_skew_s` past now), for the clocks of the other app hosts."""
    latest = (now or datetime.now(UTC)) + timedelta(seconds=settings.usage_future_skew_s)
    return (latest + CLOCK_SLACK).date() + timedelta(days=1)


async def end_account_plan(ctx: AppContext, code: str, account_plan_id: int,
                           end: date | None) -> AccountPlanOut:
    """Set the day an account plan ends (exclusive): a plan change ends one plan where the
    next begins, a cancellation ends it tomorrow, and a plan that has not started may end on
    its start date (it never applies). The period holding the end is charged for the days
    before it (standing charge, minimum spend, prorated counters: `periods.covered`);
    the current period is settled again at once: more drawn when the end moved later, the
    difference given back when it moved earlier."""
    account = await account_ref(ctx, code, field="code")
    earliest = earliest_end(ctx.settings)
    day = earliest if end is None else end
    async with ctx.pool.acquire() as conn, conn.transaction():
        await repo.lock_account(conn, account.id)  # (as attaching a plan: one at a time)
        row = await repo.account_plan_of(conn, account.id, account_plan_id)
        if row is None:
            raise NotFound(f"account {code!r} has no plan {account_plan_id}", field="id")
        _check_end("plan", row, day, earliest)
        if await repo.overlapping_account_plan(conn, account.id, row["product"], row["start_date"],
                                               day, other_than=row["id"]):
            raise Conflict("the account has another plan for this product in the longer date "
                           "range", field="end_date")
        if day > row["start_date"] and await _shared_period(
                conn, account.id, row["plan_id"], row["start_date"], day, row["billing_anchor"],
                other_than=row["id"]) is not None:
            raise Conflict("the longer date range would end within a billing period the "
                           "account's next attachment of this plan starts in", field="end_date")
        await repo.set_account_plan_end(conn, row["id"], day)
        await lrepo.end_plan_grants(conn, row["id"], day)
        settlement = await recurring.on_end(conn, account, row["id"])
    await recurring.after_end(ctx, settlement)
    return AccountPlanOut.model_validate({**dict(row), "end_date": day})


async def end_pricing(ctx: AppContext, pricing_id: int, end: date | None) -> PricingOut:
    """Set the day a pricing ends (exclusive), as an account plan's: a price change ends one
    pricing where the next begins (each rates its own days: a change within a billing period
    prices that period's usage in two parts, so a change is best made on a period's start)."""
    earliest = earliest_end(ctx.settings)
    day = earliest if end is None else end
    found = await repo.pricing(ctx.pool, pricing_id)
    if found is None:
        raise NotFound(f"no pricing {pricing_id}", field="id")
    async with ctx.pool.acquire() as conn, conn.transaction():
        await repo.lock_plan(conn, found["plan_id"])  # (as creating a pricing: one at a time)
        row = await repo.pricing(conn, pricing_id)  # (as it is now, under the lock)
        assert row is not None  # (nothing is deleted)
        _check_end("pricing", row, day, earliest)
        if await repo.overlapping_pricing(conn, row["plan_id"], row["aggregation_id"],
                                          row["counter_id"], row["start_date"], day,
                                          other_than=row["id"]):
            raise Conflict("the plan has another pricing of this aggregation or counter in the "
                           "longer date range", field="end_date")
        await repo.set_pricing_end(conn, row["id"], day)
    return pricing_out({**dict(row), "end_date": day})


def _check_end(what: str, row: asyncpg.Record, day: date, earliest: date) -> None:
    """The rules of a new end for an account plan or a pricing (see earliest_end)."""
    if row["end_date"] is not None and row["end_date"] < earliest:
        raise Conflict(f"the {what} ends on {row['end_date']}: measurements past that day may "
                       "be stored already, so its end cannot move", field="end_date")
    if day < earliest:
        raise ValidationProblem(f"must be {earliest} or later: measurements up to that day "
                                f"may be rated under the {what} already", field="end_date")
    if day < row["start_date"]:
        raise ValidationProblem(f"must not be before the {what}'s start {row['start_date']} "
                                f"(on it, the {what} never applies)", field="end_date")


async def set_rate(ctx: AppContext, code: str, body: ConversionRateIn) -> ConversionRateOut:
    credit_type = await ctx.catalog.credit_type(code)
    if credit_type is None:
        raise NotFound(f"no credit type {code!r}", field="code")
    fiat = await ctx.catalog.credit_type(body.fiat)
    if fiat is None or fiat.kind != "fiat" or fiat.id == credit_type.id:
        raise ValidationProblem("must be another credit type, of kind fiat", field="fiat")
    await repo.upsert_rate(ctx.pool, credit_type.id, fiat.id, body.effective, body.rate)
    return ConversionRateOut(credit_type=code, fiat=body.fiat, effective=body.effective,
                             rate=f"{body.rate:f}")


async def adjust_counter(ctx: AppContext, code: str,
                         body: CounterAdjustmentIn) -> CounterAdjustmentOut:
    """Set a level from a date; the started periods it changes are drawn at once."""
    account = await account_ref(ctx, code, field="code")
    counter_id = await required_id(ctx, "counters", body.counter, "counter")
    async with ctx.pool.acquire() as conn, conn.transaction():
        await rrepo.lock_account(conn, account.id)
        await repo.upsert_counter_level(conn, account.id, counter_id, body.effective, body.level)
        draws = await recurring.on_adjust(conn, account, counter_id, body.effective)
    await recurring.send(ctx, draws)
    return CounterAdjustmentOut(account=code, counter=body.counter, effective=body.effective,
                                level=f"{body.level:f}", debits=[d.debit() for d in draws])


# --- reads -----------------------------------------------------------------------------------

def _amounts(row: asyncpg.Record, *names: str) -> dict[str, Any]:
    return {**dict(row), **{name: text(row[name]) for name in names}}


def aggregation_out(row: asyncpg.Record) -> BaseModel:
    return AggregationOut.model_validate(_amounts(row, "quantity_per_unit"))


def counter_out(row: asyncpg.Record) -> BaseModel:
    return CounterOut.model_validate(dict(row))


def template_out(row: asyncpg.Record) -> BaseModel:
    return PlanTemplateOut.model_validate(_amounts(row, "standing_charge", "minimum_spend"))


def plan_out(row: asyncpg.Record) -> BaseModel:
    return PlanOut.model_validate({**_amounts(row, "standing_charge", "minimum_spend"),
                                   "credits": json.loads(row["credits"])})


OUT: dict[str, Callable[[asyncpg.Record], BaseModel]] = {
    "meters": meter_out, "aggregations": aggregation_out, "counters": counter_out,
    "plan_templates": template_out, "plans": plan_out}


async def read(ctx: AppContext, table: str, code: str) -> BaseModel:
    row = await repo.by_code(ctx.pool, table, code)
    if row is None:
        raise NotFound(f"no {table.rstrip('s').replace('_', ' ')} {code!r}", field="code")
    return OUT[table](row)
