"""Pages of an account's stored measurements (`GET /v1/accounts/{code}/measurements`) for an
account with a long history: one sort of all the account's rows, against each meter's newest
rows from the (account_id, meter_id, ts) index, merged (app/rating/repository.py:
measurements).

    .venv/bin/python bench/measurement_list.py [--measurements 1000000] [--meters 5]
                                               [--pages 20] [--rounds 3]

A database of its own (no app running on it). Account 1 holds `--measurements` measurements
spread evenly over 30 days and over `--meters` meters, and nine other accounts as many between
them. Each round reads the account's first `--pages` pages of 50, newest first, each page
from the cursor of the one before, both ways, and they must agree:

* `one sort`: every measurement of the account past the cursor, sorted by (ts, uid);
* `per meter, merged`: app/rating/repository.py: measurements.

Printed: ms per page (wall, and the CPU of every postgres process), and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # bench/passes.py: the database, the rounds, the table

from app.rating.repository import measurements

WAYS = ("one sort", "per meter, merged")
LIMIT = 50
ONE_SORT = """
    SELECT m.uid, m.ts, m.data, m.rated, mt.code AS meter
    FROM measurements m JOIN meters mt ON mt.id = m.meter_id
    WHERE m.account_id = $1 AND ($2::timestamptz IS NULL OR (m.ts, m.uid) < ($2, $3::text))
    ORDER BY m.ts DESC, m.uid DESC LIMIT $4"""


async def populate(conn: asyncpg.Connection, count: int, meters: int, now: datetime) -> None:
    await conn.execute(
        """INSERT INTO meters (id, code, name, data_fields, derived_fields)
           SELECT g, 'meter-' || g, 'meter', '[{"code": "gb", "category": "measure"}]', '[]'
           FROM generate_series(1, $1) AS g""", meters)
    await conn.execute(
        """INSERT INTO accounts (id, code, name, root_id, credit_type_id)
           SELECT g, 'other-' || g, 'other', g, 1 FROM generate_series(2, 10) AS g""")
    span = timedelta(days=30)
    # account 1's, then the others' (as many in all), made in time order
    await conn.execute(
        """INSERT INTO measurements (account_id, uid, meter_id, ts, data, rated)
           SELECT CASE WHEN n % 2 = 0 THEN 1 ELSE 2 + n % 9 END, 'm' || n, 1 + (n / 2) % $2,
                  $3::timestamptz - (2 * $1 - n) * $4::interval, '{"gb": 1}', n % 3 <> 0
           FROM generate_series(1, 2 * $1) AS n""", count, meters, now, span / (2 * count))
    await conn.execute("VACUUM ANALYZE measurements")


async def measure(opts: argparse.Namespace, url: str, _redis_url: str,
                  _keys: dict[str, str]) -> passes.Totals:
    conn = await asyncpg.connect(url, server_settings={"jit": "off"})  # as the app's pool
    try:
        await passes.one_account(conn)
        await populate(conn, opts.measurements, opts.meters, datetime.now(UTC))
        print(f"account 1: {opts.measurements:,} measurements over 30 days and {opts.meters} "
              f"meters (and as many of 9 other accounts); {opts.pages} pages of {LIMIT}")
        answers: dict[str, list[list[str]]] = {}

        async def read(way: str) -> int:
            pages, before = [], None
            for _ in range(opts.pages):
                at, uid = before or (None, None)
                rows = (await conn.fetch(ONE_SORT, 1, at, uid, LIMIT) if way == WAYS[0] else
                        await measurements(conn, 1, None, None, None, None, before, LIMIT))
                pages.append([r["uid"] for r in rows])
                before = (rows[-1]["ts"], rows[-1]["uid"])
            if answers.setdefault(way, pages) != pages or \
                    (len(answers) == 2 and answers[WAYS[0]] != answers[WAYS[1]]):
                raise SystemExit("the two ways answered differently")
            return 0

        totals = await passes.timed_rounds(opts.rounds, WAYS, read, passes.postgres_cpu,
                                           "Postgres CPU")
        for way in WAYS:  # per page
            totals[way] = [t / opts.pages for t in totals[way]]
        return totals
    finally:
        await conn.close()


def report(opts: argparse.Namespace, totals: passes.Totals) -> None:
    passes.table(f"one account with {opts.measurements:,} measurements over {opts.meters} "
                 f"meters; one page of {LIMIT}, newest first", "Postgres CPU",
                 [("one sort of the account's measurements", WAYS[0]),
                  ("each meter's newest from the index, merged", WAYS[1])],
                 totals, opts.rounds)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--measurements", type=int, default=1_000_000)
    p.add_argument("--meters", type=int, default=5)
    p.add_argument("--pages", type=int, default=20)


if __name__ == "__main__":
    passes.main(__doc__, options, measure, report)
