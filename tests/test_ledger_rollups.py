"""Ledger rollups (app/ledger/rollups.py): a balance as of a past time reads hourly sums, the
entries of its hour and what no pass has summed yet, and answers what summing every entry up to
that time answers, before, between and after passes, for entries made in order and entries
flushed late, with marks of the entry sequence taken as time goes on."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app.db import migrate
from app.ledger.rollups import CLOCK_SLACK, _lower, _upper, balance_at, prune_marks, roll_up
from app.settings import REPO_ROOT, Settings
from tests.conftest import _with_database
from tests.fresh import fresh_app, migrations_before

NAIVE = """
    SELECT ct.code AS credit_type, ct.decimal_places,
           COALESCE(sum(e.amount) FILTER (WHERE e.kind <> 'overage'), 0) AS balance,
           COALESCE(-sum(e.amount) FILTER (WHERE e.kind = 'overage'), 0) AS overage
    FROM ledger_entries e JOIN credit_types ct ON ct.id = e.credit_type_id
    WHERE e.account_id = $1 AND e.created_at <= $2
    GROUP BY ct.code, ct.decimal_places ORDER BY ct.code"""

CATALOG = """
    INSERT INTO credit_types (id, code, name, kind, decimal_places)
        VALUES (1, 'usd', 'USD', 'fiat', 2), (2, 'tok', 'Tokens', 'custom', 0)
        ON CONFLICT DO NOTHING;
    INSERT INTO products (code, name) VALUES ('api', 'API') ON CONFLICT DO NOTHING;"""


def _totals(rows: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
    return [(r["credit_type"], D(r["balance"]), D(r["overage"])) for r in rows]


class Timeline:
    """One account's entries written straight to the table as time goes on (`clock`): entries
    made now, entries made earlier and flushed late, marks of the sequence, passes."""

    def __init__(self, db: asyncpg.Connection, account_id: int, start: datetime) -> None:
        self.db, self.account_id, self.clock = db, account_id, start
        self.times: list[datetime] = []

    async def entry(self, made: datetime, credit_type: int, amount: int, overage: bool,
                    xid: bool = True) -> None:
        """An entry made at `made`, written now: an overage entry, or an adjustment of the
        account's balance of the credit type (with no xid: as written before migration 025)."""
        await self.db.execute(
            """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id,
                                           kind, amount, created_at, xid)
               VALUES ($1, 0, $2::int8,
                       CASE WHEN $6 THEN NULL ELSE $2::int8 * 10 + $3::int8 END, $3,
                       CASE WHEN $6 THEN 'overage' ELSE 'adjustment' END, $4, $5,
                       CASE WHEN $7 THEN pg_current_xact_id() END)""",
            f"t:{self.account_id}:{uuid.uuid4().hex}", self.account_id, credit_type, D(amount), made,
            overage, xid)
        self.times.append(made)

    async def mark(self) -> None:
        """A mark as a pass takes it, at the timeline's clock: every entry written from here on
        has a higher id (and none is made before the clock)."""
        await self.db.execute(
            """INSERT INTO ledger_id_marks (taken_at, last_id)
               SELECT $1, COALESCE(max(id), 0) FROM ledger_entries ON CONFLICT DO NOTHING""",
            self.clock)

    async def agree(self) -> None:
        """balance_at equals the sum of every entry up to `at`, at every instant that matters."""
        points = {self.clock}
        for t in self.times:
            hour = t.replace(minute=0, second=0, microsecond=0)
            points |= {t, t - timedelta(microseconds=1), hour, hour - timedelta(microseconds=1),
                       hour + timedelta(hours=1)}
        for at in sorted(points):
            expected = _totals(await self.db.fetch(NAIVE, self.account_id, at))
            assert _totals(await balance_at(self.db, self.account_id, at)) == expected, at


# one step of a timeline: (what, minutes, amount, credit type, overage)
STEPS = st.lists(st.tuples(st.sampled_from(["now", "now", "now", "late", "ahead", "mark",
                                            "pass", "prune"]),
                           st.integers(0, 150), st.integers(-500, 500), st.sampled_from([1, 2]),
                           st.booleans()), min_size=1, max_size=25)


async def _account(db: asyncpg.Connection, account_id: int) -> None:
    await db.execute("INSERT INTO accounts (id, code, name, root_id, credit_type_id) "
                     "VALUES ($1, $2, 'A', $1, 1)", account_id, f"a{account_id}")
    await db.execute(
        """INSERT INTO balances (id, account_id, credit_type_id, priority, effective_at, source)
           SELECT $1 * 10 + ct, $1, ct, 0, '2000-01-01', 'grant'
           FROM unnest('{1,2}'::int8[]) ct""", account_id)


@pytest.fixture(scope="module")
def own_database(servers: tuple[str, str]) -> Iterator[str]:
    """A database of this module's own (workers of no app on it): the property's marks are
    taken at its timelines' clocks, which would mislead the session's other accounts."""
    name = f"creditgate_rollups_{uuid.uuid4().hex[:8]}"
    url = _with_database(servers[0], name)

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(servers[0])
        await conn.execute(sql)
        await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        asyncio.run(migrate(url, REPO_ROOT / "migrations"))
        asyncio.run(admin_on(url, CATALOG))
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def admin_on(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    await conn.execute(sql)
    await conn.close()


ACCOUNTS = itertools.count(1)


@hypothesis_settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=STEPS)
# a mark taken in the hour it would serve, after an entry of that hour: the hour is read from a
# mark taken CLOCK_SLACK before it, or from id 0, never from this one
@example(steps=[("now", 0, 1, 1, False), ("mark", 0, 0, 1, False), ("now", 3, 2, 1, True)])
# an entry made by a process whose clock is ahead, in the next hour by its clock, then a mark
# taken before that hour by Postgres's: CLOCK_SLACK is what keeps that mark from serving it
@example(steps=[("now", 57, 1, 1, False), ("ahead", 5, 2, 1, False), ("now", 2, 3, 1, False),
                ("mark", 0, 0, 1, False)])
# an entry of an hour written after the first mark past that hour's end (late): read among the
# unsummed entries, then from ledger_late once a pass sums it, and still once a later mark (above
# its id) is taken: the first mark past the hour's end decides, not the latest
@example(steps=[("now", 0, 5, 1, False), ("now", 80, 1, 1, False), ("pass", 0, 0, 1, False),
                ("late", 75, 7, 1, False), ("now", 1, 1, 1, False), ("pass", 0, 0, 1, False),
                ("now", 10, 1, 1, False), ("pass", 0, 0, 1, False)])
# an entry written by a process whose clock is behind, after a mark taken less than CLOCK_SLACK
# past its hour's end: not late, for the pass that sums it and for every read
@example(steps=[("now", 0, 1, 1, False), ("now", 65, 2, 1, False), ("pass", 0, 0, 1, False),
                ("late", 10, 4, 1, False), ("now", 20, 8, 1, False), ("pass", 0, 0, 1, False)])
# marks every few minutes across hours, entries between them, one flushed late, then the marks
# no hour reads dropped: every hour is read as before
@example(steps=[("now", 5, 1, 1, False), ("mark", 0, 0, 1, False), ("now", 20, 2, 1, False),
                ("mark", 0, 0, 1, False), ("now", 30, 3, 2, True), ("mark", 0, 0, 1, False),
                ("now", 9, 4, 1, False), ("mark", 0, 0, 1, False), ("late", 15, 5, 1, False),
                ("now", 12, 6, 1, False), ("mark", 0, 0, 1, False), ("pass", 0, 0, 1, False),
                ("now", 25, 7, 1, False), ("mark", 0, 0, 1, False), ("now", 40, 8, 1, False),
                ("mark", 0, 0, 1, False), ("prune", 0, 0, 1, False), ("late", 70, 9, 1, False),
                ("pass", 0, 0, 1, False), ("prune", 0, 0, 1, False)])
# an hour's upper mark, an entry of that hour written after it (late: a pass copies it to
# ledger_late), later marks, then pruning: the upper mark stays, or the entry would be read
# twice (by id, below a later mark, and from ledger_late)
@example(steps=[("mark", 0, 0, 1, False), ("now", 5, 1, 1, False), ("now", 76, 2, 1, False),
                ("mark", 0, 0, 1, False), ("late", 30, 5, 1, False), ("now", 10, 3, 1, False),
                ("mark", 0, 0, 1, False), ("now", 10, 4, 1, False), ("mark", 0, 0, 1, False),
                ("pass", 0, 0, 1, False), ("prune", 0, 0, 1, False)])
def test_a_balance_as_of_any_time_is_the_sum_of_the_entries_up_to_it(
        own_database: str, steps: list[tuple[str, int, int, int, bool]]) -> None:
    asyncio.run(_timeline(own_database, steps))


async def _timeline(url: str, steps: list[tuple[str, int, int, int, bool]]) -> None:
    db = await asyncpg.connect(url)
    try:
        account_id = next(ACCOUNTS)
        await _account(db, account_id)
        # each timeline's clock starts two days ago: the marks of the one before are dropped
        # (taken in order, as a pass takes them; an account's hours are read with the marks
        # its entries were written with)
        await db.execute("DELETE FROM ledger_id_marks")
        # the clock runs from the start of an hour two days ago, never past now (an entry is
        # made before it is written)
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=2)
        t = Timeline(db, account_id, start)
        for what, minutes, amount, credit_type, overage in steps:
            if what == "now":
                t.clock = min(t.clock + timedelta(minutes=minutes, microseconds=amount % 7),
                              datetime.now(UTC))
                await t.entry(t.clock, credit_type, amount, overage)
            elif what == "late":  # made a while ago, flushed only now
                await t.entry(t.clock - timedelta(minutes=minutes), credit_type, amount, overage)
            elif what == "ahead":  # made by a process whose clock is ahead of Postgres's
                await t.entry(t.clock + min(timedelta(minutes=minutes % 10), CLOCK_SLACK / 2),
                              credit_type, amount, overage)
            elif what == "mark":
                await t.mark()
            elif what == "prune":  # every mark no hour reads, whatever its age
                await prune_marks(db, t.clock, keep=timedelta(0))
                await t.agree()
            else:  # a pass, with its mark taken at the timeline's clock
                await roll_up(db, t.clock)
                await t.agree()
        await t.agree()
        await roll_up(db, t.clock)
        await t.agree()
    finally:
        await db.close()


async def test_an_entry_committed_after_a_pass_began_is_counted_once(
        servers: tuple[str, str], settings: Settings) -> None:
    """A transaction open across a pass holds its horizon: its entry is not summed by that pass
    but read as unsummed, then summed by the next one; the balance counts it once throughout."""
    async with fresh_app(servers, settings) as f:
        await f.db.execute(CATALOG)
        await _account(f.db, 1)
        t = Timeline(f.db, 1, datetime.now(UTC) - timedelta(hours=5))
        await t.entry(t.clock, 1, 100, False)
        await t.mark()
        other = await asyncpg.connect(f.settings.database_url)
        try:
            async with other.transaction():
                await other.execute(
                    """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id,
                                                   credit_type_id, kind, amount, created_at)
                       VALUES ('late', 0, 1, NULL, 1, 'overage', -30, $1)""",
                    t.clock - timedelta(hours=2))
                assert await roll_up(f.db) is not None  # sums the first entry only
                t.times.append(t.clock - timedelta(hours=2))
                await t.agree()  # (the open entry is not seen by anyone yet)
            await t.agree()  # committed: read as unsummed
            assert await balance_at(f.db, 1, t.clock) == await f.db.fetch(NAIVE, 1, t.clock)
            assert _totals(await balance_at(f.db, 1, t.clock)) == [("usd", D(100), D(30))]
            assert await roll_up(f.db) is not None  # now summed
            await t.agree()
            assert await f.db.fetchval("SELECT sum(entries) FROM ledger_rollups") == 2
        finally:
            await other.close()


async def test_entries_older_than_their_xid_are_in_the_migrations_rollups(
        servers: tuple[str, str], settings: Settings, tmp_path: Path) -> None:
    """Entries written before migration 025 have no xid: migration 033 sums them, and passes
    add what is written after."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=30)

    async def history(db: asyncpg.Connection) -> None:
        await db.execute(CATALOG)
        await _account(db, 1)
        t = Timeline(db, 1, hour)
        for minutes in range(0, 120, 10):
            await t.entry(hour + timedelta(minutes=minutes), 1, 5, minutes == 60, xid=False)

    async with fresh_app(servers, settings, before_app=history,
                         migrations=migrations_before(settings, 33, tmp_path)) as f:
        rolled = await f.db.fetch("SELECT hour, entries, balance, overage FROM ledger_rollups "
                                  "ORDER BY hour")
        assert [tuple(r) for r in rolled] == [(hour, 6, D(30), D(0)),
                                              (hour + timedelta(hours=1), 6, D(25), D(-5))]
        assert await roll_up(f.db) is None  # nothing with an xid to sum
        t = Timeline(f.db, 1, hour + timedelta(hours=3))
        t.times = [hour + timedelta(minutes=m) for m in range(0, 120, 10)]
        await t.entry(t.clock, 1, 7, False)
        await t.agree()
        assert await roll_up(f.db) == 1
        await t.agree()


async def test_a_pass_marks_the_sequence_every_few_minutes(
        servers: tuple[str, str], settings: Settings) -> None:
    """A pass that sums something records the sequence's last value when the latest mark is
    MARK_EVERY old; a pass with nothing to sum writes nothing."""
    async with fresh_app(servers, settings) as f:
        await f.db.execute(CATALOG)
        await _account(f.db, 1)
        assert await roll_up(f.db) is None
        assert await f.db.fetchval("SELECT count(*) FROM ledger_id_marks") == 0
        t = Timeline(f.db, 1, datetime.now(UTC))
        await t.entry(t.clock, 1, 1, False)
        await roll_up(f.db)
        first = await f.db.fetchval("SELECT max(id) FROM ledger_entries")
        await t.entry(t.clock, 1, 1, False)
        await roll_up(f.db)  # the latest mark is fresh: no new one
        assert [m["last_id"] for m in await f.db.fetch("SELECT last_id FROM ledger_id_marks")] \
            == [first]
        await f.db.execute("UPDATE ledger_id_marks SET taken_at = taken_at - interval '6 min'")
        await t.entry(t.clock, 1, 1, False)
        await roll_up(f.db)
        marks = await f.db.fetch("SELECT last_id FROM ledger_id_marks ORDER BY taken_at")
        assert [m["last_id"] for m in marks] == [first, first + 2]
        assert CLOCK_SLACK >= timedelta(minutes=5)  # (clocks of app hosts and Postgres)
        await t.agree()


async def test_pruned_marks_leave_every_hour_its_lower_and_upper_mark(own_database: str) -> None:
    """Two days of marks every 5 minutes (a few seconds late each time, as passes come; those
    at 10 to and 10 past on the dot: CLOCK_SLACK from an hour exactly), then the ones no hour
    reads dropped: about two an hour are left, every hour's lower and upper mark is the one it
    was, and pruning again drops nothing."""
    db = await asyncpg.connect(own_database)
    try:
        await db.execute("DELETE FROM ledger_id_marks")
        start = datetime(2026, 3, 1, tzinfo=UTC)
        taken = [start + timedelta(minutes=5 * k, seconds=0 if k % 12 in (2, 10) else k % 7 + 1)
                 for k in range(2 * 288)]
        await db.executemany("INSERT INTO ledger_id_marks (taken_at, last_id) VALUES ($1, $2)",
                             [(at, 1000 + k) for k, at in enumerate(taken)])
        hours = [start.replace(minute=0, second=0) + timedelta(hours=h) for h in range(-1, 50)]

        async def bounds() -> list[tuple[int | None, int | None]]:
            return [tuple(await db.fetchrow(
                f"SELECT {_lower('$1::timestamptz', '$2')}, {_upper('$1::timestamptz', '$2')}",
                hour, CLOCK_SLACK)) for hour in hours]

        before = await bounds()
        now = taken[-1] + timedelta(minutes=1)
        # none is old enough yet to be dropped by the passes' default
        assert await prune_marks(db, now) == 0
        dropped = await prune_marks(db, now, keep=timedelta(0))
        left = await db.fetchval("SELECT count(*) FROM ledger_id_marks")
        assert dropped + left == len(taken) and left <= 2 * 49 + 2, (dropped, left)
        assert await bounds() == before
        assert await prune_marks(db, now, keep=timedelta(0)) == 0
    finally:
        await db.close()


async def test_entry_ids_are_handed_out_in_the_order_they_are_taken(db: asyncpg.Connection) -> None:
    """The marks' reasoning holds only while every session takes the next id of the sequence
    (a cache of 1): with a larger cache a session hands out ids it reserved earlier, so an id
    below a mark could be written after it. A migration that changes the cache fails here."""
    sequence = await db.fetchval("SELECT pg_get_serial_sequence('ledger_entries', 'id')")
    assert sequence is not None
    assert await db.fetchval(
        "SELECT cache_size FROM pg_sequences WHERE format('%I.%I', schemaname, sequencename) = $1",
        sequence) == 1
