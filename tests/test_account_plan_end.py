"""Ending an account plan after it was attached (POST /v1/accounts/{code}/plans/{id}/end): a
plan change ends one plan where the next begins, a cancellation ends it as soon as no
measurement can lie past the end, and a plan that has not started can be cancelled whole."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import asyncpg

from app.rating import bills, recurring
from app.rating.periods import add_months, period_of
from app.rating.service import earliest_end
from app.settings import Settings
from tests.conftest import Api
from tests.procs import account_id
from tests.test_rating_config import meter, plan
from tests.test_rating_drawdown import aggregation, measure, month_start, price


def end_path(account: str, account_plan: int | str) -> str:
    return f"/v1/accounts/{account}/plans/{account_plan}/end"


async def attach(api: Api, account: str, plan_code: str, start: date | str,
                 end: date | None = None, expect: int = 201) -> dict[str, Any]:
    result: dict[str, Any] = await api.call(
        "POST", f"/v1/accounts/{account}/plans", expect=expect,
        json={"plan": plan_code, "start_date": str(start),
              "end_date": None if end is None else str(end)})
    return result


async def plans_of(api: Api, account: str) -> dict[int, tuple[str, str | None]]:
    listed = await api.call("GET", f"/v1/accounts/{account}/plans")
    return {p["id"]: (p["start_date"], p["end_date"]) for p in listed["data"]}


async def standing_debits(db: asyncpg.Connection, account_plan: int,
                          expected: list[str]) -> list[str]:
    """The usage uids of an account plan's standing-charge debits (`s<ap>:<period start>`), once
    they are `expected` or 5 s have passed: the sweep sends its debits through the journal's
    group commit without waiting for it."""
    deadline = time.monotonic() + 5.0
    while True:
        rows = await db.fetch("SELECT uid FROM usage_events WHERE uid LIKE $1 ORDER BY uid",
                              f"s{account_plan}:%")
        found = [r["uid"] for r in rows]
        if found == expected or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


def test_the_earliest_end_is_past_every_day_a_measurement_may_be_dated_on(
        settings: Settings) -> None:
    settings = replace(settings, usage_future_skew_s=300)
    noon = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    assert earliest_end(settings, noon) == date(2026, 3, 11)
    # 23:46 + 5 minutes of skew + 10 of clock slack is tomorrow: a measurement may be dated
    # on the 11th already, so the plan covers the 11th whole
    assert earliest_end(settings, datetime(2026, 3, 10, 23, 46, tzinfo=UTC)) == \
        date(2026, 3, 12)
    assert earliest_end(settings, datetime(2026, 3, 10, 23, 44, tzinfo=UTC)) == \
        date(2026, 3, 11)
    assert earliest_end(replace(settings, usage_future_skew_s=86_400), noon) == date(2026, 3, 12)


async def test_a_plan_change_ends_one_plan_where_the_next_begins(
        api: Api, app: Any, db: asyncpg.Connection, settings: Settings) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "1000")
    meter_code = await meter(api, names["storage"])
    old = await plan(api, names["storage"], names["credit_type"], standing_charge="5")
    new = await plan(api, names["storage"], names["credit_type"], standing_charge="7")
    for code in (old, new):
        await price(api, code, "per_unit", [(None, "0.10")],
                    aggregation=await aggregation(api, meter_code, "gb", "SUM"))
    first = date.fromisoformat(month_start())
    current = await attach(api, account, old, first)
    assert [D(d["amount"]) for d in current["debits"]] == [D(5)]
    change = earliest_end(settings)
    # while the old plan is open, the new one cannot begin
    refused = await attach(api, account, new, change, expect=409)
    assert refused["field"] == "start_date"

    ended = await api.call("POST", end_path(account, current["id"]), json={})
    assert ended["id"] == current["id"] and ended["end_date"] == str(change)
    assert ended["start_date"] == str(first) and ended["plan"] == old
    assert ended["status"] == "active"  # (through today)
    following = await attach(api, account, new, change)
    assert following["debits"] == [] and following["status"] == "scheduled"  # not started
    assert await plans_of(api, account) == {current["id"]: (str(first), str(change)),
                                            following["id"]: (str(change), None)}

    # today's measurements are the old plan's, and the day of the change is the new plan's
    rated = await measure(api, account, meter_code, gb=3, files=1, seconds=1)
    assert rated["status"] == "rated", rated
    [today] = (await api.call("GET", f"/v1/accounts/{account}/usage",
                              params={"at": str(datetime.now(UTC).date())}))["plans"]
    # the old plan's standing charge is for the days before the change (5 a month, prorated)
    period = period_of(first, "monthly", 1, datetime.now(UTC).date())
    covered = min(change, period[1])
    assert today["plan"] == old and today["covered_until"] == str(covered)
    share = D(5) * (covered - period[0]).days / (period[1] - period[0]).days
    assert abs(D(today["total"]) - share - D("0.30")) < D("1e-30")  # (a quotient: 40 digits)
    [on_change] = (await api.call("GET", f"/v1/accounts/{account}/usage",
                                  params={"at": str(change)}))["plans"]
    assert on_change["plan"] == new and D(on_change["total"]) == 7

    # the sweep draws the new plan's standing charge from the change on, and the old plan's
    # only for the periods that began before the change
    ctx, mine = app.state.ctx, [await account_id(db, account)]
    days = sorted({change, add_months(first, 1), add_months(first, 2)})
    for day in days:
        await recurring.sweep(ctx, day, mine)
    # (the new plan's first: the old plan's debits of the same sweeps travel with them)
    after = [f"s{following['id']}:{start}" for start in sorted(
        {period_of(change, "monthly", 1, d)[0] for d in days if d >= change})]
    assert await standing_debits(db, following["id"], after) == after
    before = [f"s{current['id']}:{start}" for start in sorted(
        {period_of(first, "monthly", 1, d)[0] for d in [first, *days] if d < change})]
    assert await standing_debits(db, current["id"], before) == before
    assert len(before) <= 2  # (2: a change on the 2nd of a month, made on the 31st at 23:50)


async def test_a_plan_that_has_not_started_is_cancelled_by_ending_it_on_its_start(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "1000")
    start = add_months(date.fromisoformat(month_start()), 1)
    scheduled = await plan(api, names["storage"], names["credit_type"], standing_charge="5")
    instead = await plan(api, names["storage"], names["credit_type"], standing_charge="3")
    made = await attach(api, account, scheduled, start)
    await attach(api, account, instead, start, expect=409)  # the range is taken

    cancelled = await api.call("POST", end_path(account, made["id"]),
                               json={"end_date": str(start)})
    assert cancelled["end_date"] == str(start) == cancelled["start_date"]
    assert cancelled["status"] == "cancelled"
    # a cancelled plan overlaps nothing, not even a range around its start
    first = date.fromisoformat(month_start())
    other = await attach(api, account, instead, first)
    await recurring.sweep(app.state.ctx, start, [await account_id(db, account)])
    drawn = [f"s{other['id']}:{first}", f"s{other['id']}:{start}"]
    assert await standing_debits(db, other["id"], drawn) == drawn
    assert await standing_debits(db, made["id"], []) == []
    # the bill run bills the other plan's two periods, and nothing of the cancelled one
    await bills.run(app.state.ctx, add_months(start, 1), [await account_id(db, account)])
    assert [r["account_plan_id"] for r in await db.fetch(
        "SELECT account_plan_id FROM bills WHERE account_plan_id = ANY($1::int8[])",
        [made["id"], other["id"]])] == [other["id"]] * 2
    [billed] = (await api.call("GET", f"/v1/accounts/{account}/usage",
                               params={"at": str(start)}))["plans"]
    assert billed["plan"] == instead and D(billed["total"]) == 3


async def test_a_plan_is_extended_unless_another_takes_the_days(
        api: Api, settings: Settings) -> None:
    names = await api.setup()
    account = names["account"]
    earliest = earliest_end(settings)
    one = await plan(api, names["storage"], names["credit_type"])
    two = await plan(api, names["storage"], names["credit_type"])
    first = date.fromisoformat(month_start())
    made = await attach(api, account, one, first, earliest + timedelta(days=5))
    extended = await api.call("POST", end_path(account, made["id"]),
                              json={"end_date": str(earliest + timedelta(days=10))})
    assert extended["end_date"] == str(earliest + timedelta(days=10))
    await attach(api, account, two, earliest + timedelta(days=10))
    refused = await api.call("POST", end_path(account, made["id"]), expect=409,
                             json={"end_date": str(earliest + timedelta(days=11))})
    assert refused["field"] == "end_date"
    # shortened again, it leaves a gap the next plan does not mind
    shorter = await api.call("POST", end_path(account, made["id"]),
                             json={"end_date": str(earliest + timedelta(days=2))})
    assert shorter["end_date"] == str(earliest + timedelta(days=2))


async def test_bad_ends_are_refused_naming_the_field_and_change_nothing(
        api: Api, settings: Settings) -> None:
    names = await api.setup()
    account = names["account"]
    other_account = (await api.setup())["account"]
    earliest = earliest_end(settings)
    today = datetime.now(UTC).date()
    product_plan = await plan(api, names["storage"], names["credit_type"])
    api_plan = await plan(api, names["api"], names["credit_type"])
    first = date.fromisoformat(month_start())
    open_plan = await attach(api, account, product_plan, first)
    # (a plan of another product: one plan per product at a time)
    future = await attach(api, account, api_plan, earliest + timedelta(days=3))
    past = await attach(api, other_account, product_plan, date(2024, 1, 1), date(2024, 2, 1))
    before = await plans_of(api, account)

    cases: list[tuple[str, Any, int, str]] = [
        (end_path(account, open_plan["id"]), {"end_date": str(today)}, 422, "end_date"),
        (end_path(account, open_plan["id"]), {"end_date": str(earliest - timedelta(days=1))},
         422, "end_date"),
        (end_path(account, future["id"]), {"end_date": str(earliest + timedelta(days=2))}, 422,
         "end_date"),  # before its start
        (end_path(other_account, past["id"]), {}, 409, "end_date"),  # it ended in 2024
        (end_path(account, past["id"]), {}, 404, "id"),  # another account's plan
        (end_path(account, 999_999_999), {}, 404, "id"),
        (end_path(account, "x1"), {}, 404, "id"),
        (end_path("no-such-account", open_plan["id"]), {}, 404, "code"),
        (end_path(account, open_plan["id"]), {"end_date": "tomorrow"}, 422, "end_date"),
        (end_path(account, open_plan["id"]), {"end_date": "3001-01-01"}, 422, "end_date"),
        (end_path(account, open_plan["id"]), {"end": str(earliest)}, 422, "end"),
    ]
    for path, body, status, field in cases:
        problem = await api.call("POST", path, json=body, expect=status)
        assert problem["field"] == field, (path, body, problem)
    assert await plans_of(api, account) == before
    assert (await plans_of(api, other_account))[past["id"]] == ("2024-01-01", "2024-02-01")
    listed = await api.call("GET", f"/v1/accounts/{other_account}/plans")
    assert [p["status"] for p in listed["data"]] == ["ended"]


async def test_an_end_replayed_with_its_idempotency_key_is_answered_once(
        api: Api, settings: Settings) -> None:
    names = await api.setup()
    account = names["account"]
    made = await attach(api, account, await plan(api, names["storage"], names["credit_type"]),
                        date.fromisoformat(month_start()))
    body = {"end_date": str(earliest_end(settings) + timedelta(days=1))}
    headers = {"Idempotency-Key": f"end-{made['id']}"}
    first = await api.call("POST", end_path(account, made["id"]), json=body, headers=headers)
    again = await api.call("POST", end_path(account, made["id"]), json=body, headers=headers)
    assert again == first
    different = await api.call("POST", end_path(account, made["id"]), expect=422,
                               json={"end_date": str(earliest_end(settings))},
                               headers=headers)
    assert different["code"] == "idempotency_key_reused"
    assert (await plans_of(api, account))[made["id"]][1] == body["end_date"]
