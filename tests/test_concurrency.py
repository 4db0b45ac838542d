"""Concurrency (DESIGN invariant 5): many requests through two real app processes at once.

Every final state is exact: the Postgres ledger, the usage events and the real-time view of
each process agree to the cent, nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from app.settings import Settings
from tests.conftest import Api, now_iso
from tests.procs import (
    AppProcesses,
    account_id,
    balance_sum,
    entries_by_uid,
    kind_sum,
    live_remaining,
    live_total,
    run_apps,
    usage_rows,
)


@pytest.fixture(scope="module")
async def apps(settings: Settings) -> AsyncIterator[AppProcesses]:
    # the workers' sampled hot-state check at every pass, while the tests write: it must never
    # find a difference that is not one (`sampled_checks_found_nothing`)
    async with run_apps(settings, 2, env={"CREDITGATE_VERIFY_EVERY_S": "0.2"}) as started:
        yield started


async def sampled_checks_found_nothing(apis: list[Api]) -> None:
    for api in apis:
        metrics = dict(line.split(" ", 1) for line in (await api.client.get(
            "/metrics", headers=api.admin)).text.splitlines() if not line.startswith("#"))
        assert int(metrics["creditgate_hotstate_roots_verified_total"]) > 0, metrics
        assert metrics["creditgate_hotstate_roots_repaired_total"] == "0"


@pytest.fixture(scope="module")
async def clients(apps: AppProcesses) -> AsyncIterator[list[httpx.AsyncClient]]:
    opened = [app.client() for app in apps]
    try:
        yield opened
    finally:
        for client in opened:
            await client.aclose()


def apis(clients: list[httpx.AsyncClient], keys: dict[str, str]) -> list[Api]:
    return [Api(client, keys) for client in clients]


def event(uid: str, account: str, product: str, amount: str) -> dict[str, Any]:
    return {"uid": uid, "account": account, "product": product, "amount": amount,
            "timestamp": now_iso()}


async def test_500_concurrent_debits_from_two_processes_are_exact(
        apps: AppProcesses, clients: list[httpx.AsyncClient], keys: dict[str, str],
        db: asyncpg.Connection) -> None:
    a, b = apis(clients, keys)
    n = await a.setup()
    acct, product = n["account"], n["api"]
    grant = await a.grant(acct, "300.00")
    uids = [f"c1-{i}-{uuid.uuid4().hex[:8]}" for i in range(500)]

    async def send(api: Api, uid: str) -> httpx.Response:
        return await api.client.post("/v1/usage", headers=api.runtime,
                                     json=event(uid, acct, product, "1.00"))

    responses = await asyncio.gather(*(send((a, b)[i % 2], uid) for i, uid in enumerate(uids)))
    assert [r.status_code for r in responses] == [200] * 500, [r.text for r in responses
                                                               if r.status_code != 200][:3]
    bodies = [r.json() for r in responses]
    assert Counter(body["status"] for body in bodies) == {"accepted": 500}
    assert sorted(body["uid"] for body in bodies) == sorted(uids)
    # each answer says what it left and what it could not cover: they add up exactly
    assert sum(Decimal(body["overage"]) for body in bodies) == Decimal("200.00")
    assert sorted(Decimal(body["available"]) for body in bodies)[-1] == Decimal("299.00")
    assert Counter(body["overage"] for body in bodies) == {"0.00": 300, "1.00": 200}

    aid = await account_id(db, acct)
    assert await kind_sum(db, [aid], "debit") == Decimal("-300.00")
    assert await kind_sum(db, [aid], "overage") == Decimal("-200.00")
    assert await kind_sum(db, [aid], "grant") == Decimal("300.00")
    assert await balance_sum(db, grant["id"]) == Decimal("0.00")
    rows = await usage_rows(db, [aid])
    assert Counter(r["uid"] for r in rows) == Counter(uids)  # every uid exactly once
    assert sum(Decimal(r["overage"]) for r in rows) == Decimal("200.00")
    by_uid = await entries_by_uid(db, uids)
    assert by_uid == {uid: (1, Decimal("-1.00")) for uid in uids}

    for api in (a, b):  # both processes see the same real-time state, equal to the ledger
        view = await api.live(acct)
        assert live_total(view) == (Decimal("0.00"), Decimal("200.00"))
        assert live_remaining(view) == {grant["id"]: Decimal("0.00")}
    assert (await a.call("GET", f"/v1/balances/{grant['id']}"))["remaining"] == "0.00"

    # the same 500 again, crossed over to the other process: all duplicates, nothing moves
    again = await asyncio.gather(*(send((b, a)[i % 2], uid) for i, uid in enumerate(uids)))
    assert Counter((r.status_code, r.json()["status"]) for r in again) == {(200, "duplicate"): 500}
    assert await kind_sum(db, [aid], "debit") == Decimal("-300.00")
    assert await kind_sum(db, [aid], "overage") == Decimal("-200.00")
    assert len(await usage_rows(db, [aid])) == 500
    assert live_total(await b.live(acct)) == (Decimal("0.00"), Decimal("200.00"))
    assert not apps.tracebacks(), apps.tracebacks()
    await sampled_checks_found_nothing([a, b])


async def test_500_concurrent_check_and_consume_never_overspend(
        apps: AppProcesses, clients: list[httpx.AsyncClient], keys: dict[str, str],
        db: asyncpg.Connection) -> None:
    a, b = apis(clients, keys)
    n = await a.setup()
    acct, product = n["account"], n["api"]
    grant = await a.grant(acct, "123.00")
    keys_ = [f"c2-{i}-{uuid.uuid4().hex[:8]}" for i in range(500)]
    seen: list[Decimal] = []
    done = asyncio.Event()

    async def consume(api: Api, key: str) -> httpx.Response:
        return await api.client.post("/v1/check", headers=api.runtime, json={
            "account": acct, "product": product, "amount": "1.00", "consume": True,
            "idempotency_key": key})

    async def watch() -> None:  # the real-time view, sampled while the consumes run
        while not done.is_set():
            view = await b.live(acct)
            seen.extend(live_remaining(view).values())
            seen.append(live_total(view)[0])
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        responses = await asyncio.gather(*(consume((a, b)[i % 2], k) for i, k in enumerate(keys_)))
    finally:
        done.set()
        await watcher
    assert [r.status_code for r in responses] == [200] * 500
    bodies = [r.json() for r in responses]
    outcomes = Counter((x["allowed"], x["reason"], x["consumed"], x["duplicate"]) for x in bodies)
    assert outcomes == {(True, "ok", True, False): 123,
                        (False, "insufficient_balance", False, False): 377}
    assert all(Decimal(x["available"]) >= 0 for x in bodies)
    assert seen and min(seen) >= 0, "the real-time balance went negative"
    consumed = sorted(k for k, x in zip(keys_, bodies, strict=True) if x["consumed"])

    aid = await account_id(db, acct)
    assert await balance_sum(db, grant["id"]) == Decimal("0.00")
    assert await kind_sum(db, [aid], "debit") == Decimal("-123.00")
    assert await kind_sum(db, [aid], "overage") == Decimal("0")
    assert sorted(r["uid"] for r in await usage_rows(db, [aid])) == consumed
    assert await entries_by_uid(db, keys_) == {k: (1, Decimal("-1.00")) for k in consumed}
    for api in (a, b):
        view = await api.live(acct)
        assert live_total(view) == (Decimal("0.00"), Decimal("0.00"))
        assert live_remaining(view) == {grant["id"]: Decimal("0.00")}

    # a consumed key replays as a duplicate; a denied one is still denied; nothing moves
    replay = await asyncio.gather(*(consume(b, k) for k in consumed[:20]),
                                  *(consume(a, k) for k in sorted(set(keys_) - set(consumed))[:20]))
    results = Counter((x.json()["allowed"], x.json()["reason"], x.json()["consumed"],
                       x.json()["duplicate"]) for x in replay)
    assert results == {(True, "ok", False, True): 20,
                       (False, "insufficient_balance", False, False): 20}
    assert await balance_sum(db, grant["id"]) == Decimal("0.00")
    assert len(await usage_rows(db, [aid])) == 123
    assert not apps.tracebacks(), apps.tracebacks()
    await sampled_checks_found_nothing([a, b])


async def test_concurrent_batches_for_children_of_one_parent_are_exact(
        apps: AppProcesses, clients: list[httpx.AsyncClient], keys: dict[str, str],
        db: asyncpg.Connection) -> None:
    a, b = apis(clients, keys)
    n = await a.setup()
    parent, product = n["account"], n["api"]
    children = [f"{parent}-kid{i}" for i in range(4)]
    for code in children:  # no credit type of their own: they inherit the parent's
        await a.call("POST", "/v1/accounts", expect=201,
                     json={"code": code, "name": "Child", "parent": parent})
    parent_grant = await a.grant(parent, "1000.00")
    child_grants = [await a.grant(code, "25.00") for code in children]

    amounts = ["0.01", "0.25", "0.50", "1.00", "0.37", "0.99", "0.13"]
    batches: list[list[dict[str, Any]]] = []
    for k in range(3):
        batches.append([event(f"c3-{k}-{i}-{uuid.uuid4().hex[:6]}", children[i % 4], product,
                              amounts[(i + k) % len(amounts)]) for i in range(1000)])
    # A sends batches 0 and 1, B sends 2 and (racing A for every uid) batch 0 again
    plan = [(a, batches[0]), (a, batches[1]), (b, batches[2]), (b, batches[0])]

    async def send(api: Api, batch: list[dict[str, Any]]) -> httpx.Response:
        return await api.client.post("/v1/usage", headers=api.runtime, json={"events": batch})

    responses = await asyncio.gather(*(send(api, batch) for api, batch in plan))
    assert [r.status_code for r in responses] == [200] * 4, [r.text[:300] for r in responses]
    bodies = [r.json() for r in responses]
    assert sum(x["rejected"] for x in bodies) == 0
    assert sum(x["accepted"] for x in bodies) == 3000
    assert sum(x["duplicates"] for x in bodies) == 1000
    accepted = Counter(res["uid"] for x in bodies for res in x["results"]
                       if res["status"] == "accepted")
    unique = {e["uid"]: e for batch in batches for e in batch}
    assert accepted == Counter(list(unique))  # each uid accepted exactly once, by one process

    total = sum(Decimal(e["amount"]) for e in unique.values())
    granted = Decimal("1100.00")
    assert total > granted
    reported_overage = sum(Decimal(res["overage"]) for x in bodies for res in x["results"]
                           if res["status"] == "accepted")
    assert reported_overage == total - granted

    ids = {code: await account_id(db, code) for code in [parent, *children]}
    rows = await usage_rows(db, list(ids.values()))
    assert sorted(r["uid"] for r in rows) == sorted(unique)
    by_code = {v: k for k, v in ids.items()}
    for r in rows:
        assert (by_code[r["account_id"]], Decimal(r["amount"])) == (
            unique[r["uid"]]["account"], Decimal(unique[r["uid"]]["amount"]))
    by_uid = await entries_by_uid(db, list(unique))
    assert by_uid == {uid: (1, -Decimal(e["amount"])) for uid, e in unique.items()}
    everyone = list(ids.values())
    assert await kind_sum(db, everyone, "debit") == -granted
    assert await kind_sum(db, everyone, "overage") == -(total - granted)
    assert await kind_sum(db, [ids[parent]], "overage") == 0  # overage belongs to the user
    for grant in [parent_grant, *child_grants]:
        assert await balance_sum(db, grant["id"]) == 0

    live_overage = Decimal(0)
    for code in children:
        for api in (a, b):
            view = await api.live(code)
            available, overage = live_total(view)
            assert available == 0
            assert overage == -await kind_sum(db, [ids[code]], "overage")
        live_overage += overage
    assert live_overage == total - granted
    for api in (a, b):
        assert live_total(await api.live(parent)) == (Decimal("0.00"), Decimal("0.00"))
    assert not apps.tracebacks(), apps.tracebacks()
    await sampled_checks_found_nothing([a, b])
