"""An account's balance as of past times (`GET …/balance-at`) for an account with a long
history: every entry up to the time summed, against the ledger rollups (app/ledger/rollups.py).

    .venv/bin/python bench/balance_at.py [--entries 1000000] [--days 60] [--points 20] [--rounds 3]

A database of its own (no app running on it). One account, one balance with `--entries` debits
made evenly over `--days` days up to now and a tenth as many overage entries, entry ids in the
order they were made, and a mark of the entry sequence every 5 minutes of that history (as the
passes take them); then one rollup pass sums them, and 500 entries more are written after it
(not summed yet, as between passes). Each round answers the balance as of `--points` instants
spread over the history (and one just now) both ways, and they must agree:

* `whole history`: the statement `balance-at` ran before migration 033 (every entry of the
  account up to the time, through an index that does not hold the time);
* `rollups`: app/ledger/rollups.py: balance_at.

Then the write: 100 inserts of 1,000 ledger entries each, with the BRIN index on xid that the
rollups read (migration 033) and without it, in turn.

Printed: ms per answer and per 1,000-entry insert (wall, and the CPU of every postgres
process), and the ratios.
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

import passes  # bench/passes.py: the database, the rounds, the table

from app.ledger.rollups import balance_at, roll_up

WAYS = ("whole history", "rollups")
WRITES = ("with the BRIN", "without it")
INSERTS, ROWS = 100, 1_000
_BRIN = """CREATE INDEX IF NOT EXISTS ledger_xid_brin ON ledger_entries USING brin
           ((xid::text::int8)) WITH (pages_per_range = 32, autosummarize = on)"""
# the statement before migration 033
WHOLE = """
    SELECT ct.code AS credit_type, ct.decimal_places,
           COALESCE(sum(e.amount) FILTER (WHERE e.kind <> 'overage'), 0) AS balance,
           COALESCE(-sum(e.amount) FILTER (WHERE e.kind = 'overage'), 0) AS overage
    FROM ledger_entries e JOIN credit_types ct ON ct.id = e.credit_type_id
    WHERE e.account_id = $1 AND e.created_at <= $2
    GROUP BY ct.code, ct.decimal_places ORDER BY ct.code"""


async def populate(conn: asyncpg.Connection, entries: int, days: int, now: datetime) -> None:
    start = now - timedelta(days=days)
    step = timedelta(days=days) / entries
    # debits and every tenth an overage entry, in the order made (ids follow created_at)
    await conn.execute(
        """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id, kind,
                                       amount, usage_uid, product_code, created_at)
           SELECT 'u:1:e' || n, s, 1, CASE WHEN s = 0 THEN 1 END, 1,
                  CASE WHEN s = 0 THEN 'debit' ELSE 'overage' END, -0.01, 'e' || n, 'api',
                  $2::timestamptz + n * $3::interval
           FROM generate_series(1, $1) AS n, generate_series(0, 1) AS s
           WHERE s = 0 OR n % 10 = 0
           ORDER BY n, s""", entries, start, step)
    # (an index of the set-up's own, dropped before anything is timed)
    await conn.execute("CREATE INDEX bench_made ON ledger_entries (created_at)")
    await conn.execute(
        """INSERT INTO ledger_id_marks (taken_at, last_id)
           SELECT t, COALESCE((SELECT id FROM ledger_entries WHERE created_at <= t
                               ORDER BY created_at DESC LIMIT 1), 0)  -- (ids follow the times)
           FROM generate_series($1::timestamptz, $2::timestamptz, interval '5 minutes') AS t""",
        start, now)
    await conn.execute("DROP INDEX bench_made")
    await conn.execute("ANALYZE ledger_entries")
    # what autosummarize does within a minute of the writes (migration 033)
    await conn.execute("SELECT brin_summarize_new_values('ledger_xid_brin')")


async def measure(opts: argparse.Namespace, url: str, _redis_url: str,
                  _keys: dict[str, str]) -> passes.Totals:
    conn = await asyncpg.connect(url, server_settings={"jit": "off"})  # as the app's pool
    try:
        now = datetime.now(UTC)
        await passes.one_account(conn, timedelta(days=opts.days, hours=1))  # made before them
        await populate(conn, opts.entries, opts.days, now)
        assert await roll_up(conn)
        await conn.execute(  # written after the pass: read as not summed yet
            """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id,
                                           kind, amount, created_at)
               SELECT 'late' || n, 0, 1, 1, 1, 'debit', -0.01, $1::timestamptz - n * interval '1 h'
               FROM generate_series(1, 500) AS n""", now)
        span = timedelta(days=opts.days)
        points = [now - span + span * (i + 0.5) / opts.points for i in range(opts.points)]
        points.append(datetime.now(UTC))
        print(f"{opts.entries:,} + {opts.entries // 10:,} entries over {opts.days} days, "
              f"rolled up, then 500 more; {len(points)} instants")
        answers: dict[str, list[list[tuple[str, str, str]]]] = {}

        async def answer(way: str) -> int:
            found = []
            for at in points:
                rows = (await conn.fetch(WHOLE, 1, at) if way == WAYS[0]
                        else await balance_at(conn, 1, at))
                found.append([(r["credit_type"], str(r["balance"]), str(r["overage"]))
                              for r in rows])
            if answers.setdefault(way, found) != found or \
                    (len(answers) == 2 and answers[WAYS[0]] != answers[WAYS[1]]):
                raise SystemExit("the two ways answered differently")
            return 0

        totals = await passes.timed_rounds(opts.rounds, WAYS, answer, passes.postgres_cpu,
                                           "Postgres CPU")
        for way in WAYS:  # per answer
            totals[way] = [t / len(points) for t in totals[way]]
        for way in WRITES:
            totals[way] = [0.0, 0.0]
        for n in range(opts.rounds):
            for way in WRITES:
                await conn.execute(_BRIN if way == WRITES[0] else "DROP INDEX ledger_xid_brin")
                wall, used = time.perf_counter(), passes.postgres_cpu()
                for i in range(INSERTS):
                    await conn.execute(
                        """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id,
                                                       credit_type_id, kind, amount, created_at)
                           SELECT $1 || g, 0, 1, 1, 1, 'debit', -0.01, now()
                           FROM generate_series(1, $2) AS g""", f"w{n}:{way}:{i}:", ROWS)
                wall, used = time.perf_counter() - wall, passes.postgres_cpu() - used
                totals[way][0] += wall * 1000 / INSERTS
                totals[way][1] += used * 1000 / INSERTS
                print(f"round {n + 1} insert {way:13}  {wall * 1000 / INSERTS:7.2f} ms wall  "
                      f"{used * 1000 / INSERTS:6.2f} ms Postgres CPU per {ROWS:,} entries")
        await conn.execute(_BRIN)
        return totals
    finally:
        await conn.close()


def report(opts: argparse.Namespace, totals: passes.Totals) -> None:
    passes.table(f"one account with {opts.entries:,} entries and {opts.entries // 10:,} overage "
                 f"entries over {opts.days} days; the balance as of one instant",
                 "Postgres CPU", [("whole history (before migration 033)", WAYS[0]),
                                  ("rollups", WAYS[1])], totals, opts.rounds)
    passes.table(f"an insert of {ROWS:,} ledger entries", "Postgres CPU",
                 [("with the BRIN index on xid", WRITES[0]),
                  ("without it (before migration 033)", WRITES[1])], totals, opts.rounds)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--points", type=int, default=20)


if __name__ == "__main__":
    passes.main(__doc__, options, measure, report)
