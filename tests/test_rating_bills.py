"""The bill run: one final bill per account plan and closed period, the minimum spend topped
up, a counter lowered mid-period given back, a billed period closed to late measurements, and
the run safe to repeat and to run in two processes at once."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import asyncpg
import httpx

from app.rating import bills
from tests.conftest import Api
from tests.procs import account_id, rows_once, run_apps
from tests.test_rating_config import fiat_usd, meter, plan
from tests.test_rating_counters_realtime import adjust, attach, counter, license_plan
from tests.test_rating_drawdown import aggregation, price


def _day(offset: int) -> date:
    return datetime.now(UTC).date() + timedelta(days=offset)


async def bill_debits(db: asyncpg.Connection, account: str, count: int) -> list[D]:
    """The amounts of the bill run's debits in `usage_events`: they are committed by the
    journal's group commit right behind the run's answer, so this waits for `count` (up to
    5 s)."""
    rows = await rows_once(db, count, "SELECT amount FROM usage_events WHERE account_id = $1 "
                           "AND uid LIKE 'b%' ORDER BY amount", await account_id(db, account))
    return [r["amount"] for r in rows]


async def measure_on(api: Api, account: str, meter_code: str, day: date,
                     **data: Any) -> dict[str, Any]:
    result: dict[str, Any] = await api.call("POST", "/v1/measurements", scope="runtime", json={
        "uid": uuid.uuid4().hex, "account": account, "meter": meter_code,
        "timestamp": f"{day.isoformat()}T12:00:00Z",
        "data": {"gb": 0, "files": 0, "seconds": 0, **data}})
    return result


async def run_bills(api: Api, account: str, through: date | str,
                    expect: int = 200) -> dict[str, Any]:
    result: dict[str, Any] = await api.call("POST", "/v1/bills/run", expect=expect, json={
        "through": str(through), "account": account},
        headers={"Idempotency-Key": uuid.uuid4().hex})
    return result


async def daily_calls_plan(api: Api, names: dict[str, str], start: date) -> str:
    """A daily plan: standing charge 2, minimum spend 10, calls at 0.50 each; attached to the
    account from `start` (which draws the standing charge of every started day at once)."""
    meter_code = await meter(api, names["storage"])
    plan_code = await plan(api, names["storage"], names["credit_type"], bill_frequency="daily",
                           standing_charge="2", minimum_spend="10")
    await price(api, plan_code, "per_unit", [(None, "0.50")], start_date=str(start),
                aggregation=await aggregation(api, meter_code, "files", "SUM"))
    await attach(api, names["account"], plan_code, str(start), None)
    return meter_code


async def test_the_bill_run_tops_up_the_minimum_spend_once_and_closes_the_period(
        api: Api, db: asyncpg.Connection, redis: Any) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "1000")
    first, second = _day(-2), _day(-1)
    meter_code = await daily_calls_plan(api, names, first)
    # three days started (two closed, today): the standing charge of each is drawn
    assert D(await api.available(account)) == 1000 - 3 * 2
    await measure_on(api, account, meter_code, first, files=8)    # 4.00
    await measure_on(api, account, meter_code, second, files=30)  # 15.00
    assert D(await api.available(account)) == 1000 - 6 - 19

    made = await run_bills(api, account, _day(0))
    assert len(made["bills"]) == 2 and made["not_billed"] == []
    low, high = [await api.call("GET", f"/v1/bills/{i}", scope="runtime") for i in made["bills"]]
    # day one: 2 + 4 = 6, below the minimum of 10: topped up by 4, drawn by the bill run
    assert (low["period_start"], low["period_end"]) == (str(first), str(second))
    assert (low["standing_charge"], low["subtotal"], low["minimum_spend_topup"],
            low["total"]) == ("2", "6.00", "4.00", "10.00")
    assert (low["drawn"], low["settled"], low["credit_type"]) == ("10.00", "4.00",
                                                                  names["credit_type"])
    [calls] = low["pricings"]
    assert (calls["quantity"], calls["amount"]) == ("8", "4.00")
    # day two: 2 + 15 = 17, above the minimum: nothing more to draw
    assert (high["subtotal"], high["minimum_spend_topup"], high["total"], high["drawn"],
            high["settled"]) == ("17.00", "0", "17.00", "17.00", "0.00")
    assert D(await api.available(account)) == 1000 - 6 - 19 - 4
    assert await bill_debits(db, account, 1) == [D(4)]
    acct = await account_id(db, account)
    assert await db.fetchval("SELECT uid FROM usage_events WHERE account_id = $1 AND uid LIKE 'b%'",
                             acct) == f"b{low['account_plan']}:{first}:m{low['account_plan']}"

    # what the run drew is in Postgres: an emptied Redis is rebuilt with it
    await redis.flushall()
    assert D(await api.available(account)) == 971
    # the run again, and the workers' pass over the same days: nothing new, nothing drawn
    assert (await run_bills(api, account, _day(0)))["bills"] == []
    assert D(await api.available(account)) == 971
    # a late measurement for a billed day is stored, unrated, and draws nothing
    late = await measure_on(api, account, meter_code, first, files=100)
    assert late["status"] == "unrated" and late["debits"] == []
    assert D(await api.available(account)) == 971
    assert (await api.call("GET", f"/v1/bills/{low['id']}", scope="runtime")) == low
    # one event per bill, for the vendor's invoicing
    # (in the bills' order: an event's id is a hash of what caused it, in no order)
    events = await db.fetch("SELECT payload FROM webhook_events WHERE type = 'bill.finalized' "
                            "AND account_id = $1 ORDER BY (payload->'data'->>'bill')::int8",
                            acct)
    assert len(events) == 2 and '"total": "10.00"' in events[0]["payload"]
    listed = await api.call("GET", f"/v1/accounts/{account}/bills", params={"limit": 1})
    assert [b["id"] for b in listed["data"]] == [low["id"]]
    rest = await api.call("GET", f"/v1/accounts/{account}/bills",
                          params={"cursor": listed["next_cursor"]})
    assert [b["id"] for b in rest["data"]] == [high["id"]]
    # finance's view: every account's bills, here those of the second day's periods
    of_day = await api.call("GET", "/v1/bills", params={"period_start": str(second),
                                                        "limit": 500})
    assert high["id"] in [b["id"] for b in of_day["data"]]
    assert {b["period_start"] for b in of_day["data"]} == {str(second)}


async def licenses_lowered_in_july(api: Api, credit: str) -> tuple[dict[str, str], str]:
    """An account with `credit` on a monthly plan of licenses, prorated at 31 a month (1 a
    license-day in July): 10 from July 1st, 20 from the 16th, 5 from the 26th. Its names and
    the counter."""
    names = await api.setup()
    await api.grant(names["account"], credit)
    licenses = await counter(api)
    await attach(api, names["account"], await license_plan(api, names, licenses, "prorate"))
    for day, level in (("2024-07-01", 10), ("2024-07-16", 20), ("2024-07-26", 5)):
        await adjust(api, names["account"], licenses, day, level)
    return names, licenses


async def test_a_counter_lowered_mid_month_is_given_back_at_the_bill_run(
        api: Api, db: asyncpg.Connection) -> None:
    names, licenses = await licenses_lowered_in_july(api, "2000")
    account = names["account"]
    # drawn at the high-water mark, 10 x 15 + 20 x 16 = 470, though the month comes to 380
    assert D(await api.available(account)) == 2000 - 470
    [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
    bill = await api.call("GET", f"/v1/bills/{bill_id}")
    assert (bill["total"], bill["drawn"], bill["settled"]) == ("380.00", "380.00", "-90.00")
    assert D(await api.available(account)) == 2000 - 380
    # the give-back reversed the counter's own debits, not a balance in the account's favour
    parts = await db.fetch("SELECT source FROM rated_credit_parts WHERE account_id = $1",
                           await account_id(db, account))
    assert parts and {p["source"] for p in parts} == {"balance"}
    # July is closed: a level changed in it afterwards draws nothing
    assert (await adjust(api, account, licenses, "2024-07-30", 50))["debits"] == []
    assert D(await api.available(account)) == 2000 - 380


async def test_an_account_without_credits_is_billed_with_nothing_drawn(api: Api) -> None:
    names = await api.setup()
    account = f"{names['account']}-nc"
    await api.call("POST", "/v1/accounts", expect=201, json={"code": account, "name": "No credit"})
    licenses = await counter(api)
    await attach(api, account, await license_plan(api, names, licenses, "peak",
                                                  standing_charge="1.5"))
    assert (await adjust(api, account, licenses, "2024-07-01", 3))["debits"] == []
    [bill_id] = (await run_bills(api, account, "2024-08-01"))["bills"]
    bill = await api.call("GET", f"/v1/bills/{bill_id}")
    # 1.5 + 3 licenses x 31 = 94.50, invoiced outside: no credit type, nothing drawn
    assert (bill["total"], bill["credit_type"], bill["drawn"]) == ("94.50", None, None)
    assert [(p["counter"], p["quantity"]) for p in bill["pricings"]] == [(licenses, "3")]
    # the plan ended with July: nothing more is due, ever
    assert (await run_bills(api, account, _day(0)))["bills"] == []


async def test_two_processes_running_the_bill_run_at_once_bill_each_period_once(
        api: Api, db: asyncpg.Connection, settings: Any, keys: dict[str, str]) -> None:
    names = await api.setup()
    account = names["account"]
    await api.grant(account, "100")
    meter_code = await daily_calls_plan(api, names, _day(-6))
    for offset in range(-6, 0, 2):
        await measure_on(api, account, meter_code, _day(offset), files=2)  # 1.00 on 3 days
    body = {"through": str(_day(0)), "account": account}
    async with run_apps(settings, 2) as apps:
        clients = [a.client() for a in apps]
        try:
            answers = await asyncio.gather(*(
                c.post("/v1/bills/run", json=body, headers={
                    "Authorization": f"Bearer {keys['admin']}",
                    "Idempotency-Key": uuid.uuid4().hex})
                for c in clients for _ in range(2)))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    made = [b for a in answers for b in a.json()["bills"]]
    assert len(made) == len(set(made)) == 6  # six closed days, each billed by one of the four
    acct = await account_id(db, account)
    rows = await db.fetch("SELECT period_start, total, settled FROM bills WHERE account_id = $1 "
                          "ORDER BY period_start", acct)
    # each day: 2 standing + 1 or 0 usage, topped up to 10 by 7 or 8, drawn once
    assert [(r["period_start"], r["total"], r["settled"]) for r in rows] == [
        (_day(offset), D(10), D(7) if offset % 2 == 0 else D(8)) for offset in range(-6, 0)]
    assert await bill_debits(db, account, 6) == [D(7)] * 3 + [D(8)] * 3


async def test_the_workers_bill_after_the_grace_period_and_retry_a_missing_rate(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    names = await api.setup(credit_type="credits", decimal_places=0)
    account = names["account"]
    usd = await fiat_usd(api)
    start = _day(-3)
    meter_code = await meter(api, names["storage"])
    plan_code = await plan(api, names["storage"], usd, bill_frequency="daily",
                           minimum_spend="1")
    await price(api, plan_code, "per_unit", [(None, "0.10")], start_date=str(start),
                aggregation=await aggregation(api, meter_code, "files", "SUM"))
    rates = f"/v1/credit-types/{names['credit_type']}/conversion-rates"
    # 1 credit = 0.01 USD, but only from the second day on
    await api.call("POST", rates, json={"fiat": usd, "effective": str(_day(-2)), "rate": "0.01"})
    await attach(api, account, plan_code, str(start), str(_day(-1)))  # two days
    await measure_on(api, account, meter_code, _day(-2), files=3)  # 0.30 USD: 30 credits
    ctx, acct = app.state.ctx, await account_id(db, account)
    settings, memory = ctx.settings, bills.BillMemory()

    async def billed() -> list[tuple[date, D]]:
        rows = await db.fetch("SELECT period_start, drawn FROM bills WHERE account_id = $1 "
                              "ORDER BY period_start", acct)
        return [(r["period_start"], r["drawn"]) for r in rows]

    assert await bills.run_when_due(ctx, memory, account_ids=[acct]) == 0  # off in the tests
    # a context of this test's own: the session's workers share `ctx`, and with its settings
    # changed they would bill this account between the steps below
    ctx = dataclasses.replace(ctx, settings=dataclasses.replace(settings, bills_auto=True,
                                                                bill_grace_d=2))
    # through today - 2: the first day only; its minimum spend (1 USD) needs a rate of
    # that day, which does not exist: nothing is billed, the account is retried
    assert await bills.run_when_due(ctx, memory, account_ids=[acct]) == 0
    assert await billed() == [] and memory.failed == [acct]
    await api.call("POST", rates, json={"fiat": usd, "effective": str(start), "rate": "0.02"})
    assert await bills.run_when_due(ctx, memory, account_ids=[acct]) == 1
    assert await billed() == [(start, D(50))] and memory.failed == []  # 1 USD at 0.02
    # the same day again: nothing left to do; the next day, the second day is past grace
    assert await bills.run_when_due(ctx, memory, account_ids=[acct]) == 0
    await bills.run_when_due(ctx, memory, _day(1), account_ids=[acct])
    # 30 credits of usage, topped up by 0.70 USD at the rate of its day (0.01): 100
    assert await billed() == [(start, D(50)), (_day(-2), D(100))]


async def test_bad_bill_runs_name_the_field_and_change_nothing(api: Api,
                                                                client: httpx.AsyncClient) -> None:
    names = await api.setup()
    cases = [({"through": str(_day(1))}, 422, "through"),
             ({"through": "yesterday"}, 422, "through"),
             ({"account": "no-such-account"}, 404, "account"),
             ({"colour": "red"}, 422, "colour")]
    for body, status, field in cases:
        problem = await api.call("POST", "/v1/bills/run", expect=status, json=body,
                                 headers={"Idempotency-Key": uuid.uuid4().hex})
        assert problem["field"] == field, problem
    assert (await api.call("GET", "/v1/bills/123456789", expect=404))["field"] == "id"
    assert (await api.call("GET", "/v1/bills/x1", expect=404))["field"] == "id"
    assert (await api.call("GET", "/v1/accounts/no-such/bills", expect=404))["field"] == "code"
    problem = await api.call("GET", "/v1/bills", params={"period_start": "soon"}, expect=422)
    assert problem["field"] == "query.period_start"
    listed = await api.call("GET", f"/v1/accounts/{names['account']}/bills")
    assert listed == {"data": [], "next_cursor": None}
    # the bill run's debit uids are not a client's to take
    refused = await api.usage(names["account"], names["api"], "1", uid="b7:2026-11-01:m7",
                              expect=422)
    assert refused["field"] == "uid"
