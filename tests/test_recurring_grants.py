"""Recurring grants: credits every period, each period's expiring at its end, what it leaves
unused rolled over into the next up to a percentage and a cap; once each, whoever runs it."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from app.ledger import recurring_grants
from tests.conftest import Api


async def _entries(db: asyncpg.Connection, balance_id: int) -> list[tuple[str, Decimal]]:
    rows = await db.fetch("SELECT kind, amount FROM ledger_entries WHERE balance_id = $1 "
                          "ORDER BY id", balance_id)
    return [(r["kind"], Decimal(r["amount"])) for r in rows]


async def _create(api: Api, account: str, **body: Any) -> dict[str, Any]:
    result: dict[str, Any] = await api.call("POST", f"/v1/accounts/{account}/recurring-grants",
                                            expect=201, json=body)
    return result


async def test_the_period_under_way_is_granted_at_once_and_expires_at_its_end(
        api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    today = datetime.now(UTC).date()
    created = await _create(api, n["account"], amount="25.00", frequency="monthly",
                            products=[n["api"]], priority=5, description="monthly allotment")
    assert (created["amount"], created["start"], created["interval"]) == \
        ("25.00", today.isoformat(), 1)
    [period] = created["periods"]
    assert period["period_start"] == today.isoformat() and period["rolled_over"] is False
    balance = await api.call("GET", f"/v1/balances/{period['balance_id']}")
    month_on = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    assert (balance["granted"], balance["source"], balance["products"], balance["priority"]) == \
        ("25.00", "recurring", [n["api"]], 5)
    assert datetime.fromisoformat(balance["expires_at"]) == \
        datetime.combine(date.fromisoformat(period["period_end"]), time(0), UTC)
    assert date.fromisoformat(period["period_end"]) <= month_on + timedelta(days=30)
    assert created["next_start"] == period["period_end"]
    assert await api.available(n["account"]) == "25.00"
    assert (await api.check(n["account"], n["storage"]))["reason"] == "no_eligible_balance"
    # the workers' pass (and any number of them) grants nothing more this period
    for _ in range(3):
        await asyncio.gather(*(api.call("GET", f"/v1/recurring-grants/{created['id']}")
                               for _ in range(2)))
    listed = await api.call("GET", f"/v1/accounts/{n['account']}/recurring-grants")
    assert [g["id"] for g in listed["data"]] == [created["id"]]
    assert await db.fetchval("SELECT count(*) FROM balances b JOIN accounts a ON "
                             "a.id = b.account_id WHERE a.code = $1", n["account"]) == 1


async def _idle(*_: Any) -> int:
    return 0


async def test_what_a_period_leaves_unused_rolls_over_up_to_the_percentage_and_cap(
        api: Api, app: Any, db: asyncpg.Connection, redis: aioredis.Redis,
        monkeypatch: Any) -> None:
    """Yesterday's and today's periods of two daily grants: 10.00 rolling over 50% up to 3,
    and 10.03 rolling over 33% (rounded down) with no cap."""
    ctx = app.state.ctx
    # the app's own workers would settle (or expire) yesterday before the late event below
    # is recorded: this test plays the workers itself
    monkeypatch.setattr("app.workers.grant_recurring", _idle)
    monkeypatch.setattr("app.workers.expire_due", _idle)
    await asyncio.sleep(0.6)  # a worker pass under way ends (they run every 0.5 s in tests)
    n = await api.setup()
    today = datetime.now(UTC).date()
    yesterday = (today - timedelta(days=1)).isoformat()
    capped = await _create(api, n["account"], amount="10.00", frequency="daily", start=yesterday,
                           products=[n["api"]], rollover_percent="50", rollover_max="3")
    uncapped = await _create(api, n["account"], amount="10.03", frequency="daily",
                             start=yesterday, products=[n["storage"]], rollover_percent="33")
    balances = {}
    for grant in (capped, uncapped):  # yesterday's, as the workers granted it yesterday
        assert await recurring_grants.grant_period(ctx, grant["id"], today - timedelta(days=1))
        read = await api.call("GET", f"/v1/recurring-grants/{grant['id']}")
        balances[grant["id"]] = {p["period_start"]: p["balance_id"] for p in read["periods"]}
    # 2 used yesterday (a late event carries its own timestamp): 8 left unused
    at = datetime.combine(today - timedelta(days=1), time(13), UTC).isoformat()
    await api.usage(n["account"], n["api"], "2.00", timestamp=at)

    # the workers of several processes settle yesterday at once
    assert sum(await asyncio.gather(*(recurring_grants.grant_due(ctx) for _ in range(4)))) >= 2
    old, new = (balances[capped["id"]][d] for d in (yesterday, today.isoformat()))
    assert await _entries(db, old) == [("grant", Decimal("10.00")), ("debit", Decimal("-2.00")),
                                       ("expire", Decimal("-8.00"))]
    assert await _entries(db, new) == [("grant", Decimal("10.00")),  # 50% of 8, capped at 3
                                       ("rollover", Decimal("3.00"))]
    old_u, new_u = (balances[uncapped["id"]][d] for d in (yesterday, today.isoformat()))
    assert await _entries(db, old_u) == [("grant", Decimal("10.03")),
                                         ("expire", Decimal("-10.03"))]
    assert await _entries(db, new_u) == [("grant", Decimal("10.03")),  # 33% of 10.03 = 3.3099
                                         ("rollover", Decimal("3.30"))]
    assert await api.available(n["account"]) == "26.33"
    read = await api.call("GET", f"/v1/recurring-grants/{capped['id']}")
    assert [p["rolled_over"] for p in read["periods"]] == [False, True]  # newest first
    events = await db.fetch(
        "SELECT payload FROM webhook_events e JOIN accounts a ON a.id = e.account_id "
        "WHERE a.code = $1 AND e.type = 'credits.rolled_over' ORDER BY e.sequence", n["account"])
    assert sorted((json.loads(e["payload"])["data"]["amount"],
                   json.loads(e["payload"])["data"]["from_balance_id"],
                   json.loads(e["payload"])["data"]["balance_id"]) for e in events) == \
        [("3.00", old, new), ("3.30", old_u, new_u)]

    # a receiver may subscribe to the new type by name
    hook = await api.call("POST", "/v1/webhook-endpoints", expect=201, json={
        "url": "http://127.0.0.1:9/hooks", "event_types": ["credits.rolled_over"],
        "enabled": False})
    assert hook["event_types"] == ["credits.rolled_over"]

    # again, and after Redis forgot everything: nothing moves twice
    assert await recurring_grants.grant_due(ctx) == 0
    await redis.flushall()
    assert await recurring_grants.grant_due(ctx) == 0
    assert await api.available(n["account"]) == "26.33"
    assert await _entries(db, new) == [("grant", Decimal("10.00")),
                                       ("rollover", Decimal("3.00"))]


async def test_no_rollover_without_terms_or_after_the_last_period(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    ctx = app.state.ctx
    n = await api.setup()
    today = datetime.now(UTC).date()
    plain = await _create(api, n["account"], amount="4.00", frequency="daily",
                          start=(today - timedelta(days=1)).isoformat())
    ending = await _create(api, n["account"], amount="6.00", frequency="daily",
                           start=(today - timedelta(days=1)).isoformat(),
                           end=today.isoformat(), rollover_percent="100")
    assert ending["periods"] == []  # its last period was yesterday, over before it was created
    for grant in (plain, ending):
        await recurring_grants.grant_period(ctx, grant["id"], today - timedelta(days=1))
    await recurring_grants.grant_due(ctx)
    for grant in (plain, ending):
        read = await api.call("GET", f"/v1/recurring-grants/{grant['id']}")
        yesterday = next(p for p in read["periods"]
                     if p["period_start"] == (today - timedelta(days=1)).isoformat())
        assert yesterday["rolled_over"] is True
        kinds = [k for k, _ in await _entries(db, yesterday["balance_id"])]
        assert kinds == ["grant", "expire"]
    assert await api.available(n["account"]) == "4.00"  # today's period of `plain` only
    assert await db.fetchval("SELECT count(*) FROM ledger_entries WHERE kind = 'rollover' "
                             "AND account_id = (SELECT id FROM accounts WHERE code = $1)",
                             n["account"]) == 0


async def test_ending_a_recurring_grant(api: Api) -> None:
    n = await api.setup()
    created = await _create(api, n["account"], amount="1.00", frequency="monthly", interval=3)
    url = f"/v1/recurring-grants/{created['id']}/end"
    ended = await api.call("POST", url, json={})
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    assert ended["end"] == tomorrow.isoformat() and len(ended["periods"]) == 1
    problem = await api.call("POST", url, expect=422, json={"end": created["start"]})
    assert problem["field"] == "end"
    for bad in ("0", "no-such", "99999999999999999999"):
        problem = await api.call("POST", f"/v1/recurring-grants/{bad}/end", expect=404, json={})
        assert problem["field"] == "id"


async def test_bad_recurring_grants_are_refused_and_change_nothing(
        api: Api, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    n = await api.setup()
    url = f"/v1/accounts/{n['account']}/recurring-grants"
    good = {"amount": "5.00", "frequency": "monthly"}
    for change, field in [
            ({"amount": "0"}, "amount"), ({"amount": "-1"}, "amount"),
            ({"amount": "1.001"}, "amount"), ({"amount": [1]}, "amount"),
            ({"frequency": "weekly"}, "frequency"), ({"interval": 0}, "interval"),
            ({"start": "2026-02-30"}, "start"), ({"end": "1999-12-31"}, "end"),
            ({"start": "2026-06-01", "end": "2026-06-01"}, "end"),
            ({"products": ["no-such-product"]}, "products"),
            ({"credit_type": "no-such-type"}, "credit_type"),
            ({"rollover_percent": "100.5"}, "rollover_percent"),
            ({"rollover_max": "-1"}, "rollover_max"), ({"rollover_max": "0.001"}, "rollover_max"),
            ({"every": "month"}, "every")]:
        response = await client.post(url, headers=api.admin, json={**good, **change})
        assert response.status_code == 422, (change, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["field"] == field, (change, response.text)
    missing = await client.post("/v1/accounts/no-such-account/recurring-grants",
                                headers=api.admin, json=good)
    assert missing.status_code == 404 and missing.json()["field"] == "account"
    assert await db.fetchval("SELECT count(*) FROM recurring_grants g JOIN accounts a ON "
                             "a.id = g.account_id WHERE a.code = $1", n["account"]) == 0
    assert await api.available(n["account"]) == "0"
    key = f"rg-{uuid.uuid4().hex}"
    first = await api.call("POST", url, expect=201, json=good, headers={"Idempotency-Key": key})
    again = await api.call("POST", url, expect=201, json=good, headers={"Idempotency-Key": key})
    assert again == first and await api.available(n["account"]) == "5.00"


async def test_a_store_failure_after_the_commit_leaves_the_first_period_to_the_workers(
        api: Api, app: Any, monkeypatch: Any) -> None:
    """Redis unreachable while the first period is granted: the recurring grant is made (201,
    so a retry does not make a second one) and the next worker pass grants the period."""
    from app.errors import Unavailable

    n = await api.setup()

    async def down(*_: Any) -> int:
        raise Unavailable("hot state unreachable")

    monkeypatch.setattr(recurring_grants, "grant_period", down)
    created = await _create(api, n["account"], amount="7.00", frequency="monthly")
    assert created["periods"] == [] and await api.available(n["account"]) == "0"
    monkeypatch.undo()
    await recurring_grants.grant_due(app.state.ctx)  # (or the app's own workers did already)
    read = await api.call("GET", f"/v1/recurring-grants/{created['id']}")
    assert len(read["periods"]) == 1 and await api.available(n["account"]) == "7.00"
