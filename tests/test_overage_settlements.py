"""Overage settlements: a payment of what an account owes, recorded once per reference, never
more than is owed, whatever runs at the same time."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from tests.conftest import Api


def _url(account: str) -> str:
    return f"/v1/accounts/{account}/overage-settlements"


async def _settle(api: Api, account: str, amount: str, reference: str, expect: int = 201,
                  **extra: Any) -> dict[str, Any]:
    result: dict[str, Any] = await api.call("POST", _url(account), expect=expect,
                                            json={"amount": amount, "reference": reference,
                                                  **extra})
    return result


async def _owed(api: Api, account: str) -> str:
    [total] = (await api.live(account))["totals"]
    return str(total["overage"])


async def _owing(api: Api, owed: str) -> dict[str, str]:
    """A fresh account that owes `owed` (1.00 of credit, then a use of 1.00 + owed)."""
    n = await api.setup()
    await api.grant(n["account"], "1.00")
    await api.usage(n["account"], n["api"], str(Decimal(owed) + 1))
    assert await _owed(api, n["account"]) == owed
    return n


async def test_a_settlement_lowers_what_is_owed_once_per_reference(
        api: Api, db: asyncpg.Connection) -> None:
    n = await _owing(api, "3.00")
    out = await _settle(api, n["account"], "2.00", "inv-1", description="invoice 1 paid")
    assert (out["owed_before"], out["owed_after"], out["amount"], out["duplicate"]) == \
        ("3.00", "1.00", "2.00", False)
    assert await _owed(api, n["account"]) == "1.00"
    [entry] = await db.fetch("SELECT kind, amount, description FROM ledger_entries "
                             "WHERE op_key LIKE 'os:%' AND account_id = "
                             "(SELECT id FROM accounts WHERE code = $1)", n["account"])
    assert (entry["kind"], entry["amount"], entry["description"]) == \
        ("overage", Decimal("2.00"), "invoice 1 paid")
    [event] = await db.fetch("SELECT payload::text AS p FROM webhook_events WHERE type = "
                             "'overage.settled' AND payload->'data'->>'account' = $1",
                             n["account"])
    assert json.loads(event["p"])["data"] | {"account": None} == {
        "account": None, "credit_type": n["credit_type"], "reference": "inv-1",
        "amount": "2.00", "owed": "1.00"}

    again = await _settle(api, n["account"], "2.00", "inv-1", expect=200)
    assert (again["duplicate"], again["owed_before"], again["owed_after"]) == (True, None, "1.00")
    other = await _settle(api, n["account"], "1.00", "inv-1", expect=409)
    assert other["field"] == "reference"
    too_much = await _settle(api, n["account"], "1.01", "inv-2", expect=422)
    assert too_much["field"] == "amount" and "1.00 owed" in too_much["detail"]
    last = await _settle(api, n["account"], "1.00", "inv-2")
    assert last["owed_after"] == "0.00" and await _owed(api, n["account"]) == "0.00"
    # the ledger's view agrees with the hot copy
    at = await api.call("GET", f"/v1/accounts/{n['account']}/balance-at",
                        params={"at": "2100-01-01T00:00:00Z"})
    assert at["totals"][0]["overage"] == "0.00"


async def test_concurrent_settlements_never_take_more_than_is_owed(
        api: Api, client: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    n = await _owing(api, "10.00")
    answers = await asyncio.gather(*(
        client.post(_url(n["account"]), headers=api.admin,
                    json={"amount": "3.00", "reference": f"pay-{i}"}) for i in range(10)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 3 + [422] * 7, [r.text for r in answers]
    await redis.flushall()  # rebuilt from Postgres: the same
    assert await _owed(api, n["account"]) == "1.00"


async def test_overage_still_in_the_journal_can_be_settled(
        api: Api, app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    n = await _owing(api, "1.00")
    journal = app.state.ctx.journal
    real = journal.commit

    async def dies(records: Any) -> Any:  # the use is decided in Redis, its commit never comes
        raise RuntimeError("killed")

    monkeypatch.setattr(journal, "commit", dies)
    await api.usage(n["account"], n["api"], "2.00", expect=500)
    monkeypatch.setattr(journal, "commit", real)
    assert await _owed(api, n["account"]) == "3.00"
    out = await _settle(api, n["account"], "3.00", "all")  # the journal is flushed first
    assert (out["owed_before"], out["owed_after"]) == ("3.00", "0.00")
    assert await _owed(api, n["account"]) == "0.00"


async def test_bad_settlements_are_refused_and_change_nothing(
        api: Api, db: asyncpg.Connection) -> None:
    n = await _owing(api, "2.00")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"amount": "0", "reference": "a"}, 422, "amount"),
        ({"amount": "-1.00", "reference": "a"}, 422, "amount"),
        ({"amount": "0.001", "reference": "a"}, 422, "amount"),
        ({"amount": "x", "reference": "a"}, 422, "amount"),
        ({"amount": "1.00"}, 422, "reference"),
        ({"amount": "1.00", "reference": "has space"}, 422, "reference"),
        ({"amount": "1.00", "reference": "a", "credit_type": "nope"}, 422, "credit_type"),
        ({"amount": "1.00", "reference": "a", "extra": 1}, 422, "extra"),
    ]
    for body, status, field in cases:
        problem = await api.call("POST", _url(n["account"]), expect=status, json=body)
        assert problem["field"] == field, (body, problem)
    missing = await api.call("POST", _url("no-such-account"), expect=404,
                             json={"amount": "1.00", "reference": "a"})
    assert missing["field"] == "code"
    runtime = await api.call("POST", _url(n["account"]), scope="runtime", expect=403,
                             json={"amount": "1.00", "reference": "a"})
    assert runtime["status"] == 403
    assert await db.fetchval("SELECT count(*) FROM ledger_entries WHERE op_key LIKE 'os:%' "
                             "AND account_id = (SELECT id FROM accounts WHERE code = $1)",
                             n["account"]) == 0
    assert await _owed(api, n["account"]) == "2.00"
