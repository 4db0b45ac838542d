"""credits.expiring: each balance with credit left is announced once, some days before it
expires, whatever number of processes run the workers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from app.ledger.expiry_notices import announce_due
from app.settings import Settings
from tests.conftest import Api
from tests.procs import run_apps


def _in(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat().replace("+00:00", "Z")


async def _notices(db: asyncpg.Connection, account: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT e.payload FROM webhook_events e JOIN accounts a ON a.id = e.account_id
           WHERE a.code = $1 AND e.type = 'credits.expiring' ORDER BY e.created_at, e.id""",
        account)
    return [json.loads(r["payload"])["data"] for r in rows]


async def _until(probe: Any, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await probe():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.1)


async def test_a_balance_is_announced_once_before_it_expires_with_what_is_left(
        api: Api, db: asyncpg.Connection, app: Any) -> None:
    # expiring in 8 days: the session's workers (7 days' notice) leave them to this test's
    # passes (9 days), which come after the usage
    n = await api.setup()
    soon = await api.grant(n["account"], "10.00", priority=1, expires_at=_in(timedelta(days=8)),
                           products=[n["api"]], source="promotion")
    later = await api.grant(n["account"], "5.00", expires_at=_in(timedelta(days=10)))
    forever = await api.grant(n["account"], "5.00")
    spent = await api.grant(n["account"], "1.00", priority=0, expires_at=_in(timedelta(days=8)))
    await api.usage(n["account"], n["api"], "5.00")  # 1.00 from `spent`, 4.00 from `soon`

    ctx = app.state.ctx
    nine = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, expiry_notice_d=9))
    await asyncio.gather(*(announce_due(nine) for _ in range(4)))  # racing passes
    await announce_due(nine)  # and one more
    [notice] = await _notices(db, n["account"])
    assert notice == {"account": n["account"], "balance_id": soon["id"],
                      "credit_type": n["credit_type"], "amount": "6.00",
                      "expires_at": soon["expires_at"].replace("+00:00", "Z"),
                      "products": [n["api"]], "source": "promotion"}
    # the one used up is marked without an event; those that expire later or never are not
    marked = await db.fetch("SELECT id FROM balances WHERE id = ANY($1) AND "
                            "expiry_noticed_at IS NOT NULL ORDER BY id",
                            [soon["id"], later["id"], forever["id"], spent["id"]])
    assert [r["id"] for r in marked] == [soon["id"], spent["id"]]


async def test_the_notice_period_is_a_setting_and_a_voided_balance_is_not_announced(
        api: Api, db: asyncpg.Connection, app: Any) -> None:
    n = await api.setup()
    kept = await api.grant(n["account"], "2.50", expires_at=_in(timedelta(days=8)))
    voided = await api.grant(n["account"], "3.00", expires_at=_in(timedelta(days=8, hours=1)))
    await api.call("POST", f"/v1/balances/{voided['id']}/void", json={})
    ctx = app.state.ctx
    off = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, expiry_notice_d=0))
    assert await announce_due(off) == 0
    await asyncio.sleep(1.2)  # the session's workers (7 days) pass over both
    assert await _notices(db, n["account"]) == []

    nine = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, expiry_notice_d=9))
    await announce_due(nine)
    assert [(x["balance_id"], x["amount"]) for x in await _notices(db, n["account"])] == [
        (kept["id"], "2.50")]


async def test_processes_racing_announce_each_balance_once(
        settings: Settings, api: Api, db: asyncpg.Connection, app: Any) -> None:
    n = await api.setup()
    async with run_apps(settings, 2, env={"CREDITGATE_WORKER_INTERVAL_S": "0.05"}):
        grants = [await api.grant(n["account"], f"{i + 1}.00",
                                  expires_at=_in(timedelta(days=1, minutes=i)))
                  for i in range(30)]
        ids = [g["id"] for g in grants]

        async def all_noticed() -> bool:
            return bool(await db.fetchval(
                "SELECT bool_and(expiry_noticed_at IS NOT NULL) FROM balances WHERE id = ANY($1)",
                ids))

        await _until(all_noticed)
    notices = await _notices(db, n["account"])
    assert sorted(x["balance_id"] for x in notices) == ids
    assert sum(Decimal(x["amount"]) for x in notices) == sum(Decimal(i + 1) for i in range(30))
