"""Usage reversals: a usage event's debit given back once, overage first, then the balances it
drew (last drawn first), keyed so that retries and concurrent callers give back once."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from app.entitlements import reversals
from app.settings import Settings
from tests.conftest import Api
from tests.procs import run_apps


def _url(account: str, uid: str) -> str:
    return f"/v1/accounts/{account}/usage-events/{uid}"


async def _reverse(api: Api, account: str, uid: str, expect: int = 201,
                   **body: Any) -> dict[str, Any]:
    result: dict[str, Any] = await api.call("POST", _url(account, uid) + "/reverse",
                                            scope="runtime", expect=expect, json=body)
    return result


async def _reversal_entries(db: asyncpg.Connection, account: str,
                            uid: str) -> list[tuple[str, Any, Decimal]]:
    """The entries of the account's reversal of `uid` (other tests' accounts use the same uids)."""
    rows = await db.fetch(
        """SELECT e.kind, e.balance_id, e.amount FROM ledger_entries e
           WHERE e.op_key LIKE 'ur:' || (SELECT id FROM accounts WHERE code = $1) || ':%'
             AND e.usage_uid = $2 ORDER BY e.id""", account, uid)
    return [(r["kind"], r["balance_id"], Decimal(r["amount"])) for r in rows]


async def _totals(api: Api, account: str) -> tuple[str, str]:
    [total] = (await api.live(account))["totals"]
    return str(total["available"]), str(total["overage"])


async def test_a_full_reversal_takes_the_overage_back_then_refills_the_balances(
        api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    first = await api.grant(n["account"], "5.00", priority=1)
    second = await api.grant(n["account"], "3.00", priority=2)
    await api.usage(n["account"], n["api"], "10.00", uid="job-1")
    assert await _totals(api, n["account"]) == ("0.00", "2.00")
    assert (await api.check(n["account"], n["api"]))["allowed"] is False

    out = await _reverse(api, n["account"], "job-1", reason="counted twice")
    assert (out["status"], out["amount"], out["overage_reversed"], out["duplicate"]) == \
        ("reversed", "10.00", "2.00", False)
    assert out["returned"] == [{"balance_id": second["id"], "amount": "3.00"},
                               {"balance_id": first["id"], "amount": "5.00"}]
    assert out["lapsed"] == [] and out["reason"] == "counted twice"
    assert await _totals(api, n["account"]) == ("8.00", "0.00")
    assert (await api.check(n["account"], n["api"]))["allowed"] is True
    assert await _reversal_entries(db, n["account"], "job-1") == [
        ("overage", None, Decimal("2.00")), ("adjustment", second["id"], Decimal("3.00")),
        ("adjustment", first["id"], Decimal("5.00"))]

    # the same reversal again: the same answer, nothing moves; another amount is a conflict
    again = await _reverse(api, n["account"], "job-1", expect=200)
    assert again["duplicate"] is True and again["returned"] == out["returned"]
    other = await _reverse(api, n["account"], "job-1", expect=409, amount="1.00")
    assert other["field"] == "uid"
    assert len(await _reversal_entries(db, n["account"], "job-1")) == 3
    assert await _totals(api, n["account"]) == ("8.00", "0.00")

    event = await api.call("GET", _url(n["account"], "job-1"), scope="runtime")
    assert (event["amount"], event["overage"], event["product"]) == ("10.00", "2.00", n["api"])
    assert event["drawn"] == [{"balance_id": first["id"], "amount": "5.00"},
                              {"balance_id": second["id"], "amount": "3.00"}]
    assert event["reversal"]["returned"] == out["returned"]


async def test_a_partial_reversal_and_a_balance_gone_since(
        api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    first = await api.grant(n["account"], "4.00", priority=1)
    second = await api.grant(n["account"], "4.00", priority=2)
    await api.usage(n["account"], n["api"], "6.00", uid="a")  # 4.00 from first, 2.00 second
    partial = await _reverse(api, n["account"], "a", amount="2.50")
    assert partial["returned"] == [{"balance_id": second["id"], "amount": "2.00"},
                                   {"balance_id": first["id"], "amount": "0.50"}]
    assert partial["overage_reversed"] == "0.00"
    assert await _totals(api, n["account"]) == ("4.50", "0.00")

    await api.usage(n["account"], n["api"], "4.50", uid="b")  # 0.50 first, 4.00 second
    await api.call("POST", f"/v1/balances/{second['id']}/void", json={})
    out = await _reverse(api, n["account"], "b")
    # the voided balance's part lapses (that credit is gone anyway); the first gets its 0.50
    assert out["returned"] == [{"balance_id": first["id"], "amount": "0.50"}]
    assert out["lapsed"] == [{"balance_id": second["id"], "amount": "4.00"}]
    assert await _totals(api, n["account"]) == ("0.50", "0.00")
    assert await _reversal_entries(db, n["account"], "b") == [
        ("adjustment", first["id"], Decimal("0.50"))]


async def test_bad_reversals_are_refused_and_change_nothing(
        api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    await api.grant(n["account"], "5.00")
    await api.usage(n["account"], n["api"], "2.00", uid="u1")
    cases = [
        ("u1", {"amount": "2.01"}, 422, "amount"),
        ("u1", {"amount": "0"}, 422, "amount"),
        ("u1", {"amount": "-1.00"}, 422, "amount"),
        ("u1", {"amount": "0.001"}, 422, "amount"),
        ("u1", {"amount": "abc"}, 422, "amount"),
        ("u1", {"reason": 7}, 422, "reason"),
        ("u1", {"extra": 1}, 422, "extra"),
        ("nope", {}, 404, "uid"),
        ("r12:x", {}, 422, "uid"),
        ("h0:x", {}, 422, "uid"),
    ]
    for uid, body, status, field in cases:
        problem = await _reverse(api, n["account"], uid, expect=status, **body)
        assert problem["field"] == field, (uid, body, problem)
    problem = await _reverse(api, "no-such-account", "u1", expect=404)
    assert problem["field"] == "code"
    await api.call("GET", _url(n["account"], "nope"), scope="runtime", expect=404)
    assert await db.fetchval("SELECT count(*) FROM usage_reversals r JOIN accounts a "
                             "ON a.id = r.account_id WHERE a.code = $1", n["account"]) == 0
    assert await _totals(api, n["account"]) == ("3.00", "0.00")


async def test_concurrent_reversals_from_two_processes_give_back_once_and_survive_a_flush(
        api: Api, settings: Settings, db: asyncpg.Connection, redis: aioredis.Redis) -> None:
    n = await api.setup()
    await api.grant(n["account"], "10.00", priority=1)
    await api.grant(n["account"], "10.00", priority=2)
    for i in range(20):
        await api.usage(n["account"], n["api"], "1.50", uid=f"e{i}")  # 30.00: 10.00 overage
    async with run_apps(settings, 2) as apps:
        async with apps[0].client() as one, apps[1].client() as two:
            async def reverse(i: int, client: httpx.AsyncClient) -> httpx.Response:
                return await client.post(_url(n["account"], f"e{i % 20}") + "/reverse",
                                         headers=api.runtime, json={})

            answers = await asyncio.gather(*(reverse(i, (one, two)[i % 2]) for i in range(60)))
            codes = [r.status_code for r in answers]
            assert codes.count(201) == 20 and codes.count(200) == 40, \
                [r.text for r in answers if r.status_code not in (200, 201)]
            await redis.flushall()  # the hot copy is rebuilt from Postgres: reversals included
            live = await one.get(f"/v1/accounts/{n['account']}/balances", headers=api.runtime)
            assert live.json()["totals"][0]["available"] == "20.00"
            assert live.json()["totals"][0]["overage"] == "0.00"
        assert apps.tracebacks() == ""
    given = await db.fetchval("SELECT sum(amount) FROM ledger_entries WHERE op_key LIKE 'ur:%' "
                              "AND account_id = (SELECT id FROM accounts WHERE code = $1)",
                              n["account"])
    assert given == Decimal("30.00")


async def test_a_reversal_cut_short_is_finished_by_the_workers(
        api: Api, app: Any, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    n = await api.setup()
    first = await api.grant(n["account"], "2.00", priority=1)
    second = await api.grant(n["account"], "2.00", priority=2)
    await api.usage(n["account"], n["api"], "4.00", uid="x")
    real = reversals.credit_back
    calls = 0

    async def dies_after_one(*args: Any, **kwargs: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("killed")
        return await real(*args, **kwargs)

    monkeypatch.setattr(reversals, "credit_back", dies_after_one)
    await _reverse(api, n["account"], "x", expect=500)
    assert await _reversal_entries(db, n["account"], "x") == [
        ("adjustment", second["id"], Decimal("2.00"))]
    monkeypatch.setattr(reversals, "credit_back", real)
    ctx = app.state.ctx
    assert await reversals.settle(ctx) == 0  # not stuck long enough yet: its caller may be alive
    await db.execute("UPDATE usage_reversals SET updated_at = now() - interval '1 minute' "
                     "WHERE uid = 'x'")
    assert await reversals.settle(ctx) == 1
    assert await _reversal_entries(db, n["account"], "x") == [
        ("adjustment", second["id"], Decimal("2.00")), ("adjustment", first["id"], Decimal("2.00"))]
    out = (await api.call("GET", _url(n["account"], "x"), scope="runtime"))["reversal"]
    assert out["status"] == "reversed" and len(out["returned"]) == 2
    assert await _totals(api, n["account"]) == ("4.00", "0.00")
