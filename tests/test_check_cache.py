"""The check cache (app/hotstate/checkcache.py): plain checks answered from memory, never stale.

Across processes: a change acknowledged by one process is seen by the next check in another,
however often that other one answered from memory before. In one process: answers are kept
and reused, dropped by any write, by time alone (a balance expiring or starting), by a
FLUSHALL, and nothing is kept while the invalidation connection is down.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.hotstate.checkcache import CheckCache
from app.settings import Settings
from tests.conftest import Api
from tests.procs import AppProcesses, call_as, run_apps
from tests.webhook_receiver import eventually


def cache_of(app: Any) -> CheckCache:
    cache = app.state.ctx.hot.cache
    assert cache is not None
    return cache


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


async def one_answer_kept(api: Api, app: Any) -> tuple[dict[str, str], CheckCache]:
    """A new account with 1.00, and its check answer in the in-process app's cache."""
    n = await api.setup()
    await api.grant(n["account"], "1.00")
    cache = cache_of(app)
    await eventually(lambda: cache.armed, within=5.0)
    await api.check(n["account"], n["api"])
    return n, cache


@pytest.fixture(scope="module")
async def apps(settings: Settings) -> AsyncIterator[AppProcesses]:
    async with run_apps(settings, 2) as started:
        yield started


async def test_a_change_acknowledged_by_one_process_is_seen_by_the_next_check_in_another(
        api: Api, apps: AppProcesses, keys: dict[str, str]) -> None:
    n = await api.setup()
    account, product = n["account"], n["api"]
    runtime, admin = keys["runtime"], keys["admin"]
    check = {"account": account, "product": product, "amount": "0.01"}
    async with apps[0].client() as writer, apps[1].client() as reader:
        for round_no in range(15):
            await call_as(writer, admin, "POST", f"/v1/accounts/{account}/grants",
                          json={"amount": "1.00"})
            for _ in range(3):  # the first fills the reader's cache, the others reuse it
                seen = await call_as(reader, runtime, "POST", "/v1/check", json=check)
                assert (seen["allowed"], seen["available"]) == (True, "1.00"), round_no
            used = await call_as(writer, runtime, "POST", "/v1/usage", json={
                "uid": uuid.uuid4().hex, "account": account, "product": product,
                "amount": "1.00", "timestamp": iso(datetime.now(UTC))})
            assert used["status"] == "accepted"
            after = await call_as(reader, runtime, "POST", "/v1/check", json=check)
            assert (after["allowed"], after["reason"], after["available"]) == \
                (False, "insufficient_balance", "0.00"), round_no
        await call_as(writer, admin, "POST", f"/v1/accounts/{account}/grants",
                      json={"amount": "5.00"})
        assert (await call_as(reader, runtime, "POST", "/v1/check", json=check))["allowed"]
        await call_as(writer, admin, "PATCH", f"/v1/accounts/{account}",
                      json={"status": "blocked"})
        blocked = await call_as(reader, runtime, "POST", "/v1/check", json=check)
        assert (blocked["allowed"], blocked["reason"]) == (False, "account_blocked")


async def test_answers_are_reused_until_a_write_and_the_amount_is_judged_each_time(
        api: Api, app: Any) -> None:
    n = await api.setup()
    cache = cache_of(app)
    await api.grant(n["account"], "2.00")
    first = await api.check(n["account"], n["api"], amount="1.00")
    hits = cache.hits
    again = await api.check(n["account"], n["api"], amount="1.00")
    too_much = await api.check(n["account"], n["api"], amount="2.01")
    # each status of one answer has its reply (built once, kept with the answer)
    back = await api.check(n["account"], n["api"], amount="0.50")
    assert cache.hits == hits + 3
    assert first == again == back and first["allowed"] and first["available"] == "2.00"
    assert (too_much["allowed"], too_much["reason"]) == (False, "insufficient_balance")
    await api.usage(n["account"], n["api"], "1.50")
    after = await api.check(n["account"], n["api"], amount="1.00")
    assert (after["allowed"], after["available"]) == (False, "0.50")
    # another product of the same account: an answer of its own, from Redis first
    other = await api.check(n["account"], n["storage"], amount="0.50")
    assert (other["allowed"], other["available"]) == (True, "0.50")


async def test_an_answer_ends_when_a_balance_expires_or_starts_with_no_write(
        api: Api, app: Any) -> None:
    n = await api.setup()
    soon = datetime.now(UTC) + timedelta(seconds=1.5)
    await api.grant(n["account"], "3.00", expires_at=iso(soon), products=[n["api"]])
    await api.grant(n["account"], "4.00", effective_at=iso(soon), products=[n["storage"]])
    cache = cache_of(app)
    hits = cache.hits
    for _ in range(2):
        live = await api.check(n["account"], n["api"])
        pending = await api.check(n["account"], n["storage"])
        assert (live["allowed"], live["available"]) == (True, "3.00")
        assert (pending["allowed"], pending["reason"]) == (False, "no_eligible_balance")
    assert cache.hits == hits + 2
    await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.05)
    expired = await api.check(n["account"], n["api"])
    started = await api.check(n["account"], n["storage"])
    assert (expired["allowed"], expired["reason"]) == (False, "no_eligible_balance")
    assert (started["allowed"], started["available"]) == (True, "4.00")


async def test_flushall_drops_every_answer(api: Api, app: Any,
                                           redis: aioredis.Redis) -> None:
    n = await api.setup()
    await api.grant(n["account"], "1.00")
    cache = cache_of(app)
    await api.check(n["account"], n["api"])
    assert len(cache) > 0
    await redis.flushall()
    await eventually(lambda: len(cache) == 0, within=5.0)
    rebuilt = await api.check(n["account"], n["api"])
    assert (rebuilt["allowed"], rebuilt["available"]) == (True, "1.00")


async def test_without_its_invalidation_connection_nothing_is_served_from_memory(
        api: Api, app: Any, redis: aioredis.Redis) -> None:
    n, cache = await one_answer_kept(api, app)
    sub_id = cache._sub_id
    await redis.execute_command("CLIENT", "KILL", "ID", str(sub_id))
    # a write whose invalidation nobody receives: the next check must not use memory
    await api.usage(n["account"], n["api"], "1.00")
    hits = cache.hits
    after = await api.check(n["account"], n["api"])
    assert (after["allowed"], after["available"]) == (False, "0.00")
    assert cache.hits == hits
    # it comes back (a new subscriber, tracking re-pointed) and answers from memory again
    await eventually(lambda: cache.armed and cache._sub_id != sub_id, within=5.0)
    await api.grant(n["account"], "2.00")
    for _ in range(2):
        seen = await api.check(n["account"], n["api"])
        assert (seen["allowed"], seen["available"]) == (True, "2.00")
    assert cache.hits == hits + 1
    await api.usage(n["account"], n["api"], "0.50")
    assert (await api.check(n["account"], n["api"]))["available"] == "1.50"


async def test_a_process_without_the_cache_decides_every_check_in_redis(
        settings: Settings, keys: dict[str, str], api: Api) -> None:
    n = await api.setup()
    async with run_apps(settings, 1, env={"CREDITGATE_CHECK_CACHE": "0"}) as plain:
        async with plain[0].client() as client:
            await call_as(client, keys["admin"], "POST", f"/v1/accounts/{n['account']}/grants",
                          json={"amount": "1.00"})
            body = {"account": n["account"], "product": n["api"], "amount": "0.40"}
            seen = await call_as(client, keys["runtime"], "POST", "/v1/check", json=body)
            assert (seen["allowed"], seen["available"]) == (True, "1.00")
            await call_as(client, keys["runtime"], "POST", "/v1/usage", json={
                "uid": uuid.uuid4().hex, "account": n["account"], "product": n["api"],
                "amount": "0.70", "timestamp": iso(datetime.now(UTC))})
            seen = await call_as(client, keys["runtime"], "POST", "/v1/check", json=body)
            assert (seen["allowed"], seen["reason"]) == (False, "insufficient_balance")


async def test_a_hit_first_reads_invalidations_the_event_loop_has_not_polled_yet(
        api: Api, app: Any) -> None:
    """The invalidation of an acknowledged write is in the socket before the next request is
    read; even when the event loop would reach that socket only after the request, the
    answer is not served from memory."""
    n, cache = await one_answer_kept(api, app)
    sock = cache._sock
    assert sock is not None
    loop = asyncio.get_running_loop()
    loop.remove_reader(sock.fileno())  # the loop no longer reads it: only a hit's own read does
    try:
        await api.usage(n["account"], n["api"], "1.00")
        await asyncio.sleep(0.05)
        hits = cache.hits
        after = await api.check(n["account"], n["api"])
        assert (after["allowed"], after["available"]) == (False, "0.00")
        assert cache.hits == hits
    finally:
        if cache._sock is sock:
            loop.add_reader(sock.fileno(), cache._drain)
