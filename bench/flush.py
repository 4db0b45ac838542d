"""A journal flush of plain usage written two ways: one INSERT statement of both tables (the
rows as text Postgres splits) against COPY of each table in a transaction.

    .venv/bin/python bench/flush.py [--events 1000] [--flushes 20] [--rounds 3]

A database of its own (no app running). Each flush is `--events` usage events of 0.01 over 100
accounts, each one balance's debit: a usage row and a ledger entry per event, fresh uids, the
rows `app/ledger/journal.py: Rows` makes of the records, written by
`app/ledger/repository.py: write_rows` outside a transaction, as the journal writes plain
usage. Each round writes `--flushes`
flushes one way, then as many the other way (the tables grow for both). Printed per flush:
wall ms and the CPU of every postgres process; then per event, and the ratios. Run it at
several `--events` to see where COPY starts to pay (CREDITGATE_JOURNAL_COPY_ROWS).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # bench/passes.py: the database, the rounds, the table

from app.ledger import repository as repo
from app.ledger.journal import JournalRecord, Rows

WAYS = ("COPY", "statement")
ACCOUNTS = 100


def usage_rows(events: int, serial: itertools.count[int]) -> Rows:
    """The rows the journal makes of `events` plain usage records, each drawing 0.01 from its
    account's one balance (`Rows.add`, as a flush does)."""
    rows = Rows()
    now = time.time_ns() // 1_000_000
    for _ in range(events):
        n = next(serial)
        account = 1 + n % ACCOUNTS
        payload = {"a": account, "ct": 1, "dp": 2, "uid": f"e{n}", "prod": "api", "amt": "1",
                   "ts": now - n % 1000}
        rows.add(JournalRecord(account, f"{now}-{n}", "usage", payload, now, "g",
                               allocations=f"{account}:{account}:1"))
    return rows


async def measure(opts: argparse.Namespace, url: str, _redis_url: str,
                  _keys: dict[str, str]) -> passes.Totals:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET jit = off")  # as the app's pool (app/db.py)
        serial = itertools.count()

        async def flushes(way: str) -> int:
            copy_from = 1 if way == "COPY" else 0
            for _ in range(opts.flushes):
                rows = usage_rows(opts.events, serial)
                written = await repo.write_rows(conn, rows, copy_from)
                if len(written) != opts.events:
                    raise SystemExit(f"{way}: wrote {len(written)} of {opts.events} events")
            return 0

        print(f"{opts.flushes} flushes of {opts.events:,} usage events per way per round")
        return await passes.timed_rounds(opts.rounds, WAYS, flushes, passes.postgres_cpu,
                                         "postgres CPU")
    finally:
        await conn.close()


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=1000, help="usage events per flush")
    p.add_argument("--flushes", type=int, default=20, help="flushes per way per round")


def report(opts: argparse.Namespace, totals: passes.Totals) -> None:
    flushes = opts.rounds * opts.flushes
    print(f"\n{opts.events:,} events a flush; {opts.rounds} rounds of {opts.flushes} flushes"
          " per way:")
    print("| way | wall ms / flush | postgres CPU ms / flush | postgres CPU µs / event |")
    print("|---|---:|---:|---:|")
    for way in WAYS:
        wall, cpu = (t / flushes for t in totals[way])
        print(f"| {way} | {wall:.2f} | {cpu:.2f} | {cpu * 1000 / opts.events:.1f} |")
    (w1, c1), (w2, c2) = totals["COPY"], totals["statement"]
    print(f"ratio COPY / statement: wall {w1 / w2:.2f}x; postgres CPU "
          f"{c1 / c2:.2f}x" if c2 else "postgres CPU below the counters' tick")


if __name__ == "__main__":
    passes.main(__doc__ or "", options, measure, report)
