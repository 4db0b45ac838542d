"""The usage summary of a busy account: a month by day read from every event (any range that is
not whole hours, and every summary before migration 032) against the hourly rollups plus the
events no pass has summed yet; and what the rollups' `xid` column and its BRIN index cost an
insert of usage events.

    .venv/bin/python bench/rollups.py [--history 1000000] [--tail 5000] [--rounds 3]

A database of its own; no app server, the two summary statements called as the route calls
them. One account with `--history` usage events over the last 30 days, summed by one rollup
pass, then `--tail` more the pass has not summed. Each round: the summary of the 30 days by
day, each way, timed (wall, and the CPU of every postgres process); both must answer the same.
Then the write: 100 inserts of 1,000 events each, with the column's default and the index, and
with neither (as before migration 032), each way in turn per round.

Printed: ms per summary and per 1,000-event insert, each way, and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # bench/passes.py: the database, the table, the CPU clock

from app.entitlements import history_repository as history
from app.entitlements.rollups import roll_up

READS = ("events", "rollups")
WRITES = ("without xid", "with xid")
INSERTS, ROWS = 100, 1_000
_EVENTS = """INSERT INTO usage_events (account_id, uid, product_code, credit_type_id, amount,
                                       event_time, recorded_at)
             SELECT 1, $1 || n, 'api', 1, 0.01, t, t
             FROM (SELECT n, $2::timestamptz + n * ($3::interval / $4) AS t
                   FROM generate_series(1, $4) AS n) s"""


async def populate(conn: asyncpg.Connection, history_events: int, tail: int,
                   start: datetime, now: datetime) -> None:
    await passes.one_account(conn, effective=timedelta(days=60))
    await conn.execute(_EVENTS, "old-", start, now - start, history_events)
    if await roll_up(conn) is None:
        raise SystemExit("the rollup pass did not run")
    await conn.execute(_EVENTS, "tail-", now - timedelta(hours=1), timedelta(hours=1), tail)
    await conn.execute("ANALYZE usage_events")


async def summary(conn: asyncpg.Connection, way: str, start: datetime,
                  end: datetime) -> list[tuple[object, ...]]:
    if way == "rollups":
        rows = await history.summary_rolled(conn, 1, "day", start, end, None, None)
    else:  # as the route reads a range of any bounds
        rows = await history.summary(conn, 1, "day", start, end,
                                     start - timedelta(hours=1, minutes=5),
                                     end + timedelta(days=35, hours=1), None, None)
    return [tuple(r) for r in rows]


async def prepare_write(conn: asyncpg.Connection, way: str) -> None:
    """The table as it is (`with xid`) or as it was before migration 032 (untimed)."""
    if way == "with xid":
        await conn.execute("ALTER TABLE usage_events ALTER COLUMN xid "
                           "SET DEFAULT (pg_current_xact_id()::text::int8)")
        await conn.execute("CREATE INDEX IF NOT EXISTS usage_events_xid_brin ON usage_events "
                           "USING brin (xid) WITH (pages_per_range = 32, autosummarize = on)")
    else:
        await conn.execute("ALTER TABLE usage_events ALTER COLUMN xid DROP DEFAULT")
        await conn.execute("DROP INDEX IF EXISTS usage_events_xid_brin")


async def write(conn: asyncpg.Connection, way: str, round_: int) -> None:
    at = datetime.now(UTC) + timedelta(days=2)  # outside the summary's range
    for n in range(INSERTS):
        await conn.execute(_EVENTS, f"w{round_}-{WRITES.index(way)}-{n}-", at, timedelta(minutes=1), ROWS)


async def measure(opts: argparse.Namespace, url: str, _redis_url: str,
                  _keys: dict[str, str]) -> passes.Totals:
    conn = await asyncpg.connect(url)
    try:
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        start, end = now - timedelta(days=30), now + timedelta(hours=1)
        await populate(conn, opts.history, opts.tail, start, now)
        print(f"one account: {opts.history:,} usage events over 30 days, summed; "
              f"{opts.tail:,} more not summed yet")
        totals: passes.Totals = {way: [0.0, 0.0] for way in READS + WRITES}
        answers = {}
        for n in range(opts.rounds):
            for way in READS:
                wall, used = time.perf_counter(), passes.postgres_cpu()
                answers[way] = await summary(conn, way, start, end)
                wall, used = time.perf_counter() - wall, passes.postgres_cpu() - used
                totals[way][0] += wall * 1000
                totals[way][1] += used * 1000
                print(f"round {n + 1} summary from {way:8}  {wall * 1000:9.1f} ms wall  "
                      f"{used * 1000:7.1f} ms Postgres CPU  ({len(answers[way])} days)")
            if answers["events"] != answers["rollups"]:
                raise SystemExit("the two summaries differ")
            for way in WRITES:
                await prepare_write(conn, way)
                wall, used = time.perf_counter(), passes.postgres_cpu()
                await write(conn, way, n)
                wall, used = time.perf_counter() - wall, passes.postgres_cpu() - used
                totals[way][0] += wall * 1000 / INSERTS
                totals[way][1] += used * 1000 / INSERTS
                print(f"round {n + 1} insert {way:11}  {wall * 1000 / INSERTS:9.2f} ms wall  "
                      f"{used * 1000 / INSERTS:7.2f} ms Postgres CPU per {ROWS:,} events")
        return totals
    finally:
        await conn.close()


def report(opts: argparse.Namespace, totals: passes.Totals) -> None:
    passes.table(f"one account, {opts.history:,} events over 30 days summed and {opts.tail:,} "
                 "not yet; its 30-day summary by day", "Postgres CPU",
                 [("every event read (any range not on whole hours; all before 032)", "events"),
                  ("hourly rollups + the events not summed yet", "rollups")],
                 totals, opts.rounds)
    passes.table(f"an insert of {ROWS:,} usage events (the journal's batch)", "Postgres CPU",
                 [("with the xid default and its BRIN index", "with xid"),
                  ("without (before migration 032)", "without xid")], totals, opts.rounds)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--history", type=int, default=1_000_000)
    p.add_argument("--tail", type=int, default=5_000)


if __name__ == "__main__":
    passes.main(__doc__, options, measure, report)
