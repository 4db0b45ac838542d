"""Rating under failure (DESIGN invariants 3, 4 and 8) with real app processes: `kill -9` of
one while measurements stream into both, and FLUSHALL twice under the same load. Every
acknowledged measurement is stored and rated once; sent again, each is a duplicate; and once
the survivors' workers have repaired what was cut short (debits a crash left unsent, journal
entries a dead process left), what real-time drawdown took equals the price of the final
aggregates."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal as D
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from app.settings import Settings
from tests.procs import account_id, call_as, run_apps
from tests.test_durability import eventually
from tests.test_rating_property import (
    _setup,
    drawn_from,
    expected_drawn,
    measurements,
    on_the_plan,
)


async def _post(client: httpx.AsyncClient, runtime: str,
                item: dict[str, Any]) -> httpx.Response | None:
    try:
        return await client.post("/v1/measurements", json=item,
                                 headers={"Authorization": f"Bearer {runtime}"})
    except httpx.HTTPError:
        return None


def _acknowledged(items: list[dict[str, Any]], results: list[httpx.Response | None]) -> set[str]:
    """The uids answered `rated`; every other answer is none (cut off) or a retryable 503."""
    acked, odd = set(), {}
    for item, r in zip(items, results, strict=True):
        if r is not None and r.status_code == 200 and r.json()["status"] == "rated":
            acked.add(item["uid"])
        elif r is not None:
            odd[item["uid"]] = (r.status_code, r.text[:200])
    assert all(code == 503 for code, _ in odd.values()), odd
    return acked


async def _all_again_and_settled(client: httpx.AsyncClient, runtime: str, account: str,
                                 items: list[dict[str, Any]], acked: set[str],
                                 amounts: list[D], db: asyncpg.Connection) -> None:
    """Every measurement sent again: the acknowledged ones are duplicates; then each is stored
    once and, once the workers repaired what was cut short, the drawdown is the price."""
    again = await call_as(client, runtime, "POST", "/v1/measurements",
                          json={"measurements": items})
    statuses = {r["uid"]: r["status"] for r in again["results"]}
    assert {statuses[uid] for uid in acked} <= {"duplicate"}
    assert set(statuses.values()) <= {"rated", "duplicate"}, again
    aid = await account_id(db, account)
    stored = await db.fetch("SELECT uid, count(*) AS n FROM measurements WHERE account_id = $1 "
                            "GROUP BY uid", aid)
    assert {r["uid"]: r["n"] for r in stored} == {i["uid"]: 1 for i in items}
    expected = expected_drawn(amounts)

    async def settled() -> bool:
        return await drawn_from(client, runtime, account) == expected

    assert await eventually(settled, 30.0), (await drawn_from(client, runtime, account),
                                             expected)

    # and the ledger agrees: a debit the victim decided in Redis but never committed is
    # committed by the survivor's sweep of orphaned journal entries, a few seconds on
    async def ledger() -> D:
        total: D = await db.fetchval(
            "SELECT sum(amount) FROM ledger_entries WHERE account_id = $1", aid)
        return total

    async def committed() -> bool:
        return await ledger() == D(100000) - expected

    assert await eventually(committed, 30.0), (await ledger(), expected)


async def test_kill_9_under_measurement_load_rates_every_acknowledged_one_once(
        settings: Settings, keys: dict[str, str], db: asyncpg.Connection) -> None:
    rng = random.Random(9)
    amounts = [D(rng.randint(0, 20_000)).scaleb(-3) for _ in range(600)]
    async with run_apps(settings, 2) as apps:
        victim = apps[0]
        a, b = apps[0].client(), apps[1].client()
        try:
            names = await _setup(b, keys["admin"])
            account = await on_the_plan(b, keys["admin"], names)
            items = measurements(account, names, amounts, prefix="k")
            order = list(range(len(items)))
            rng.shuffle(order)
            on_a = set(order[:450])
            done_on_a, enough = 0, asyncio.Event()

            async def send(i: int) -> httpx.Response | None:
                nonlocal done_on_a
                response = await _post(a if i in on_a else b, keys["runtime"], items[i])
                if i in on_a and response is not None:
                    done_on_a += 1
                    if done_on_a >= 100:
                        enough.set()
                return response

            async def killer() -> None:
                await asyncio.wait_for(enough.wait(), 30)
                victim.kill()

            results, _ = await asyncio.gather(
                asyncio.gather(*(send(i) for i in range(len(items)))), killer())
            assert not victim.alive
            acked = _acknowledged(items, list(results))
            assert any(results[i] is None for i in on_a), "nothing was in flight on the victim"
            assert len(acked & {items[i]["uid"] for i in on_a}) >= 100
            await _all_again_and_settled(b, keys["runtime"], account, items, acked, amounts, db)
        finally:
            await a.aclose()
            await b.aclose()
        assert not apps.tracebacks(), apps.tracebacks()


async def test_flushall_under_measurement_load_loses_nothing(
        settings: Settings, keys: dict[str, str], db: asyncpg.Connection,
        redis: aioredis.Redis) -> None:
    rng = random.Random(17)
    amounts = [D(rng.randint(0, 20_000)).scaleb(-3) for _ in range(500)]
    async with run_apps(settings, 2) as apps:
        a, b = apps[0].client(), apps[1].client()
        try:
            names = await _setup(a, keys["admin"])
            account = await on_the_plan(a, keys["admin"], names)
            items = measurements(account, names, amounts, prefix="f")

            async def flusher() -> None:
                for _ in range(2):
                    await asyncio.sleep(0.4)
                    await redis.flushall()

            results, _ = await asyncio.gather(
                asyncio.gather(*(_post((a, b)[i % 2], keys["runtime"], item)
                                 for i, item in enumerate(items))), flusher())
            acked = _acknowledged(items, list(results))
            assert acked, "nothing was acknowledged"
            await _all_again_and_settled(a, keys["runtime"], account, items, acked, amounts, db)
        finally:
            await a.aclose()
            await b.aclose()
        assert not apps.tracebacks(), apps.tracebacks()
