"""A process's first scan for unsent rated debits: from 7 days back against the stored cursor.

    .venv/bin/python bench/unsent.py [--debits 1000000] [--rounds 3]

A database of its own and a private redis-server, the app in-process with no background
workers. `--debits` rated debits spread over the last 24 hours, every one of them sent (its
`usage_events` row exists), as a busy deployment has them. Then, each round, the first pass of
a process that has just started:

* `from 7 days back`: a cursor of its own (what every process start did before migration
  017): every rated debit of the last 7 days, anti-joined with usage_events;
* `stored cursor`: the workers' shared cursor, read from `worker_cursors` where the previous
  pass stored it.

Printed: ms per first pass (wall, and the CPU of every postgres process) and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # bench/passes.py: the database, the rounds, the table

from app.main import create_app
from app.rating.drawdown import UnsentCursor, send_unsent
from app.settings import Settings

WAYS = ("from 7 days back", "stored cursor")


async def populate(url: str, debits: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """INSERT INTO credit_types (code, name, kind, decimal_places)
               VALUES ('usd', 'US dollar', 'fiat', 2);
               INSERT INTO accounts (id, code, name, root_id, credit_type_id)
               SELECT n, 'acct-' || n, 'acct-' || n, n, (SELECT id FROM credit_types)
               FROM generate_series(1, 100) AS n;
               SELECT setval('accounts_id_seq', 100)""")
        await conn.execute(
            """INSERT INTO rated_debits (account_id, uid, product_code, credit_type, amount, ts,
                                         created_at)
               SELECT n % 100 + 1, 'r1:' || n, 'api', 'usd', 0.01, t, t
               FROM generate_series(1, $1) AS n,
                    LATERAL (SELECT now() - (n * interval '86400 seconds') / $1 AS t) x""",
            debits)
        await conn.execute(
            """INSERT INTO usage_events (account_id, uid, product_code, credit_type_id, amount,
                                         event_time, recorded_at)
               SELECT account_id, uid, product_code, (SELECT id FROM credit_types), amount,
                      ts, ts FROM rated_debits""")
        await conn.execute("ANALYZE rated_debits; ANALYZE usage_events")
    finally:
        await conn.close()


async def measure(opts: argparse.Namespace, url: str, redis_url: str,
                  _keys: dict[str, str]) -> passes.Totals:
    await populate(url, opts.debits)
    app = create_app(Settings(database_url=url, redis_url=redis_url, run_workers=False))
    async with app.router.lifespan_context(app):
        ctx = app.state.ctx
        await send_unsent(ctx, older_than_s=0, cursor=UnsentCursor(shared=True))  # stores it

        async def first_pass(way: str) -> int:
            cursor = UnsentCursor(shared=way == "stored cursor")
            return await send_unsent(ctx, older_than_s=0, cursor=cursor)

        return await passes.timed_rounds(opts.rounds, WAYS, first_pass, passes.postgres_cpu,
                                         "Postgres CPU")


def report(opts: argparse.Namespace, totals: passes.Totals) -> None:
    passes.table(f"{opts.debits:,} rated debits in the last 24 h, all sent; the first "
                 "unsent-debit pass of a process", "Postgres CPU",
                 [("from 7 days back (every process start before)", WAYS[0]),
                  ("from the stored cursor", WAYS[1])], totals, opts.rounds)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debits", type=int, default=1_000_000)


if __name__ == "__main__":
    passes.main(__doc__, options, measure, report)
