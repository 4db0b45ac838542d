"""Events are written to the outbox in the transaction of the change that caused them."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from app.hotstate.keys import Keys
from app.settings import Settings
from tests.conftest import Api


async def events(db: asyncpg.Connection, account: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT e.id, e.payload FROM webhook_events e JOIN accounts a ON a.id = e.account_id
           WHERE a.code = $1 ORDER BY e.sequence, e.type""", account)
    return [json.loads(r["payload"]) | {"id": r["id"]} for r in rows]


def kinds(evts: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in evts]


async def test_grant_debits_and_void_raise_events_in_order(api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    acct, product = n["account"], n["api"]
    await api.call("PUT", f"/v1/accounts/{acct}/thresholds/{n['credit_type']}", json={"low": "5.00"})
    grant = await api.grant(acct, "10.00")
    await api.usage(acct, product, "4.00")
    await api.usage(acct, product, "2.00")  # 4.00 left: below 5.00
    await api.usage(acct, product, "1.00")  # still below: no second balance.low
    await api.usage(acct, product, "3.00")  # 0 left: depleted
    top_up = await api.grant(acct, "20.00")  # recovered, and the threshold re-arms
    await api.usage(acct, product, "16.00")  # 4.00 left: below again
    await api.call("POST", f"/v1/balances/{top_up['id']}/void", json={})
    evts = await events(db, acct)
    assert kinds(evts) == [
        "credits.granted", "balance.low", "balance.depleted", "entitlement.revoked",
        "balance.recovered", "credits.granted", "entitlement.granted", "balance.low",
        "balance.depleted", "credits.voided", "entitlement.revoked"]
    low = evts[1]
    assert low["data"] == {"account": acct, "credit_type": n["credit_type"], "threshold": "5.00",
                           "available": "4.00", "sequence": low["data"]["sequence"]}
    assert evts[0]["data"]["balance_id"] == grant["id"] and evts[0]["data"]["amount"] == "10.00"
    assert evts[2]["data"]["product"] == product and evts[2]["data"]["available"] == "0.00"
    assert evts[-2]["data"]["amount"] == "4.00"
    sequences = [e["data"]["sequence"] for e in evts]
    assert sequences == sorted(sequences)


async def test_rebuilt_hot_state_does_not_fire_a_crossing_again(
        api: Api, db: asyncpg.Connection, redis: aioredis.Redis, settings: Settings) -> None:
    n = await api.setup()
    acct = n["account"]
    await api.call("PUT", f"/v1/accounts/{acct}/thresholds/{n['credit_type']}", json={"low": "5.00"})
    await api.grant(acct, "6.00")
    await api.usage(acct, n["api"], "2.00")
    root = await db.fetchval("SELECT root_id FROM accounts WHERE code = $1", acct)
    await redis.delete(Keys(settings.redis_prefix).root(root))
    await api.usage(acct, n["api"], "1.00")
    assert kinds(await events(db, acct)).count("balance.low") == 1


async def test_replayed_uid_raises_no_second_event(api: Api, db: asyncpg.Connection,
                                                   redis: aioredis.Redis, settings: Settings) -> None:
    n = await api.setup()
    acct = n["account"]
    await api.grant(acct, "1.00")
    await api.usage(acct, n["api"], "1.00", uid="drain-1")
    # Redis forgets everything; the replay is caught by Postgres and must not flip flags again
    root = await db.fetchval("SELECT root_id FROM accounts WHERE code = $1", acct)
    await redis.delete(Keys(settings.redis_prefix).root(root))
    assert (await api.usage(acct, n["api"], "1.00", uid="drain-1"))["status"] == "duplicate"
    assert kinds(await events(db, acct)).count("entitlement.revoked") == 1
    assert await api.available(acct) == "0.00"
