"""Durable acknowledgement (DESIGN invariant 3) and idempotency (4) against real processes.

An acknowledged write survives FLUSHALL and `kill -9` of the app; a journal entry left behind
by a dead process is committed by another one, exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from app.db import create_pool
from app.hotstate.keys import Keys
from app.hotstate.resp import FastRedis
from app.hotstate.store import DecideArgs, HotState, LedgerOpArgs
from app.ledger.journal import Journal, JournalRecord
from app.ledger.loader import Loader
from app.money import to_scaled
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


@pytest.fixture
async def apps(settings: Settings) -> AsyncIterator[AppProcesses]:
    async with run_apps(settings, 2) as started:
        yield started


@contextlib.asynccontextmanager
async def api_clients(apps: AppProcesses, keys: dict[str, str]) -> AsyncIterator[list[Api]]:
    clients = [app.client() for app in apps]
    try:
        yield [Api(client, keys) for client in clients]
    finally:
        for client in clients:
            await client.aclose()


def event(uid: str, account: str, product: str, amount: str) -> dict[str, Any]:
    return {"uid": uid, "account": account, "product": product, "amount": amount,
            "timestamp": now_iso()}


async def pg_state(db: asyncpg.Connection, balance_ids: list[int],
                   account_ids: list[int]) -> dict[str, Any]:
    """The truth: every balance and the overage as sums of the ledger, and the row counts."""
    return {
        "balances": {b: await balance_sum(db, b) for b in balance_ids},
        "overage": -await kind_sum(db, account_ids, "overage"),
        "entries": await db.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE account_id = ANY($1::int8[])", account_ids),
        "usage": await db.fetchval(
            "SELECT count(*) FROM usage_events WHERE account_id = ANY($1::int8[])", account_ids),
    }


async def eventually(probe: Callable[[], Awaitable[bool]], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await probe():
            return True
        await asyncio.sleep(0.1)
    return await probe()


async def test_acknowledged_writes_survive_flushall(
        apps: AppProcesses, keys: dict[str, str], db: asyncpg.Connection,
        redis: aioredis.Redis) -> None:
    async with api_clients(apps, keys) as (a, b):
        n = await a.setup()
        acct, api_p, storage_p = n["account"], n["api"], n["storage"]
        first = await a.grant(acct, "10.00", priority=1)
        main = await b.grant(acct, "50.00")
        scoped = await a.grant(acct, "20.00", products=[storage_p], priority=5)
        uids = [f"fl-{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
        for i, (uid, amount) in enumerate(zip(uids, ["4.00", "7.25", "0.01", "3.33", "2.00", "9.99"],
                                              strict=True)):
            result = await (a, b)[i % 2].usage(acct, (api_p, storage_p)[i % 3 == 0], amount, uid=uid)
            assert result["status"] == "accepted"
        await b.call("POST", f"/v1/balances/{main['id']}/adjustments", json={"amount": "5.55"})
        await a.call("POST", f"/v1/balances/{scoped['id']}/adjustments", json={"amount": "-2.50"})
        await b.call("POST", f"/v1/balances/{first['id']}/void", json={"description": "oops"})
        consumed = [f"fl-c{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
        for key in consumed:
            check = await a.check(acct, api_p, amount="1.10", consume=True, idempotency_key=key)
            assert (check["allowed"], check["consumed"]) == (True, True)
        # a big one that only part of the credit covers: overage
        assert (await b.usage(acct, api_p, "100.00", uid=uids[0] + "-big"))["overage"] != "0.00"
        uids.append(uids[0] + "-big")

        aid = await account_id(db, acct)
        balance_ids = [first["id"], main["id"], scoped["id"]]
        before = [await api.live(acct) for api in (a, b)]
        assert before[0] == before[1]
        truth = await pg_state(db, balance_ids, [aid])
        assert truth["balances"][first["id"]] == 0  # voided: the void took what remained
        live_before = live_remaining(before[0])
        assert first["id"] not in live_before  # a voided balance is not shown
        assert live_before == {k: v for k, v in truth["balances"].items() if k != first["id"]}
        assert live_total(before[0])[1] == truth["overage"] > 0

        await redis.flushall()
        assert await redis.exists(Keys(apps.prefix).root(aid)) == 0

        # no restart: both processes notice the cold Redis and rebuild from Postgres
        after = [await api.live(acct) for api in (b, a)]
        assert after[0] == after[1] == before[0]
        assert await pg_state(db, balance_ids, [aid]) == truth

        # a replay of an acknowledged uid or consume key is still a duplicate, changing nothing
        replay = await a.call("POST", "/v1/usage", scope="runtime", json={"events": [
            event(uid, acct, api_p, "4.00") for uid in uids]})
        assert (replay["accepted"], replay["duplicates"]) == (0, len(uids)), replay
        for key in consumed:
            check = await b.check(acct, api_p, amount="1.10", consume=True, idempotency_key=key)
            assert (check["allowed"], check["consumed"], check["duplicate"]) == (True, False, True)
        assert await pg_state(db, balance_ids, [aid]) == truth
        assert await b.live(acct) == before[0]
        assert await a.live(acct) == before[0]

        # and new writes after the flush count normally
        await redis.flushall()
        extra = await b.grant(acct, "5.00")
        assert (await a.usage(acct, api_p, "1.25"))["available"] == "3.75"
        now = await pg_state(db, [*balance_ids, extra["id"]], [aid])
        assert now["balances"] == {**truth["balances"], extra["id"]: Decimal("3.75")}
        assert now["overage"] == truth["overage"]
        for api in (a, b):
            assert live_remaining(await api.live(acct)) == {
                k: v for k, v in now["balances"].items() if k != first["id"]}
        # a consume replayed while credit is available: still a duplicate, nothing moves
        check = await b.check(acct, api_p, amount="1.10", consume=True, idempotency_key=consumed[0])
        assert (check["allowed"], check["consumed"], check["duplicate"]) == (True, False, True)
        assert await pg_state(db, [*balance_ids, extra["id"]], [aid]) == now
        assert live_remaining(await a.live(acct))[extra["id"]] == Decimal("3.75")
    assert not apps.tracebacks(), apps.tracebacks()


async def test_flushall_under_load_loses_nothing(
        apps: AppProcesses, keys: dict[str, str], db: asyncpg.Connection,
        redis: aioredis.Redis) -> None:
    """Redis emptied (twice) while writes are in flight: once quiet, hot copy = ledger."""
    async with api_clients(apps, keys) as (a, b):
        n = await a.setup()
        acct, product = n["account"], n["api"]
        grant = await a.grant(acct, "100000.00")
        events = [event(f"fu-{i}-{uuid.uuid4().hex[:6]}", acct, product,
                        ("0.01", "1.00", "2.50", "0.33")[i % 4]) for i in range(800)]

        async def send(api: Api, body: dict[str, Any]) -> httpx.Response | None:
            try:
                return await api.client.post("/v1/usage", headers=api.runtime, json=body)
            except httpx.HTTPError:
                return None

        async def flusher() -> None:
            for _ in range(2):
                await asyncio.sleep(0.4)
                await redis.flushall()

        results, _ = await asyncio.gather(
            asyncio.gather(*(send((a, b)[i % 2], e) for i, e in enumerate(events))), flusher())
        acked = {e["uid"] for e, r in zip(events, results, strict=True)
                 if r is not None and r.status_code == 200 and r.json()["status"] == "accepted"}
        # retry whatever was not acknowledged (a 503 while the hot copy was rebuilt is allowed)
        retry = [e for e in events if e["uid"] not in acked]
        for r in await asyncio.gather(*(send(b, e) for e in retry)):
            assert r is not None and r.status_code == 200, r and r.text
        aid = await account_id(db, acct)
        by_uid = await entries_by_uid(db, [e["uid"] for e in events])
        assert by_uid == {e["uid"]: (1, -Decimal(e["amount"])) for e in events}
        total = sum(Decimal(e["amount"]) for e in events)
        assert await balance_sum(db, grant["id"]) == Decimal("100000.00") - total

        async def agrees() -> bool:
            views = [live_remaining(await api.live(acct)) for api in (a, b)]
            truth = {grant["id"]: await balance_sum(db, grant["id"])}
            return views[0] == views[1] == truth

        assert await eventually(agrees, 6.0), (
            live_remaining(await a.live(acct)), await balance_sum(db, grant["id"]))
        assert len(await usage_rows(db, [aid])) == len(events)
    assert not apps.tracebacks(), apps.tracebacks()


async def test_kill_9_under_load_loses_no_acknowledged_event_and_counts_none_twice(
        apps: AppProcesses, keys: dict[str, str], db: asyncpg.Connection,
        redis: aioredis.Redis) -> None:
    victim = apps[0]
    async with api_clients(apps, keys) as (a, b):
        n = await a.setup()
        acct, product = n["account"], n["api"]
        grant = await b.grant(acct, "100000.00")
        amounts = ("1.00", "0.25", "3.10", "0.07", "12.34")
        events = [event(f"k9-{i}-{uuid.uuid4().hex[:6]}", acct, product, amounts[i % 5])
                  for i in range(900)]
        to_a, to_b = events[:700], events[700:]
        done_on_a = 0
        enough = asyncio.Event()

        async def send(api: Api, body: dict[str, Any], on_a: bool) -> httpx.Response | None:
            nonlocal done_on_a
            try:
                response = await api.client.post("/v1/usage", headers=api.runtime, json=body)
            except httpx.HTTPError:
                return None
            if on_a:
                done_on_a += 1
                if done_on_a >= 150:
                    enough.set()
            return response

        async def killer() -> None:
            await asyncio.wait_for(enough.wait(), 20)
            victim.kill()

        results, _ = await asyncio.gather(
            asyncio.gather(*(send(a, e, True) for e in to_a), *(send(b, e, False) for e in to_b)),
            killer())
        assert not victim.alive
        outcome = dict(zip([e["uid"] for e in events], results, strict=True))
        acked = {uid for uid, r in outcome.items()
                 if r is not None and r.status_code == 200 and r.json()["status"] == "accepted"}
        lost_on_a = [e for e in to_a if outcome[e["uid"]] is None]
        assert lost_on_a, "the kill came after the load: nothing was in flight on A"
        # an answer is an acknowledgement or a retryable 503 (e.g. another test session's
        # FLUSHALL storm), never a 2xx that is not `accepted`, nor a 500
        odd = {uid: (r.status_code, r.text[:200]) for uid, r in outcome.items()
               if r is not None and uid not in acked}
        assert all(code == 503 for code, _ in odd.values()), odd
        assert len(acked & {e["uid"] for e in to_a}) >= 100
        assert all(outcome[e["uid"]] is not None for e in to_b)  # the survivor answered its own

        # every acknowledged event is committed, exactly once
        amount_of = {e["uid"]: Decimal(e["amount"]) for e in events}
        by_uid = await entries_by_uid(db, sorted(acked))
        assert by_uid == {uid: (1, -amount_of[uid]) for uid in acked}
        aid = await account_id(db, acct)
        assert acked <= {r["uid"] for r in await usage_rows(db, [aid])}

        # the survivor's sweeper commits what the dead process decided but never committed
        async def swept() -> bool:
            view = live_remaining(await b.live(acct))
            return (await redis.xlen(Keys(apps.prefix).journal(await account_id(db, acct))) == 0
                    and view == {grant["id"]: await balance_sum(db, grant["id"])})

        assert await eventually(swept, 8.0), (live_remaining(await b.live(acct)),
                                              await balance_sum(db, grant["id"]))

        # every event again, through the survivor: nothing counts twice, nothing is missing
        again = await b.call("POST", "/v1/usage", scope="runtime", json={"events": events})
        assert again["rejected"] == 0
        statuses = {r["uid"]: r["status"] for r in again["results"]}
        assert all(statuses[uid] == "duplicate" for uid in acked)
        by_uid = await entries_by_uid(db, list(amount_of))
        assert by_uid == {uid: (1, -amount) for uid, amount in amount_of.items()}
        assert Counter(r["uid"] for r in await usage_rows(db, [aid])) == Counter(list(amount_of))
        assert await kind_sum(db, [aid], "overage") == 0
        expected = Decimal("100000.00") - sum(amount_of.values())
        assert await balance_sum(db, grant["id"]) == expected
        assert await eventually(swept, 8.0)
        assert live_remaining(await b.live(acct)) == {grant["id"]: expected}
    assert not apps.tracebacks(), apps.tracebacks()


async def test_orphaned_journal_entries_are_committed_by_a_live_process(
        settings: Settings, keys: dict[str, str], db: asyncpg.Connection) -> None:
    """Entries decided in Redis by a process that then died (here: this test, which never
    commits them) are committed by a running process's sweeper, exactly once."""
    async with run_apps(settings, 1) as apps, api_clients(apps, keys) as (api,):
        n = await api.setup()
        acct, product, ct = n["account"], n["api"], n["credit_type"]
        grant = await api.grant(acct, "10.00")
        assert await api.available(acct) == "10.00"
        aid = await account_id(db, acct)
        ct_id = await db.fetchval("SELECT id FROM credit_types WHERE code = $1", ct)

        redis = aioredis.from_url(settings.redis_url, decode_responses=True)
        pool = await create_pool(settings.database_url, 2)
        try:
            hot = HotState(redis, FastRedis(settings.redis_url), Keys(apps.prefix))
            loader = Loader(pool, hot)
            uid = f"orphan-{uuid.uuid4().hex[:8]}"
            amount = to_scaled(Decimal("3.75"), 2)
            at = time.time_ns() // 1_000_000
            payload = json.dumps({"a": aid, "ct": ct_id, "cc": ct, "dp": 2, "uid": uid,
                                  "prod": product, "amt": str(amount), "ts": at})
            args = DecideArgs(aid, str(aid), uid, product, ct, amount, at, "u", payload)
            adjust = json.dumps({"op": f"j:{uuid.uuid4().hex}", "a": aid, "ct": ct_id, "cc": ct,
                                 "dp": 2, "b": grant["id"], "desc": "orphaned adjustment"})
            op = LedgerOpArgs("adjustment", aid, str(aid), grant["id"], to_scaled(Decimal("-1.20"), 2),
                              "", at, adjust)
            for _ in range(5):  # the app's own code path: decide, journal, never commit
                decisions = await hot.decide(aid, at, [args])
                if decisions is not None:
                    break
                await loader.ensure(aid)
            assert decisions is not None and decisions[0].status == "ok"
            assert decisions[0].stream_id and decisions[0].available == to_scaled(Decimal("6.25"), 2)
            for _ in range(5):
                result = await hot.ledger_op(aid, at, op)
                if result.status != "cold":
                    break
                await loader.ensure(aid)
            assert (result.status, result.applied) == ("ok", -120)
            assert await entries_by_uid(db, [uid]) == {}  # decided, not committed

            async def committed() -> bool:
                return (await entries_by_uid(db, [uid]) == {uid: (1, Decimal("-3.75"))}
                        and await balance_sum(db, grant["id"]) == Decimal("5.05"))

            assert await eventually(committed, 10.0), apps.logs()
            assert await redis.xlen(Keys(apps.prefix).journal(aid)) == 0
        finally:
            await redis.aclose()
            await pool.close()

        assert len(await usage_rows(db, [aid])) == 1
        assert await db.fetchval("SELECT count(*) FROM ledger_entries WHERE account_id = $1 "
                                 "AND kind = 'adjustment'", aid) == 1
        assert live_remaining(await api.live(acct)) == {grant["id"]: Decimal("5.05")}
        # the client of the dead process retries: a duplicate, nothing moves
        replay = await api.usage(acct, product, "3.75", uid=uid)
        assert replay["status"] == "duplicate"
        await asyncio.sleep(3 * settings.worker_interval_s)  # a few more sweeps: still once
        assert await entries_by_uid(db, [uid]) == {uid: (1, Decimal("-3.75"))}
        assert await balance_sum(db, grant["id"]) == Decimal("5.05")
        assert await api.available(acct) == "5.05"
        assert not apps.tracebacks(), apps.tracebacks()


async def test_a_commit_landing_while_a_cold_root_is_rebuilt_is_not_lost(
        settings: Settings, keys: dict[str, str], db: asyncpg.Connection) -> None:
    """FLUSHALL while a debit is between its Lua call and its commit: the journal that would
    have told a rebuild about it is gone. If the commit lands after the rebuild read Postgres
    but before it installed, the rebuild must not install a state without it."""
    async with run_apps(settings, 1) as apps, api_clients(apps, keys) as (api,):
        n = await api.setup()
        acct, product, ct = n["account"], n["api"], n["credit_type"]
        grant = await api.grant(acct, "10.00")
    aid = await account_id(db, acct)
    ct_id = await db.fetchval("SELECT id FROM credit_types WHERE code = $1", ct)
    redis = aioredis.from_url(settings.redis_url, decode_responses=True)
    pool = await create_pool(settings.database_url, 2)
    keys_ = Keys(f"{settings.redis_prefix}w{uuid.uuid4().hex[:6]}")  # this test's alone
    try:
        hot = HotState(redis, FastRedis(settings.redis_url), keys_)
        journal = Journal(pool, hot)
        pending: list[JournalRecord] = []

        class RacingLoader(Loader):
            async def _state(self, root_id: int, records: list[JournalRecord]) -> dict[str, Any]:
                state = await super()._state(root_id, records)
                if pending:  # the in-flight debit commits right after the rebuild's read
                    await journal.flush([pending.pop()])
                return state

        loader = RacingLoader(pool, hot)
        await loader.ensure(aid)
        uid = f"race-{uuid.uuid4().hex[:8]}"
        at = time.time_ns() // 1_000_000
        payload = json.dumps({"a": aid, "ct": ct_id, "cc": ct, "dp": 2, "uid": uid,
                              "prod": product, "amt": "250", "ts": at})
        decisions = await hot.decide(aid, at, [DecideArgs(aid, str(aid), uid, product, ct, 250,
                                                          at, "u", payload)])
        assert decisions is not None and decisions[0].status == "ok"
        d = decisions[0]
        pending.append(JournalRecord(aid, d.stream_id, "usage", json.loads(payload), at, d.gen,
                                     d.allocations, d.overage, flag_changes=d.flag_change))
        # "FLUSHALL", limited to this test's own keys
        await redis.delete(*[k async for k in redis.scan_iter(match=keys_.tag(aid) + ":*")])

        await loader.ensure(aid)
        assert not pending
        assert await entries_by_uid(db, [uid]) == {uid: (1, Decimal("-2.50"))}
        raw = await hot.read_account(aid, aid)
        assert raw is not None
        hot_remaining = dict(zip(raw[1][::2], raw[1][1::2], strict=True))
        assert hot_remaining == {str(grant["id"]): "750"}  # = Postgres: 10.00 - 2.50
    finally:
        await redis.aclose()
        await pool.close()


async def test_replay_after_flushall_does_not_divert_credit_from_new_usage(
        settings: Settings, keys: dict[str, str], db: asyncpg.Connection,
        redis: aioredis.Redis) -> None:
    async with run_apps(settings, 1) as apps, api_clients(apps, keys) as (api,):
        n = await api.setup()
        acct, product = n["account"], n["api"]
        grant = await api.grant(acct, "1.00")
        old = event(f"rp-{uuid.uuid4().hex[:8]}", acct, product, "0.50")
        assert (await api.call("POST", "/v1/usage", scope="runtime", json=old))["status"] == "accepted"
        await redis.flushall()
        new = event(f"rp-{uuid.uuid4().hex[:8]}", acct, product, "0.50")
        result = await api.call("POST", "/v1/usage", scope="runtime", json={"events": [old, new]})
    assert [r["status"] for r in result["results"]] == ["duplicate", "accepted"]
    # 0.50 of credit was left for the new event: it must be drawn, not billed as overage
    assert await balance_sum(db, grant["id"]) == Decimal("0.00")
    assert result["results"][1]["overage"] == "0.00"


async def test_every_recent_uid_of_a_root_is_refused_after_flushall(
        api: Api, redis: aioredis.Redis) -> None:
    """The marks come back from Postgres for every account of the root, more than one command's
    worth (1,000) of them in one day's bucket: a replayed uid whose mark was lost would draw
    credit in Redis before Postgres refuses it, and a new event after it would find none."""
    parent = await api.setup()
    child = await api.setup(parent=parent["account"])
    await api.grant(parent["account"], "15.50")
    sent: dict[str, list[dict[str, Any]]] = {}
    for n, count in ((parent, 1_200), (child, 300)):
        events = [event(f"m-{i}", n["account"], n["api"], "0.01")
                  | {"credit_type": parent["credit_type"]} for i in range(count)]
        for start in range(0, count, 1_000):
            out = await api.call("POST", "/v1/usage", scope="runtime",
                                 json={"events": events[start:start + 1_000]})
            assert out["accepted"] == len(events[start:start + 1_000])
        sent[n["account"]] = events
    assert await api.available(parent["account"]) == "0.50"

    await redis.flushall()
    new = 0
    for account, events in sent.items():
        for start in range(0, len(events), 999):
            old = events[start:start + 999]
            fresh = event(f"new-{new}", account, old[0]["product"], "0.01") | {
                "credit_type": parent["credit_type"]}
            new += 1
            out = await api.call("POST", "/v1/usage", scope="runtime",
                                 json={"events": [*old, fresh]})
            assert (out["duplicates"], out["accepted"]) == (len(old), 1)
            assert out["results"][-1]["overage"] == "0.00"
    assert await api.available(parent["account"]) == str(Decimal("0.50") - new * Decimal("0.01"))
