"""Balance snapshots: a hot-state rebuild reads a snapshot plus the entries after it, and every
entry is counted exactly once, whatever order flushes commit in and however snapshots race."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from app.ledger.snapshots import snapshot_balance, take_due
from app.settings import Settings
from tests.conftest import Api, now_iso
from tests.fresh import fresh_app, migrations_before
from tests.procs import run_apps


async def _sums(db: asyncpg.Connection, account: str) -> tuple[Decimal, Decimal]:
    """(what the account's live balances hold, what it owes) summed over its whole ledger."""
    row = await db.fetchrow(
        """SELECT COALESCE(sum(e.amount) FILTER (WHERE b.status = 'active'), 0) AS held,
                  COALESCE(-sum(e.amount) FILTER (WHERE e.kind = 'overage'), 0) AS owed
           FROM ledger_entries e JOIN accounts a ON a.id = e.account_id
           LEFT JOIN balances b ON b.id = e.balance_id WHERE a.code = $1""", account)
    return Decimal(row["held"]), Decimal(row["owed"])


async def _hot(api: Api, account: str) -> tuple[Decimal, Decimal]:
    [total] = (await api.live(account))["totals"]
    return Decimal(total["available"]), Decimal(total["overage"])


async def _rebuilt(app: Any, api: Api, account: str) -> tuple[Decimal, Decimal]:
    ctx = app.state.ctx
    await ctx.hot.invalidate((await ctx.catalog.account(account)).root_id)
    return await _hot(api, account)


async def test_a_rebuild_reads_the_snapshot_and_only_the_entries_after_it(
        servers: tuple[str, str], settings: Settings) -> None:
    """On an app of its own with no workers: the session app's worker (snapshots every 3
    entries) could count these entries first and take or skip their snapshots itself."""
    async with fresh_app(servers, settings) as fresh:
        await _rebuild_reads_the_snapshot(fresh.api, fresh.app, fresh.db)


async def _rebuild_reads_the_snapshot(api: Api, app: Any, db: asyncpg.Connection) -> None:
    n = await api.setup()
    balance = await api.grant(n["account"], "10.00")
    for _ in range(6):
        await api.usage(n["account"], n["api"], "2.00")  # 10.00 drawn, 2.00 owed
    assert await take_due(app.state.ctx, every=1) >= 2  # the balance and the overage
    snap = await db.fetchrow("SELECT * FROM balance_snapshots WHERE balance_id = $1",
                             balance["id"])
    assert snap["amount"] == Decimal("0.00") and snap["tail_entries"] == 0
    assert await db.fetchval("SELECT horizon > '0' FROM balance_snapshots "
                             "WHERE balance_id = $1", balance["id"])
    await api.grant(n["account"], "5.00")
    await api.usage(n["account"], n["api"], "1.50")
    assert await _rebuilt(app, api, n["account"]) == await _sums(db, n["account"]) == \
        (Decimal("3.50"), Decimal("2.00"))

    # the rebuild takes the snapshot's word for what is before its horizon (not a full sum)
    await db.execute("UPDATE overage_snapshots SET amount = amount - 1 WHERE account_id = "
                     "(SELECT id FROM accounts WHERE code = $1)", n["account"])
    assert await _rebuilt(app, api, n["account"]) == (Decimal("3.50"), Decimal("3.00"))
    await db.execute("UPDATE overage_snapshots SET amount = amount + 1 WHERE account_id = "
                     "(SELECT id FROM accounts WHERE code = $1)", n["account"])
    # a newer snapshot adds the entries between the horizons, once
    await api.usage(n["account"], n["api"], "0.25")
    assert await take_due(app.state.ctx, every=1) >= 1
    async with app.state.ctx.pool.acquire() as conn:  # again at once: a higher horizon, or not
        await snapshot_balance(conn, balance["id"])
    assert await _rebuilt(app, api, n["account"]) == await _sums(db, n["account"]) == \
        (Decimal("3.25"), Decimal("2.00"))
    read = await api.call("GET", f"/v1/balances/{balance['id']}")
    assert (read["granted"], read["remaining"]) == ("10.00", "0.00")


async def test_snapshots_taken_while_two_processes_write_lose_and_double_nothing(
        api: Api, app: Any, settings: Settings, db: asyncpg.Connection,
        redis: aioredis.Redis) -> None:
    """Usage and grants through two processes (whose workers snapshot every 3 entries) while
    this process snapshots every entry it can, as fast as it can: afterwards, every balance's
    snapshot plus tail equals the sum of its ledger, and so does the rebuilt hot state."""
    accounts = [await api.setup() for _ in range(3)]
    for n in accounts:
        await api.grant(n["account"], "30.00")
    async with run_apps(settings, 2) as apps:
        async with apps[0].client() as one, apps[1].client() as two:
            async def use(i: int) -> httpx.Response:
                n = accounts[i % 3]
                return await (one, two)[i % 2].post("/v1/usage", headers=api.runtime, json={
                    "events": [{"uid": f"s{i}-{k}", "account": n["account"],
                                "product": n["api"], "amount": "0.25",
                                "timestamp": now_iso()} for k in range(4)]})

            stop = asyncio.Event()

            async def snapshotter() -> int:
                taken = 0
                while not stop.is_set():
                    taken += await take_due(app.state.ctx, every=1)
                    await asyncio.sleep(0)
                return taken

            running = asyncio.create_task(snapshotter())
            answers = await asyncio.gather(*(use(i) for i in range(120)))
            stop.set()
            taken = await running
            assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
            # snapshots were taken: by this snapshotter, or by one of the three workers it races
            # for the shared counting cursor (whoever counts first takes them). A worker may have
            # counted the last entries and not yet snapshotted them: wait for its pass to end.
            snapshotted = 0
            for _ in range(300):
                snapshotted = await db.fetchval(
                    """SELECT count(*) FROM balance_snapshots s
                       JOIN balances b ON b.id = s.balance_id
                       JOIN accounts a ON a.id = b.account_id
                       WHERE a.code = ANY($1::text[]) AND s.horizon <> '0'""",
                    [n["account"] for n in accounts])
                if snapshotted == 3:
                    break
                await asyncio.sleep(0.1)
            assert snapshotted == 3, (snapshotted, taken)
            await redis.flushall()
            for n in accounts:
                live = await one.get(f"/v1/accounts/{n['account']}/balances",
                                     headers=api.runtime)
                [total] = live.json()["totals"]
                held, owed = await _sums(db, n["account"])
                assert (Decimal(total["available"]), Decimal(total["overage"])) == (held, owed)
                assert (held, owed) == (Decimal("0.00"), Decimal("10.00"))  # 40.00 used of 30
        assert apps.tracebacks() == ""
    mismatched = await db.fetch(
        """SELECT s.balance_id FROM balance_snapshots s
           WHERE s.amount + COALESCE((SELECT sum(e.amount) FROM ledger_entries e
                                      WHERE e.balance_id = s.balance_id
                                        AND e.xid >= s.horizon), 0)
                 <> COALESCE((SELECT sum(e.amount) FROM ledger_entries e
                              WHERE e.balance_id = s.balance_id), 0)""")
    assert mismatched == []


async def test_entries_written_before_the_migration_are_in_its_snapshots(
        servers: tuple[str, str], settings: Settings, tmp_path: Path) -> None:
    """A ledger written under migration 024 (no xid): migration 025 snapshots it, and the
    rebuilt hot state, later entries and later snapshots all agree with the full sums."""

    async def history(db: asyncpg.Connection) -> None:
        await db.execute(
            """INSERT INTO credit_types (id, code, name, kind, decimal_places)
                   VALUES (1, 'usd', 'USD', 'fiat', 2);
               INSERT INTO products (code, name) VALUES ('api', 'API');
               INSERT INTO accounts (id, code, name, root_id, credit_type_id)
                   VALUES (1, 'old', 'Old', 1, 1);
               INSERT INTO balances (id, account_id, credit_type_id, priority, effective_at,
                                     description, source, status)
                   VALUES (1, 1, 1, 100, now() - interval '1 day', 'old', 'grant', 'active');
               SELECT setval('balances_id_seq', 1);
               INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id,
                                           kind, amount, created_at)
                   VALUES ('g:1', 0, 1, 1, 1, 'grant', 50, now() - interval '1 day');
               INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id,
                                           kind, amount, usage_uid, product_code, created_at)
                   SELECT 'u:1:old' || g, 0, 1, 1, 1, 'debit', -0.5, 'old' || g, 'api', now()
                   FROM generate_series(1, 90) g;
               INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id,
                                           kind, amount, usage_uid, product_code, created_at)
                   SELECT 'u:1:owe' || g, 0, 1, NULL, 1, 'overage', -0.75, 'owe' || g, 'api',
                          now() FROM generate_series(1, 4) g;""")

    async with fresh_app(servers, settings, before_app=history,
                         migrations=migrations_before(settings, 25, tmp_path)) as f:
        assert await f.db.fetchval("SELECT count(*) FROM ledger_entries WHERE xid IS NULL") == 95
        snap = await f.db.fetchrow("SELECT * FROM balance_snapshots WHERE balance_id = 1")
        assert (snap["amount"], str(snap["horizon"])) == (Decimal("5.0"), "0")
        assert await _hot(f.api, "old") == (Decimal("5.00"), Decimal("3.00"))
        for _ in range(3):
            await f.api.usage("old", "api", "2.00")  # 5.00 then 1.00 more owed
        assert await _sums(f.db, "old") == (Decimal("0.00"), Decimal("4.00"))
        assert await take_due(f.app.state.ctx, every=1) == 2
        snap = await f.db.fetchrow("SELECT * FROM balance_snapshots WHERE balance_id = 1")
        assert snap["amount"] == Decimal("0.00") and str(snap["horizon"]) != "0"
        assert await _rebuilt(f.app, f.api, "old") == (Decimal("0.00"), Decimal("4.00"))


def test_snapshot_every_must_be_at_least_one(settings: Settings,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("CREDITGATE_SNAPSHOT_EVERY", "0")
    with pytest.raises(ValueError, match="CREDITGATE_SNAPSHOT_EVERY"):
        Settings.from_env()
    monkeypatch.setenv("CREDITGATE_SNAPSHOT_EVERY", "250")
    assert Settings.from_env().snapshot_every == 250
