"""Ending a pricing after it was made (POST /v1/pricings/{id}/end): a price change ends one
pricing where the next begins; a pricing that has not started can be cancelled whole, and then
charges nothing: no line in bill-to-date or the bill, no counter charge when its period starts."""

from __future__ import annotations

import json
from datetime import date, timedelta
from decimal import Decimal as D
from typing import Any

import asyncpg

from app.rating import bills, recurring
from app.rating.periods import add_months
from app.rating.service import earliest_end
from app.settings import Settings
from tests.conftest import Api
from tests.procs import account_id
from tests.test_account_plan_end import attach, standing_debits
from tests.test_rating_config import meter, plan
from tests.test_rating_counters_realtime import adjust, counter
from tests.test_rating_drawdown import aggregation, measure, month_start


async def pricing(api: Api, plan_code: str, start: date | str, end: date | None = None,
                  price: str = "0.10", fixed_fee: str = "0", expect: int = 201,
                  **target: str) -> dict[str, Any]:
    made: dict[str, Any] = await api.call("POST", "/v1/pricings", expect=expect, json={
        "plan": plan_code, "start_date": str(start), "end_date": None if end is None else str(end),
        "type": "per_unit", "bands": [{"up_to": None, "price": price}], "fixed_fee": fixed_fee,
        **target})
    return made


async def end(api: Api, pricing_id: int | str, expect: int = 200, **body: Any) -> Any:
    return await api.call("POST", f"/v1/pricings/{pricing_id}/end", json=body, expect=expect)


async def lines(api: Api, account: str, at: date) -> dict[int, D]:
    [usage] = (await api.call("GET", f"/v1/accounts/{account}/usage",
                              params={"at": str(at)}))["plans"]
    return {line["pricing"]: D(line["amount"]) for line in usage["pricings"]}


async def test_a_price_change_ends_one_pricing_where_the_next_begins(
        api: Api, settings: Settings) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "1000")
    meter_code = await meter(api, names["storage"])
    gb = await aggregation(api, meter_code, "gb", "SUM")
    plan_code = await plan(api, names["storage"], names["credit_type"])
    first = date.fromisoformat(month_start())
    old = await pricing(api, plan_code, first, aggregation=gb)
    await attach(api, account, plan_code, first)
    rated = await measure(api, account, meter_code, gb=3, files=1, seconds=1)
    assert [D(d["amount"]) for d in rated["debits"]] == [D("0.30")]

    change = earliest_end(settings)
    refused = await pricing(api, plan_code, change, price="0.20", aggregation=gb, expect=409)
    assert refused["field"] == "start_date"
    ended = await end(api, old["id"])
    assert ended["end_date"] == str(change) and ended["status"] == "active"
    assert {k: v for k, v in ended.items() if k not in ("end_date", "status")} == \
        {k: v for k, v in old.items() if k not in ("end_date", "status")}
    new = await pricing(api, plan_code, change, price="0.20", aggregation=gb)
    assert new["status"] == "scheduled"
    listed = await api.call("GET", "/v1/pricings", params={"plan": plan_code})
    assert [(p["id"], p["start_date"], p["end_date"]) for p in listed["data"]] == \
        [(old["id"], str(first), str(change)), (new["id"], str(change), None)]
    # today's usage is the old price's; measurements go on being rated by it until the change
    again = await measure(api, account, meter_code, gb=2, files=1, seconds=1)
    assert [D(d["amount"]) for d in again["debits"]] == [D("0.20")]
    assert (await lines(api, account, date.fromisoformat(month_start())))[old["id"]] == D("0.50")


async def test_a_pricing_that_has_not_started_is_cancelled_by_ending_it_on_its_start(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "1000")
    licenses = await counter(api)
    plan_code = await plan(api, names["storage"], names["credit_type"], standing_charge="1")
    first = date.fromisoformat(month_start())
    start = add_months(first, 1)
    # from the 11th of next month (a counter pricing counts the days of its own range)
    seats_from = start + timedelta(days=10)
    seats = await pricing(api, plan_code, seats_from, price="2", counter=licenses)
    attached = await attach(api, account, plan_code, first)
    await adjust(api, account, licenses, str(first), 3)
    period_days = (add_months(start, 1) - start).days
    [(line, amount)] = (await lines(api, account, start)).items()
    assert line == seats["id"]
    assert abs(amount - D(6) * (period_days - 10) / period_days) < D("1e-30")

    cancelled = await end(api, seats["id"], end_date=str(seats_from))
    assert cancelled["end_date"] == str(seats_from) == cancelled["start_date"]
    assert cancelled["status"] == "cancelled"
    assert await lines(api, account, start) == {}
    # another pricing of the same counter may take the days it held, and days around them
    cheaper = await pricing(api, plan_code, first, price="1", counter=licenses)
    assert await lines(api, account, start) == {cheaper["id"]: D(3)}

    # the period's start: the standing charge and the cheaper seats are drawn, nothing more
    mine = [await account_id(db, account)]
    await recurring.sweep(app.state.ctx, start, mine)
    ap = attached["id"]
    assert await standing_debits(db, ap, [f"s{ap}:{first}", f"s{ap}:{start}"]) == \
        [f"s{ap}:{first}", f"s{ap}:{start}"]
    charged = await db.fetch("SELECT DISTINCT charge_key FROM rated_charges WHERE account_id = $1",
                             mine[0])
    assert {r["charge_key"] for r in charged} <= {f"s{ap}", f"p{cheaper['id']}"}
    assert f"p{cheaper['id']}" in {r["charge_key"] for r in charged}
    # the bill run bills the period with the cheaper seats only
    await bills.run(app.state.ctx, add_months(start, 1), mine)
    billed = await db.fetchval("SELECT pricings FROM bills WHERE account_plan_id = $1 "
                               "AND period_start = $2", ap, start)
    assert [line["pricing"] for line in json.loads(billed)] == [cheaper["id"]]


async def test_bad_ends_are_refused_naming_the_field_and_change_nothing(
        api: Api, settings: Settings) -> None:
    names = await api.setup()
    earliest = earliest_end(settings)
    meter_code = await meter(api, names["storage"])
    gb = await aggregation(api, meter_code, "gb", "SUM")
    files = await aggregation(api, meter_code, "files", "SUM")
    plan_code = await plan(api, names["storage"], names["credit_type"])
    first = date.fromisoformat(month_start())
    current = await pricing(api, plan_code, first, aggregation=gb)
    later = await pricing(api, plan_code, earliest + timedelta(days=3), aggregation=files)
    past = await pricing(api, plan_code, date(2024, 1, 1), date(2024, 2, 1), aggregation=files)
    until = await pricing(api, plan_code, earliest + timedelta(days=5),
                          earliest + timedelta(days=9), aggregation=gb, expect=409)
    assert until["field"] == "start_date"  # (the current one is open: it overlaps)
    await end(api, current["id"], end_date=str(earliest + timedelta(days=5)))
    following = await pricing(api, plan_code, earliest + timedelta(days=5), aggregation=gb)
    before = (await api.call("GET", "/v1/pricings", params={"plan": plan_code}))["data"]

    cases: list[tuple[Any, dict[str, Any], int, str]] = [
        (current["id"], {"end_date": str(earliest - timedelta(days=1))}, 422, "end_date"),
        (later["id"], {"end_date": str(earliest + timedelta(days=2))}, 422, "end_date"),
        (past["id"], {}, 409, "end_date"),  # it ended in 2024
        (current["id"], {"end_date": str(earliest + timedelta(days=6))}, 409, "end_date"),
        (999_999_999, {}, 404, "id"),
        ("x1", {}, 404, "id"),
        (current["id"], {"end_date": "soon"}, 422, "end_date"),
        (current["id"], {"until": str(earliest)}, 422, "until"),
    ]
    for pricing_id, body, status, field in cases:
        problem = await end(api, pricing_id, expect=status, **body)
        assert problem["field"] == field, (pricing_id, body, problem)
    assert (await api.call("GET", "/v1/pricings", params={"plan": plan_code}))["data"] == before
    assert following["status"] == "scheduled"
