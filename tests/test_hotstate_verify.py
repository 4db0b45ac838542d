"""`creditgate hotstate verify` compares each loaded root's hot copy with what a rebuild from
Postgres (plus the unflushed journal) would install: a root in agreement shows nothing, even
while it is written to; a hot copy changed behind the app's back shows each difference, and
`--repair` drops the root so that the next request rebuilds it right."""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from app.errors import Unavailable
from app.hotstate.keys import Keys
from app.hotstate.store import HotState
from app.ledger.commands import verify
from app.ledger.loader import Drift
from app.ledger.verifier import HotCheck, check_sampled, random_root
from app.settings import Settings
from tests.conftest import Api
from tests.procs import cli


async def _family(api: Api, db: asyncpg.Connection) -> dict[str, Any]:
    """A root with a child of the same credit type: balances of both (one scoped to a
    product, one voided), usage drawn from both and beyond them (overage)."""
    names = await api.setup()
    child = f"child-{uuid.uuid4().hex[:8]}"
    await api.call("POST", "/v1/accounts", expect=201, json={
        "code": child, "name": "Child", "parent": names["account"],
        "credit_type": names["credit_type"]})
    root_balance = await api.grant(names["account"], "10.00")
    scoped = await api.grant(child, "5.00", products=[names["storage"]], priority=1)
    voided = await api.grant(child, "3.00")
    await api.call("POST", f"/v1/balances/{voided['id']}/void", json={})
    await api.usage(child, names["api"], "4.00")
    await api.usage(child, names["storage"], "2.50")
    await api.usage(names["account"], names["api"], "7.25")  # 1.25 beyond: overage
    ids = {r["code"]: r["id"] for r in await db.fetch(
        "SELECT id, code FROM accounts WHERE code = ANY($1)", [names["account"], child])}
    return {**names, "child": child, "root_id": ids[names["account"]],
            "child_id": ids[child], "root_balance": root_balance["id"], "scoped": scoped["id"]}


async def test_a_root_in_agreement_shows_nothing_even_while_it_is_written_to(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    f = await _family(api, db)
    loader = app.state.ctx.loader
    assert await loader.verify(f["root_id"]) == []

    async def write() -> None:
        for i in range(40):
            account = f["child"] if i % 2 else f["account"]
            await api.usage(account, f["api"], "0.01")

    async def compare() -> list[list[Drift] | None]:
        found = []
        for _ in range(20):
            try:
                found.append(await loader.verify(f["root_id"]))
            except Unavailable:  # (it kept changing: allowed, never a wrong difference)
                pass
            await asyncio.sleep(0)
        return found

    _, _, seen = await asyncio.gather(write(), write(), compare())
    assert seen and all(found == [] for found in seen), seen
    assert await loader.verify(f["root_id"]) == []


async def test_a_write_between_the_two_reads_throws_the_first_away(
        api: Api, app: Any, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """A debit decided after Redis was read and committed before Postgres was would show as a
    difference that is not one: the op counter moved, so the reads are made again."""
    f = await _family(api, db)
    loader = app.state.ctx.loader
    original, reads = loader._state, []

    async def late_write(root_id: int, records: list[Any]) -> dict[str, Any]:
        reads.append(root_id)
        if len(reads) == 1:
            await api.usage(f["account"], f["api"], "0.01")
        state: dict[str, Any] = await original(root_id, records)
        return state

    monkeypatch.setattr(loader, "_state", late_write)
    assert await loader.verify(f["root_id"]) == []
    assert len(reads) == 2


async def test_every_difference_is_named_and_repair_rebuilds_the_root(
        api: Api, app: Any, db: asyncpg.Connection, settings: Settings) -> None:
    f = await _family(api, db)
    ctx = app.state.ctx
    hot, tag = ctx.hot, ctx.hot.keys.tag(f["root_id"])
    before = await api.live(f["account"])
    root, child = f["root_id"], f["child_id"]
    await hot.redis.hincrby(f"{tag}:b:{root}", str(f["root_balance"]), 500)
    await hot.redis.hset(f"{tag}:o:{root}", f["credit_type"], "9999")
    await hot.redis.hset(f"{tag}:a:{child}", "st", "blocked")
    definition = await hot.redis.hget(f"{tag}:d:{child}", str(f["scoped"]))
    changed = definition.replace(f"{f['credit_type']}|1|", f"{f['credit_type']}|7|", 1)
    await hot.redis.hset(f"{tag}:d:{child}", str(f["scoped"]), changed)

    found = await ctx.loader.verify(root)
    assert sorted(found, key=lambda d: (d.account_id, d.what)) == sorted([
        Drift(root, f"balance {f['root_balance']}", "500", "0", f["credit_type"]),
        Drift(root, "overage", "9999", "125", f["credit_type"]),
        Drift(child, "status", "blocked", "active"),
        Drift(child, f"definition {f['scoped']}", changed, definition),
    ], key=lambda d: (d.account_id, d.what))

    lines: list[str] = []
    assert await verify(settings, f["child"], True, lines.append, settle_s=0) == 1
    assert (f"root {root}  account {root} ({f['account']})  balance {f['root_balance']}: "
            f"5.00 {f['credit_type']} in Redis, 0.00 {f['credit_type']} in Postgres") in lines
    assert (f"root {root}  account {root} ({f['account']})  overage: 99.99 {f['credit_type']} "
            f"in Redis, 1.25 {f['credit_type']} in Postgres") in lines
    assert f"root {root}  account {child} ({f['child']})  status: blocked in Redis, active in Postgres" \
        in lines
    assert lines[-1] == "1 loaded roots verified, 1 differ from Postgres (repaired)"
    assert await hot.redis.exists(hot.keys.root(root)) == 0
    assert await api.live(f["account"]) == before  # rebuilt from Postgres
    assert (await api.check(f["child"], f["storage"]))["reason"] != "account_blocked"
    assert await ctx.loader.verify(root) == []


async def test_a_difference_seen_once_is_not_reported(
        api: Api, app: Any, db: asyncpg.Connection, settings: Settings) -> None:
    """A write shows in Postgres an instant before Redis takes it (an account's status, say):
    verify reports only what a second comparison finds again."""
    f = await _family(api, db)
    hot, tag = app.state.ctx.hot, app.state.ctx.hot.keys.tag(f["root_id"])
    await hot.redis.hset(f"{tag}:a:{f['child_id']}", "st", "blocked")

    async def heal() -> None:
        await asyncio.sleep(0.2)
        await hot.redis.hset(f"{tag}:a:{f['child_id']}", "st", "active")

    lines: list[str] = []
    drifting, _ = await asyncio.gather(verify(settings, f["account"], False, lines.append,
                                              settle_s=0.5), heal())
    assert drifting == 0
    assert lines == ["1 loaded roots verified, 0 differ from Postgres"]


async def test_the_command_reports_repairs_and_refuses_as_an_operator_sees_it(
        api: Api, app: Any, db: asyncpg.Connection, settings: Settings) -> None:
    f = await _family(api, db)
    hot, tag = app.state.ctx.hot, app.state.ctx.hot.keys.tag(f["root_id"])
    await hot.redis.hincrby(f"{tag}:b:{f['child_id']}", str(f["scoped"]), -100)

    found = await cli(settings, "hotstate", "verify", "--account", f["account"])
    assert found.returncode == 3, found.stderr
    assert (f"root {f['root_id']}  account {f['child_id']} ({f['child']})  balance {f['scoped']}: "
            f"1.50 {f['credit_type']} in Redis, 2.50 {f['credit_type']} in Postgres") \
        in found.stdout.splitlines()
    assert await hot.redis.exists(hot.keys.root(f["root_id"])) == 1  # not repaired unasked

    repaired = await cli(settings, "hotstate", "verify", "--account", f["child"], "--repair")
    assert repaired.returncode == 3, repaired.stderr
    assert repaired.stdout.splitlines()[-1].endswith("(repaired)")
    assert Decimal((await api.live(f["child"]))["balances"][0]["remaining"]) >= 0
    await api.usage(f["account"], f["api"], "0.01")  # loaded again, from Postgres
    again = await cli(settings, "hotstate", "verify", "--account", f["account"])
    assert again.returncode == 0, again.stdout
    assert again.stdout.splitlines()[-1] == "1 loaded roots verified, 0 differ from Postgres"

    unknown = await cli(settings, "hotstate", "verify", "--account", "no-such-account")
    assert unknown.returncode == 1 and "no account 'no-such-account'" in unknown.stderr


@pytest.fixture
def sampling(app: Any, monkeypatch: pytest.MonkeyPatch) -> HotCheck:
    """The session app's sampled check, counted afresh, run by the test itself (every second;
    the session's workers pass 0, which does nothing)."""
    assert app.state.ctx.settings.verify_every_s == 0
    memory = HotCheck(due_at=time.monotonic() - 1)  # (a process's first period is over)
    monkeypatch.setattr(app.state.ctx, "hot_check", memory)
    return memory


async def test_the_workers_sample_drop_a_root_that_differs_twice(
        api: Api, app: Any, db: asyncpg.Connection, client: httpx.AsyncClient,
        sampling: HotCheck, caplog: pytest.LogCaptureFixture) -> None:
    f = await _family(api, db)
    ctx = app.state.ctx
    hot, tag = ctx.hot, ctx.hot.keys.tag(f["root_id"])
    before = await api.live(f["child"])
    await hot.redis.hincrby(f"{tag}:b:{f['child_id']}", str(f["scoped"]), 100)

    assert await check_sampled(ctx, sampling, 1, f["root_id"]) == 0  # a first look: a suspect
    assert sampling.verified == 1 and sampling.suspect is not None
    assert await hot.redis.exists(hot.keys.root(f["root_id"])) == 1
    assert await check_sampled(ctx, sampling, 1) == 1  # seen again: dropped
    assert sampling.repaired == 1 and sampling.suspect is None
    assert await hot.redis.exists(hot.keys.root(f["root_id"])) == 0
    assert f"hot state of root {f['root_id']} differed from Postgres twice" in caplog.text
    assert f"account {f['child_id']} balance {f['scoped']}: '350' in Redis, '250' in Postgres" \
        in caplog.text
    assert await api.live(f["child"]) == before
    metrics = (await client.get("/metrics", headers=api.admin)).text.splitlines()
    assert "creditgate_hotstate_roots_repaired_total 1" in metrics
    assert "creditgate_hotstate_roots_verified_total 1" in metrics
    # the next root only once the period is over
    assert await check_sampled(ctx, sampling, 1, f["root_id"]) == 0
    assert sampling.verified == 1


async def test_a_sampled_difference_gone_at_the_second_look_is_left_alone(
        api: Api, app: Any, db: asyncpg.Connection, sampling: HotCheck) -> None:
    f = await _family(api, db)
    ctx = app.state.ctx
    hot, tag = ctx.hot, ctx.hot.keys.tag(f["root_id"])
    await hot.redis.hset(f"{tag}:a:{f['child_id']}", "st", "blocked")
    await check_sampled(ctx, sampling, 1, f["root_id"])
    assert sampling.suspect is not None
    await hot.redis.hset(f"{tag}:a:{f['child_id']}", "st", "active")  # Redis caught up
    assert await check_sampled(ctx, sampling, 1) == 0
    assert sampling.repaired == 0
    assert await hot.redis.exists(hot.keys.root(f["root_id"])) == 1


async def test_a_random_root_is_one_of_this_deployments(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    """One this process wrote to lately; for a process that wrote to none, a loaded one."""
    await _family(api, db)
    hot = app.state.ctx.hot
    fresh = HotState(hot.redis, hot.fast, hot.keys)  # (another process: it wrote nothing)
    assert fresh.recent_roots() == []
    for picker in (hot, fresh):  # (the whole keyspace: the test Redis may hold many sessions')
        picked = await random_root(picker, pages=10**6)
        assert picked is not None
        assert await db.fetchval("SELECT count(*) FROM accounts WHERE id = $1 AND root_id = id",
                                 picked) == 1
    assert await random_root(HotState(hot.redis, hot.fast, Keys("cg-none")), pages=10**6) is None
