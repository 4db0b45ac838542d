"""Routes of the rating API: configuration (admin), measurements and bill-to-date."""

from __future__ import annotations

import json

import asyncpg
from pydantic import BaseModel

from app.errors import NotFound, ValidationProblem
from app.http import ADMIN, CUSTOMER_READ, READ, RUNTIME, Call, Endpoint, batch_of
from app.ledger.service import account_ref
from app.rating import billing, bills, charges, drawdown, recurring, service
from app.rating import repository as repo
from app.rating.schemas import (
    MAX_MEASUREMENTS,
    AccountPlanAttached,
    AccountPlanIn,
    AccountPlanList,
    AccountPlanOut,
    AccountUsageOut,
    AggregationIn,
    AggregationOut,
    AggregationPage,
    BillOut,
    BillPage,
    BillQuery,
    BillRunIn,
    BillRunOut,
    ChargeIn,
    ChargeOut,
    ChargePage,
    ConversionRateIn,
    ConversionRateOut,
    CounterAdjustmentIn,
    CounterAdjustmentOut,
    CounterIn,
    CounterOut,
    CounterPage,
    EndIn,
    MeasurementBatch,
    MeasurementBatchOut,
    MeasurementOut,
    MeasurementPage,
    MeasurementResult,
    MeasurementsQuery,
    MeterIn,
    MeterOut,
    MeterPage,
    PlanIn,
    PlanOut,
    PlanPage,
    PlanTemplateIn,
    PlanTemplateOut,
    PlanTemplatePage,
    PricingIn,
    PricingOut,
    PricingPage,
    PricingQuery,
    UsageQuery,
)
from app.schemas import ListQuery, decode_cursor, decode_time_cursor, next_cursor, next_time_cursor

PAGES: dict[str, type[BaseModel]] = {
    "meters": MeterPage, "aggregations": AggregationPage, "counters": CounterPage,
    "plan_templates": PlanTemplatePage, "plans": PlanPage}


def _create(create: object) -> object:
    async def handler(call: Call) -> BaseModel:
        return await create(call.ctx, call.body)  # type: ignore[operator, no-any-return]
    handler.__name__ = create.__name__  # type: ignore[attr-defined]
    return handler


def _read(table: str) -> object:
    async def handler(call: Call) -> BaseModel:
        return await service.read(call.ctx, table, call.path("code"))
    handler.__name__ = f"get_{table}"
    return handler


def _list(table: str) -> object:
    async def handler(call: Call) -> BaseModel:
        rows = await repo.page(call.ctx.pool, table, call.query.after_id(), call.query.limit)
        return PAGES[table](data=[service.OUT[table](r) for r in rows],
                            next_cursor=next_cursor([r["id"] for r in rows], call.query.limit))
    handler.__name__ = f"list_{table}"
    return handler


async def list_pricings(call: Call) -> BaseModel:
    plan_id = await repo.id_of(call.ctx.pool, "plans", call.query.plan)
    if plan_id is None:
        raise NotFound(f"no plan {call.query.plan!r}", field="query.plan")
    rows = await repo.pricings_of_plan(call.ctx.pool, plan_id, decode_cursor(call.query.cursor),
                                       call.query.limit)
    return PricingPage(data=[service.pricing_out(r) for r in rows],
                       next_cursor=next_cursor([r["id"] for r in rows], call.query.limit))


async def attach_plan(call: Call) -> BaseModel:
    return await service.attach_plan(call.ctx, call.path("code"), call.body)


async def account_plans(call: Call) -> BaseModel:
    account_id = await repo.id_of(call.ctx.pool, "accounts", call.path("code"))
    if account_id is None:
        raise NotFound(f"no account {call.path('code')!r}", field="code")
    rows = await repo.account_plans(call.ctx.pool, account_id)
    return AccountPlanList(data=[AccountPlanOut.model_validate(dict(r)) for r in rows])


async def end_account_plan(call: Call) -> BaseModel:
    return await service.end_account_plan(call.ctx, call.path("code"),
                                          call.path_id("id", "account plan"), call.body.end_date)


async def end_pricing(call: Call) -> BaseModel:
    return await service.end_pricing(call.ctx, call.path_id("id", "pricing"), call.body.end_date)


async def adjust_counter(call: Call) -> BaseModel:
    return await service.adjust_counter(call.ctx, call.path("code"), call.body)


async def set_rate(call: Call) -> BaseModel:
    return await service.set_rate(call.ctx, call.path("code"), call.body)


def _crud(path: str, table: str, what: str, tag: str, body: type[BaseModel],
          out: type[BaseModel], create: object) -> list[Endpoint]:
    page: type[BaseModel] = PAGES[table]
    return [
        Endpoint("POST", path, _create(create), ADMIN, f"Create {what}", tag,  # type: ignore[arg-type]
                 body=body, response=out, status=201),
        Endpoint("GET", path, _list(table), ADMIN, f"List {tag}", tag,  # type: ignore[arg-type]
                 query=ListQuery, response=page),
        Endpoint("GET", path + "/{code}", _read(table), ADMIN, f"Read {what}", tag,  # type: ignore[arg-type]
                 response=out),
    ]


def _count(call: Call, results: list[MeasurementResult]) -> None:
    if (observed := call.ctx.observed) is not None:
        counts = observed.measurements
        for r in results:  # (Counter.update checks its argument's type first: dearer for one)
            counts[r.status] += 1


async def measurements(call: Call) -> BaseModel:
    """One measurement, or {"measurements": [...]} up to 1,000 answered one by one."""
    body = call.body
    items = batch_of(body, "measurements", MAX_MEASUREMENTS)
    if items is not None:
        results = await drawdown.record_measurements(call.ctx, items, "measurements.{}.")
        await recurring.after_measurements(call.ctx, items, results)
        _count(call, results)
        return MeasurementBatchOut(
            rated=sum(r.status == "rated" for r in results),
            unrated=sum(r.status == "unrated" for r in results),
            duplicates=sum(r.status == "duplicate" for r in results),
            rejected=sum(r.status == "rejected" for r in results), results=results)
    [result] = await drawdown.record_measurements(call.ctx, [body], "")
    await recurring.after_measurements(call.ctx, [body], [result])
    _count(call, [result])
    if result.error is not None:
        raise ValidationProblem(result.error.message, field=result.error.field)
    return result


async def list_measurements(call: Call) -> BaseModel:
    code, query = call.path("code"), call.query
    account = await account_ref(call.ctx, code, field="code")
    meter_id = None
    if query.meter is not None:
        meter_id = await repo.id_of(call.ctx.pool, "meters", query.meter)
        if meter_id is None:
            raise ValidationProblem(f"unknown meter {query.meter!r}", field="query.meter")
    if query.start is not None and query.end is not None and query.start >= query.end:
        raise ValidationProblem("must be before `end`", field="query.start")
    before = decode_time_cursor(query.cursor) if query.cursor else None
    rows = await repo.measurements(call.ctx.pool, account.id, meter_id, query.start, query.end,
                                   query.rated, before, query.limit)
    return MeasurementPage(data=[_measurement_out(code, row) for row in rows],
                           next_cursor=next_time_cursor(rows, query.limit, "ts"))


def _measurement_out(account: str, row: asyncpg.Record) -> MeasurementOut:
    return MeasurementOut(uid=row["uid"], account=account, meter=row["meter"], timestamp=row["ts"],
                          data=json.loads(row["data"]), rated=row["rated"])


async def read_measurement(call: Call) -> BaseModel:
    code, uid = call.path("code"), call.path("uid")
    account = await account_ref(call.ctx, code, field="code")
    row = await repo.measurement(call.ctx.pool, account.id, uid)
    if row is None:
        raise NotFound(f"no measurement {uid!r} for this account", field="uid")
    return _measurement_out(code, row)


async def usage(call: Call) -> BaseModel:
    return await billing.bill_to_date(call.ctx, call.path("code"), call.query.at)


async def run_bills(call: Call) -> BaseModel:
    return await bills.run_request(call.ctx, call.body)


async def read_bill(call: Call) -> BaseModel:
    return await bills.bill(call.ctx.pool, call.path_id("id", "bill"))


async def account_bills(call: Call) -> BaseModel:
    account = await account_ref(call.ctx, call.path("code"), field="code")
    return await _bill_page(call, account.id)


async def all_bills(call: Call) -> BaseModel:
    return await _bill_page(call, None)


async def _bill_page(call: Call, account_id: int | None) -> BaseModel:
    query = call.query
    found = await bills.bills_of(call.ctx.pool, account_id, query.after_id(), query.limit,
                                 query.period_start)
    return BillPage(data=found, next_cursor=next_cursor([b.id for b in found], query.limit))


async def create_charge(call: Call) -> BaseModel:
    return await charges.create(call.ctx, call.path("code"), call.body)


async def account_charges(call: Call) -> BaseModel:
    account = await account_ref(call.ctx, call.path("code"), field="code")
    query = call.query
    found = await charges.of_account(call.ctx.pool, account.id, query.after_id(), query.limit)
    return ChargePage(data=found, next_cursor=next_cursor([c.id for c in found], query.limit))


async def read_charge(call: Call) -> BaseModel:
    return await charges.read(call.ctx.pool, call.path_id("id", "charge"))


async def void_charge(call: Call) -> BaseModel:
    return await charges.void(call.ctx, call.path_id("id", "charge"))


RUNTIME_ENDPOINTS = [
    Endpoint("POST", "/v1/measurements", measurements, RUNTIME,
             "Submit measurements: one, or {measurements: [...]} up to 1,000, each answered on "
             "its own; rated ones draw balances down in real time", "runtime",
             body=MeasurementBatch, response=MeasurementBatchOut, raw_body=True),
]

ENDPOINTS = [
    Endpoint("GET", "/v1/accounts/{code}/measurements", list_measurements, READ,
             "An account's stored measurements, newest timestamp first, rated or not",
             "measurements", query=MeasurementsQuery, response=MeasurementPage),
    Endpoint("GET", "/v1/accounts/{code}/measurements/{uid}", read_measurement, READ,
             "A stored measurement and whether it has been rated", "runtime",
             response=MeasurementOut),
    Endpoint("GET", "/v1/accounts/{code}/usage", usage, CUSTOMER_READ,
             "Bill-to-date: each pricing's quantity, bands and amount for a period", "runtime",
             query=UsageQuery, response=AccountUsageOut),
    Endpoint("POST", "/v1/bills/run", run_bills, ADMIN,
             "The bill run: one final bill per account plan and closed period (minimum spend "
             "topped up, credits settled); the workers run it daily after a grace period",
             "bills", body=BillRunIn, response=BillRunOut),
    Endpoint("GET", "/v1/bills/{id}", read_bill, READ, "A bill", "bills", response=BillOut),
    Endpoint("GET", "/v1/bills", all_bills, ADMIN,
             "Every account's bills in the order they were written (a bill run's, with "
             "`period_start`)", "bills", query=BillQuery, response=BillPage),
    Endpoint("GET", "/v1/accounts/{code}/bills", account_bills, CUSTOMER_READ,
             "An account's bills, oldest first", "bills", query=BillQuery, response=BillPage),
    Endpoint("POST", "/v1/accounts/{code}/charges", create_charge, ADMIN,
             "Charge an amount in an account plan's currency on the bill of the period "
             "holding its day (billed, not drawn from credits); an `Idempotency-Key` is "
             "required, as a retry must not bill twice", "bills", body=ChargeIn,
             response=ChargeOut, status=201, idempotency_required=True),
    Endpoint("GET", "/v1/accounts/{code}/charges", account_charges, ADMIN,
             "An account's charges, oldest first", "bills", query=ListQuery,
             response=ChargePage),
    Endpoint("GET", "/v1/charges/{id}", read_charge, ADMIN, "A charge", "bills",
             response=ChargeOut),
    Endpoint("POST", "/v1/charges/{id}/void", void_charge, ADMIN,
             "Void a charge not billed yet", "bills", response=ChargeOut),
    *_crud("/v1/meters", "meters", "a meter (data and derived fields)", "meters", MeterIn,
           MeterOut, service.create_meter),
    *_crud("/v1/aggregations", "aggregations", "an aggregation of a meter field",
           "aggregations", AggregationIn, AggregationOut, service.create_aggregation),
    *_crud("/v1/counters", "counters", "a counter (seats, licenses)", "counters", CounterIn,
           CounterOut, service.create_counter),
    *_crud("/v1/plan-templates", "plan_templates", "a plan template", "plan templates",
           PlanTemplateIn, PlanTemplateOut, service.create_template),
    *_crud("/v1/plans", "plans", "a plan from a template", "plans", PlanIn, PlanOut,
           service.create_plan),
    Endpoint("POST", "/v1/pricings", _create(service.create_pricing), ADMIN,  # type: ignore[arg-type]
             "Price an aggregation or counter on a plan for a date range", "pricings",
             body=PricingIn, response=PricingOut, status=201),
    Endpoint("GET", "/v1/pricings", list_pricings, ADMIN, "List the pricings of a plan",
             "pricings", query=PricingQuery, response=PricingPage),
    Endpoint("POST", "/v1/pricings/{id}/end", end_pricing, ADMIN,
             "Set the day a pricing ends: a price change or a cancellation", "pricings",
             body=EndIn, response=PricingOut),
    Endpoint("POST", "/v1/accounts/{code}/plans", attach_plan, ADMIN,
             "Attach a plan to an account for a date range; the standing charge and counter "
             "charges of its started periods are drawn at once", "plans", body=AccountPlanIn,
             response=AccountPlanAttached, status=201),
    Endpoint("GET", "/v1/accounts/{code}/plans", account_plans, ADMIN,
             "The plans attached to an account", "plans", response=AccountPlanList),
    Endpoint("POST", "/v1/accounts/{code}/plans/{id}/end", end_account_plan, ADMIN,
             "Set the day an account plan ends: a plan change or a cancellation (the periods "
             "that started keep what they drew)", "plans", body=EndIn,
             response=AccountPlanOut),
    Endpoint("POST", "/v1/accounts/{code}/counter-adjustments", adjust_counter, ADMIN,
             "Set a counter's level for an account from a date on; the change to the charge "
             "of the started periods it affects is drawn at once", "counters",
             body=CounterAdjustmentIn, response=CounterAdjustmentOut),
    Endpoint("POST", "/v1/credit-types/{code}/conversion-rates", set_rate, ADMIN,
             "Set the rate of a credit type to a fiat currency from a date on", "credit types",
             body=ConversionRateIn, response=ConversionRateOut),
]
