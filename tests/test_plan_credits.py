"""Credits a plan includes every billing period: attaching the plan gives the account a
recurring grant tied to its account plan (its periods, its end), a period the account plan
covers in part prorated by day."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal as D
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from app.ledger import recurring_grants
from app.rating.periods import period_of
from tests.conftest import Api
from tests.test_rating_counters_realtime import attach


async def _plan(api: Api, names: dict[str, str], credits: list[dict[str, Any]],
                expect: int = 201, **template: Any) -> dict[str, Any]:
    tpl = f"tpl-{uuid.uuid4().hex[:8]}"
    await api.call("POST", "/v1/plan-templates", expect=201, json={
        "code": tpl, "name": "t", "product": names["storage"], "bill_frequency": "monthly",
        "currency": names["credit_type"], **template})
    result: dict[str, Any] = await api.call("POST", "/v1/plans", expect=expect, json={
        "code": f"plan-{uuid.uuid4().hex[:8]}", "name": "Pro", "template": tpl,
        "credits": credits})
    return result


async def _grants_of(api: Api, account: str) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = (await api.call(
        "GET", f"/v1/accounts/{account}/recurring-grants"))["data"]
    return listed


async def _entries(db: asyncpg.Connection, balance_id: int) -> list[tuple[str, D]]:
    rows = await db.fetch("SELECT kind, amount FROM ledger_entries WHERE balance_id = $1 "
                          "ORDER BY id", balance_id)
    return [(r["kind"], D(r["amount"])) for r in rows]


def _midnight(day: str) -> datetime:
    return datetime.combine(date.fromisoformat(day), time(0), UTC)


async def test_each_account_on_the_plan_gets_its_credits_every_period(
        api: Api, app: Any, db: asyncpg.Connection, redis: aioredis.Redis) -> None:
    names = await api.setup()
    plan = await _plan(api, names, [
        {"credit_type": names["credit_type"], "amount": "100.00", "products": [names["api"]],
         "priority": 5, "rollover_percent": "50", "rollover_max": "20",
         "description": "Pro: 100 API credits a month"}])
    assert plan["credits"] == [{
        "credit_type": names["credit_type"], "amount": "100.00", "products": [names["api"]],
        "priority": 5, "description": "Pro: 100 API credits a month", "rollover_percent": "50",
        "rollover_max": "20"}]
    assert (await api.call("GET", f"/v1/plans/{plan['code']}"))["credits"] == plan["credits"]
    other = await api.setup()
    today = datetime.now(UTC).date()
    period = period_of(today, "monthly", 1, today)
    for account in (names["account"], other["account"]):
        attached = await attach(api, account, plan["code"], today.isoformat(), None)
        [grant] = await _grants_of(api, account)
        assert (grant["account_plan"], grant["amount"], grant["frequency"], grant["start"],
                grant["end"], grant["credit_type"]) == (
            attached["id"], "100.00", "monthly", today.isoformat(), None, names["credit_type"])
        # the period under way, granted by the attach itself
        read = await api.call("GET", f"/v1/recurring-grants/{grant['id']}")
        [granted] = read["periods"]
        balance = await api.call("GET", f"/v1/balances/{granted['balance_id']}")
        assert (balance["granted"], balance["products"], balance["priority"],
                balance["source"], balance["description"]) == (
            "100.00", [names["api"]], 5, "recurring", "Pro: 100 API credits a month")
        assert datetime.fromisoformat(balance["expires_at"]) == _midnight(period[1].isoformat())
        assert await api.available(account) == "100.00"
    assert (await api.check(names["account"], names["api"], amount="100.00"))["allowed"] is True
    assert (await api.check(names["account"], names["storage"]))["reason"] == \
        "no_eligible_balance"

    # the workers of several processes, before and after Redis forgot everything: still one
    # balance per account
    ctx = app.state.ctx
    await asyncio.gather(*(recurring_grants.grant_due(ctx) for _ in range(3)))
    await redis.flushall()
    await asyncio.gather(*(recurring_grants.grant_due(ctx) for _ in range(3)))
    for account in (names["account"], other["account"]):
        assert await api.available(account) == "100.00"
        assert await db.fetchval("SELECT count(*) FROM balances b JOIN accounts a ON "
                                 "a.id = b.account_id WHERE a.code = $1", account) == 1


async def test_the_grant_ends_with_its_account_plan(api: Api, app: Any) -> None:
    names = await api.setup()
    plan = await _plan(api, names, [{"credit_type": names["credit_type"], "amount": "5"}])
    today = datetime.now(UTC).date()
    attached = await attach(api, names["account"], plan["code"], today.isoformat(), None)
    [grant] = await _grants_of(api, names["account"])
    # ended by the account plan, not on its own
    problem = await api.call("POST", f"/v1/recurring-grants/{grant['id']}/end", expect=409,
                             json={})
    assert problem["field"] == "id" and str(attached["id"]) in problem["detail"]
    end_url = f"/v1/accounts/{names['account']}/plans/{attached['id']}/end"
    for end in (today + timedelta(days=40), today + timedelta(days=400)):
        await api.call("POST", end_url, json={"end_date": end.isoformat()})
        [grant] = await _grants_of(api, names["account"])
        assert grant["end"] == end.isoformat()

    # a plan that has not started, cancelled (ended on its start date): its credits never come
    other = await api.setup()
    start = today + timedelta(days=10)
    later = await attach(api, other["account"], plan["code"], start.isoformat(), None)
    await api.call("POST", f"/v1/accounts/{other['account']}/plans/{later['id']}/end",
                   json={"end_date": start.isoformat()})
    [grant] = await _grants_of(api, other["account"])
    assert (grant["start"], grant["end"]) == (start.isoformat(), start.isoformat())
    await recurring_grants.grant_period(app.state.ctx, grant["id"], start)
    assert (await api.call("GET", f"/v1/recurring-grants/{grant['id']}"))["periods"] == []


async def test_a_period_covered_in_part_gets_its_days_share(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    """Calendar billing from July 16th to August 20th: 16 of July's 31 days and 19 of
    August's, of 10.00 a month rounded down at the credit type's places."""
    names = await api.setup()
    plan = await _plan(api, names, [{"credit_type": names["credit_type"], "amount": "10.00"}])
    attached = await api.call("POST", f"/v1/accounts/{names['account']}/plans", expect=201,
                              json={"plan": plan["code"], "start_date": "2024-07-16",
                                    "end_date": "2024-08-20", "billing": "calendar"})
    [grant] = await _grants_of(api, names["account"])
    assert grant["account_plan"] == attached["id"]
    assert (await api.call("GET", f"/v1/recurring-grants/{grant['id']}"))["periods"] == []
    ctx = app.state.ctx
    for day in ("2024-07-20", "2024-08-05", "2024-08-25"):  # as the workers did on each day
        await recurring_grants.grant_period(ctx, grant["id"], date.fromisoformat(day))
    read = await api.call("GET", f"/v1/recurring-grants/{grant['id']}")
    assert [(p["period_start"], p["period_end"]) for p in reversed(read["periods"])] == [
        ("2024-07-16", "2024-08-01"), ("2024-08-01", "2024-08-20")]
    expected = {"2024-07-16": ("5.16", "2024-08-01"),   # 10 x 16 / 31 = 5.161...
                "2024-08-01": ("6.12", "2024-08-20")}   # 10 x 19 / 31 = 6.129...
    for p in read["periods"]:
        balance = await api.call("GET", f"/v1/balances/{p['balance_id']}")
        granted, expires = expected[p["period_start"]]
        assert balance["granted"] == granted
        assert datetime.fromisoformat(balance["effective_at"]) == _midnight(p["period_start"])
        assert datetime.fromisoformat(balance["expires_at"]) == _midnight(expires)
        # (its grant first: the app's workers may expire it meanwhile, its period long over)
        assert (await _entries(db, p["balance_id"]))[0] == ("grant", D(granted))
    # anniversary billing of the same days: July 16th to August 16th whole, then 4 days
    other = await api.setup()
    await api.call("POST", f"/v1/accounts/{other['account']}/plans", expect=201,
                   json={"plan": plan["code"], "start_date": "2024-07-16",
                         "end_date": "2024-08-20"})
    [grant] = await _grants_of(api, other["account"])
    for day in ("2024-07-16", "2024-08-19"):
        await recurring_grants.grant_period(ctx, grant["id"], date.fromisoformat(day))
    read = await api.call("GET", f"/v1/recurring-grants/{grant['id']}")
    granted = [(p["period_start"], p["period_end"],
                (await api.call("GET", f"/v1/balances/{p['balance_id']}"))["granted"])
               for p in reversed(read["periods"])]
    assert granted == [("2024-07-16", "2024-08-16", "10.00"),
                       ("2024-08-16", "2024-08-20", "1.29")]  # 10 x 4 / 31 = 1.290...


async def test_bad_plan_credits_are_refused_and_change_nothing(
        api: Api, db: asyncpg.Connection) -> None:
    names = await api.setup(decimal_places=2)
    ct = names["credit_type"]
    plans_before = await db.fetchval("SELECT count(*) FROM plans")
    cases: list[tuple[list[dict[str, Any]], str]] = [
        ([{"credit_type": "no-such-type", "amount": "1"}], "credits.0.credit_type"),
        ([{"credit_type": ct, "amount": "1"}, {"credit_type": ct, "amount": "1.001"}],
         "credits.1.amount"),
        ([{"credit_type": ct, "amount": "1", "rollover_max": "0.001"}],
         "credits.0.rollover_max"),
        ([{"credit_type": ct, "amount": "1", "products": ["no-such-product"]}],
         "credits.0.products"),
        ([{"credit_type": ct, "amount": "0"}], "credits.0.amount"),
        ([{"credit_type": ct, "amount": "1", "rollover_percent": "101"}],
         "credits.0.rollover_percent"),
        ([{"amount": "1"}], "credits.0.credit_type"),
        ([{"credit_type": ct, "amount": "1", "frequency": "daily"}], "credits.0.frequency"),
        ([{"credit_type": ct, "amount": "1"}] * 11, "credits"),
    ]
    for credits, field in cases:
        problem = await _plan(api, names, credits, expect=422)
        assert problem["field"] == field, (credits, problem)
    assert await db.fetchval("SELECT count(*) FROM plans") == plans_before
    assert await db.fetchval("SELECT count(*) FROM plan_credits pc JOIN credit_types ct "
                             "ON ct.id = pc.credit_type_id WHERE ct.code = $1", ct) == 0


async def _idle(*_: Any) -> int:
    return 0


async def test_a_period_is_rolled_over_into_the_plans_next_period(
        api: Api, app: Any, db: asyncpg.Connection, monkeypatch: Any) -> None:
    """Calendar billing from July 16th: July's share rolls into August's credits, and waits
    for them while August (counted from the 1st, not from the 16th) is not granted yet."""
    ctx = app.state.ctx
    monkeypatch.setattr("app.workers.grant_recurring", _idle)  # this test plays the workers
    monkeypatch.setattr("app.workers.expire_due", _idle)
    await asyncio.sleep(0.6)  # a worker pass under way ends (they run every 0.5 s in tests)
    names = await api.setup()
    plan = await _plan(api, names, [{"credit_type": names["credit_type"], "amount": "10.00",
                                     "rollover_percent": "100"}])
    await api.call("POST", f"/v1/accounts/{names['account']}/plans", expect=201,
                   json={"plan": plan["code"], "start_date": "2024-07-16",
                         "end_date": "2024-10-01", "billing": "calendar"})
    [grant] = await _grants_of(api, names["account"])
    await recurring_grants.grant_period(ctx, grant["id"], date(2024, 7, 20))
    # (where the workers' cursor stood then: the attach, made today, moved it past the end)
    await db.execute("UPDATE recurring_grants SET next_start = '2024-08-01' WHERE id = $1",
                     grant["id"])
    # August 20th, its credits not granted (a failing pass): July waits for them
    late = datetime(2024, 8, 20, 12, tzinfo=UTC)
    url = f"/v1/recurring-grants/{grant['id']}"
    with monkeypatch.context() as failing:
        failing.setattr(recurring_grants, "_grant_period", _idle)
        await recurring_grants.grant_due(ctx, late)  # (other tests' grants may settle too)
    [july_period] = (await api.call("GET", url))["periods"]
    assert july_period["rolled_over"] is False
    await recurring_grants.grant_due(ctx, late)  # August granted, July settled
    read = await api.call("GET", url)
    july, august = (p["balance_id"] for p in reversed(read["periods"]))
    assert [p["rolled_over"] for p in read["periods"]] == [False, True]
    assert await _entries(db, july) == [("grant", D("5.16")), ("expire", D("-5.16"))]
    assert await _entries(db, august) == [("grant", D("10.00")), ("rollover", D("5.16"))]
