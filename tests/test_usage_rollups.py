"""Usage rollups (app/entitlements/rollups.py): a summary over whole hours reads the hourly sums
plus what no pass has summed yet, and answers what reading every event answers, before, between
and after passes; an event whose transaction commits after a pass began is summed exactly once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import asyncpg

from app.entitlements import history_repository as repo
from app.entitlements.rollups import roll_up
from app.settings import Settings
from tests.conftest import Api
from tests.fresh import fresh_app, migrations_before
from tests.test_usage_history import _end_hold, _hold, _iso


async def _account_id(db: asyncpg.Connection, code: str) -> int:
    account_id: int = await db.fetchval("SELECT id FROM accounts WHERE code = $1", code)
    return account_id


async def _horizon(db: asyncpg.Connection) -> int:
    horizon: int = await db.fetchval("SELECT horizon FROM usage_rollup_cursor WHERE id = 1")
    return horizon


async def _pass_beyond(db: asyncpg.Connection, xid: int) -> None:
    """Run passes (this test's, or the session's workers') until every usage event written by
    transaction `xid` or before it is summed: none left at or above the horizon. The horizon
    waits for the oldest transaction running anywhere on the server, so in a full run another
    test's open transaction can hold it for seconds (5 s once ran out); and a pass moves it
    only when there is something to sum, so one that summed the last events just short of
    `xid` leaves it there for good (waiting for it to pass `xid` once ran out after 30 s)."""
    for _ in range(600):
        await roll_up(db)
        if await db.fetchval(
                """SELECT NOT EXISTS (SELECT 1 FROM usage_events e, usage_rollup_cursor c
                                      WHERE c.id = 1 AND e.xid >= c.horizon AND e.xid <= $1)""",
                xid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the events up to transaction {xid} were never all summed")


def _rows(records: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
    return [(r["bucket"], r["product_code"], r["credit_type_id"], r["events"], r["amount"],
             r["reversed"], r["overage"]) for r in records]


async def _both(db: asyncpg.Connection, account_id: int, window: str, start: datetime,
                end: datetime, product: str | None = None) -> list[tuple[Any, ...]]:
    """The summary from the rollups, asserted equal to the one that reads every event."""
    rolled = _rows(await repo.summary_rolled(db, account_id, window, start, end, product, None))
    read = _rows(await repo.summary(db, account_id, window, start, end,
                                    start - timedelta(days=2), end + timedelta(days=40),
                                    product, None))
    assert rolled == read
    return rolled


async def test_the_rolled_summary_answers_what_reading_every_event_does(
        api: Api, db: asyncpg.Connection) -> None:
    n = await api.setup()
    account_id = await _account_id(db, n["account"])
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    base = hour - timedelta(hours=30)
    await api.grant(n["account"], "10.00", effective_at=_iso(base - timedelta(days=1)))

    async def report(uid: str, product: str, amount: str, at: datetime) -> None:
        await api.call("POST", "/v1/usage", scope="runtime", json={
            "uid": uid, "account": n["account"], "product": product, "amount": amount,
            "timestamp": _iso(at)})

    await report("a", n["api"], "1.25", base + timedelta(minutes=5))
    await report("b", n["storage"], "2.00", base + timedelta(minutes=59, seconds=59))
    await report("c", n["api"], "3.10", base + timedelta(hours=1))
    await api.call("POST", f"/v1/accounts/{n['account']}/usage-events/a/reverse",
                   scope="runtime", expect=201, json={"amount": "0.25"})
    await _hold(api, n["account"], n["api"], "2.00", "h-1")
    await _end_hold(api, n["account"], "h-1", "1.50")
    await _hold(api, n["account"], n["api"], "1.00", "h-2")  # open: not counted
    start, end = base - timedelta(hours=1), hour + timedelta(hours=2)  # holds: now

    before = await _both(db, account_id, "hour", start, end)
    assert [r[3] for r in before] == [1, 1, 1, 1]  # a, b, c, the captured hold
    await _pass_beyond(db, await db.fetchval("SELECT pg_current_xact_id()::text::int8"))
    assert await _both(db, account_id, "hour", start, end) == before
    assert await db.fetchval("SELECT sum(events) FROM usage_rollups WHERE account_id = $1",
                             account_id) == 3  # the client's events; the hold is read live
    # after the pass: more usage in a summed hour (past the balance: overage), a reversal of a
    # summed event, a capture of the open hold
    await report("d", n["api"], "5.00", base + timedelta(minutes=30))
    await api.call("POST", f"/v1/accounts/{n['account']}/usage-events/c/reverse",
                   scope="runtime", expect=201, json={})
    await _end_hold(api, n["account"], "h-2", "1.00")
    after = await _both(db, account_id, "hour", start, end)
    first = [r for r in after if r[0] == base and r[1] == n["api"]]
    assert [(r[3], r[4], r[5]) for r in first] == [(2, D('6.25'), D('0.25'))]  # a and d
    assert sum(r[6] for r in after) > 0  # d went past the balance
    await _pass_beyond(db, await db.fetchval("SELECT pg_current_xact_id()::text::int8"))
    assert await _both(db, account_id, "hour", start, end) == after
    assert sum(r[3] for r in await _both(db, account_id, "day", start, end)) == 6
    assert await _both(db, account_id, "hour", start, end, n["storage"]) == [
        r for r in after if r[1] == n["storage"]]
    # and through the route: a whole-hour range reads the rollups
    out = await api.call("GET", f"/v1/accounts/{n['account']}/usage-summary", scope="runtime",
                         params={"window": "hour", "start": _iso(start), "end": _iso(end)})
    assert [(b["events"], b["amount"]) for b in out["data"]] == [
        (r[3], f"{r[4]:.2f}") for r in after]


async def test_an_event_committed_after_a_pass_began_is_summed_once(
        api: Api, db: asyncpg.Connection, database_url: str) -> None:
    n = await api.setup()
    account_id = await _account_id(db, n["account"])
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    await api.grant(n["account"], "100.00", effective_at=_iso(hour - timedelta(days=1)))
    credit_type_id = await db.fetchval("SELECT id FROM credit_types WHERE code = $1",
                                       n["credit_type"])
    late = await asyncpg.connect(database_url)
    try:
        tx = late.transaction()
        await tx.start()
        # a flush whose transaction is still open (a slow one, or a dead process's journal
        # entry being replayed): written with a time before the passes below
        await late.execute(
            """INSERT INTO usage_events (account_id, uid, product_code, credit_type_id, amount,
                                         overage, event_time, recorded_at)
               VALUES ($1, 'late', $2, $3, 2.00, 0, $4, $4)""",
            account_id, n["api"], credit_type_id, hour)
        xid = await late.fetchval("SELECT pg_current_xact_id()::text::int8")
        await api.call("POST", "/v1/usage", scope="runtime", json={
            "uid": "on-time", "account": n["account"], "product": n["api"], "amount": "1.00",
            "timestamp": _iso(hour)})
        on_time = await db.fetchval("SELECT xid FROM usage_events WHERE account_id = $1 "
                                    "AND uid = 'on-time'", account_id)
        for _ in range(3):  # passes cannot sum past the open transaction
            await roll_up(db)
            assert await _horizon(db) <= xid
        assert on_time > xid
        await tx.commit()
    finally:
        await late.close()
    start, end = hour, hour + timedelta(hours=1)
    expected = [(hour, n["api"], credit_type_id, 2, 3, 0, 0)]
    assert await _both(db, account_id, "hour", start, end) == expected
    await _pass_beyond(db, on_time)
    assert await _both(db, account_id, "hour", start, end) == expected
    assert await db.fetchval("SELECT events FROM usage_rollups WHERE account_id = $1",
                             account_id) == 2


async def test_one_process_passes_at_a_time(api: Api, db: asyncpg.Connection,
                                            database_url: str) -> None:
    n = await api.setup()
    account_id = await _account_id(db, n["account"])
    other = await asyncpg.connect(database_url)
    try:
        for attempt in range(50):
            await api.usage(n["account"], n["api"], "1.00", uid=f"u-{attempt}")
            xid = await db.fetchval("SELECT xid FROM usage_events WHERE account_id = $1 "
                                    "AND uid = $2", account_id, f"u-{attempt}")
            async with other.transaction():
                held = await other.fetchval(
                    "SELECT horizon FROM usage_rollup_cursor WHERE id = 1 FOR UPDATE SKIP LOCKED")
                if held is None or held > xid:  # a session worker's pass had it first: again
                    continue
                # an event to sum, and the cursor held elsewhere: skipped, not waiting
                assert await roll_up(db) is None
                assert await _horizon(db) == held
            await _pass_beyond(db, xid)  # released: the next pass sums it
            return
        raise AssertionError("the session's workers always passed first")
    finally:
        await other.close()


async def test_events_written_before_the_migration_are_in_its_rollups(
        servers: tuple[str, str], settings: Settings, tmp_path: Path) -> None:
    """Usage written under migration 031 (no xid): migration 032 sums it, and a whole-hour
    summary (rollups) and any other range (events) agree, before and after a pass."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)

    async def history(db: asyncpg.Connection) -> None:
        await db.execute(
            """INSERT INTO credit_types (id, code, name, kind, decimal_places)
                   VALUES (1, 'usd', 'USD', 'fiat', 2);
               INSERT INTO products (code, name) VALUES ('api', 'API');
               INSERT INTO accounts (id, code, name, root_id, credit_type_id)
                   VALUES (1, 'old', 'Old', 1, 1);""")
        await db.execute(
            """INSERT INTO usage_events (account_id, uid, product_code, credit_type_id, amount,
                                         overage, event_time, recorded_at)
               SELECT 1, 'old' || g, 'api', 1, 0.5, CASE WHEN g = 1 THEN 0.5 ELSE 0 END, at, at
               FROM generate_series(1, 90) g,
                    LATERAL (SELECT $1::timestamptz + g * interval '1 minute' AS at) t""",
            hour)

    async with fresh_app(servers, settings, before_app=history,
                         migrations=migrations_before(settings, 32, tmp_path)) as f:
        rolled = await f.db.fetch("SELECT hour, events, amount, overage FROM usage_rollups")
        assert [tuple(r) for r in rolled] == [(hour, 59, D("29.5"), D("0.5")),
                                              (hour + timedelta(hours=1), 31, D("15.5"), D(0))]
        url = "/v1/accounts/old/usage-summary"
        await f.api.grant("old", "10.00", effective_at=_iso(hour))
        await f.api.call("POST", "/v1/usage", scope="runtime", json={
            "uid": "new", "account": "old", "product": "api", "amount": "1.00",
            "timestamp": _iso(hour + timedelta(minutes=30))})
        for rolled in (False, True):
            for end in (hour + timedelta(hours=2), hour + timedelta(hours=2, seconds=1)):
                out = await f.api.call("GET", url, scope="runtime", params={
                    "window": "hour", "start": _iso(hour), "end": _iso(end)})
                assert [(b["events"], b["amount"], b["overage"]) for b in out["data"]] == [
                    (60, "30.50", "0.50"), (31, "15.50", "0.00")], end
            # the pass sums the new event; a second one finds nothing to sum
            assert (await roll_up(f.db) is None) == rolled
