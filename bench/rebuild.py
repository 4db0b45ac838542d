"""Rebuilding a billing root's hot state (after FLUSHALL, a restart, an invalidation) for an
account with a long history: the whole ledger summed against a snapshot plus its tail.

    .venv/bin/python bench/rebuild.py [--entries 1000000] [--tail 5000] [--rounds 3]

A database of its own and a private redis-server, the app in-process with no background
workers. One account, one balance with `--entries` debits and a tenth as many overage
entries, then a snapshot of both (app/ledger/snapshots.py), then `--tail` more of each. Each
round rebuilds the root twice:

* `whole history`: with the snapshot rows removed first (untimed), so the rebuild sums every
  entry, as every rebuild did before migration 025;
* `snapshot + tail`: with the snapshot rows put back (untimed): the snapshot plus the tail.

Printed: ms per rebuild (wall, and the CPU of every postgres process) and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # bench/passes.py: the database, the rounds, the table

from app.ledger.snapshots import snapshot_balance, snapshot_overage
from app.main import create_app
from app.settings import Settings

WAYS = ("whole history", "snapshot + tail")


async def populate(conn: asyncpg.Connection, entries: int, start: int = 0) -> None:
    await conn.execute(
        """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id, kind,
                                       amount, usage_uid, product_code, created_at)
           SELECT 'u:1:e' || n, 0, 1, 1, 1, 'debit', -0.01, 'e' || n, 'api', now()
           FROM generate_series($1 + 1, $1 + $2) AS n""", start, entries)
    await conn.execute(
        """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id, kind,
                                       amount, usage_uid, product_code, created_at)
           SELECT 'u:1:o' || n, 1, 1, NULL, 1, 'overage', -0.01, 'o' || n, 'api', now()
           FROM generate_series($1 + 1, $1 + $2 / 10) AS n""", start, entries)
    await conn.execute("ANALYZE ledger_entries")


async def measure(opts: argparse.Namespace, url: str, redis_url: str,
                  _keys: dict[str, str]) -> passes.Totals:
    conn = await asyncpg.connect(url)
    try:
        await passes.one_account(conn)
        await populate(conn, opts.entries)
        assert await snapshot_balance(conn, 1) and await snapshot_overage(conn, 1, 1)
        saved = (await conn.fetchrow("SELECT * FROM balance_snapshots WHERE balance_id = 1"),
                 await conn.fetchrow("SELECT * FROM overage_snapshots WHERE account_id = 1"))
        await populate(conn, opts.tail, start=opts.entries)
        print(f"{opts.entries:,} + {opts.entries // 10:,} entries, then a snapshot, then "
              f"{opts.tail:,} + {opts.tail // 10:,} more")
        app = create_app(Settings(database_url=url, redis_url=redis_url, run_workers=False))
        async with app.router.lifespan_context(app):
            ctx = app.state.ctx

            async def rebuild(way: str) -> int:
                await conn.execute("DELETE FROM balance_snapshots; DELETE FROM overage_snapshots")
                if way == "snapshot + tail":
                    for table, row in zip(("balance_snapshots", "overage_snapshots"), saved,
                                          strict=True):
                        columns = list(row.keys())
                        await conn.execute(
                            f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                            f"({', '.join(f'${i + 1}' for i in range(len(columns)))})",
                            *row.values())
                await ctx.hot.invalidate(1)
                await ctx.loader.ensure(1)
                return 0

            totals = await passes.timed_rounds(opts.rounds, WAYS, rebuild, passes.postgres_cpu,
                                               "Postgres CPU")
            live = await ctx.hot.read_account(1, 1)
            if live is None:
                raise SystemExit("the root is not loaded after its rebuild")
        return totals
    finally:
        await conn.close()


def report(opts: argparse.Namespace, totals: passes.Totals) -> None:
    passes.table(f"one balance with {opts.entries:,} entries and {opts.entries // 10:,} overage "
                 f"entries, {opts.tail:,} + {opts.tail // 10:,} after the snapshot; a rebuild "
                 "of the root's hot state", "Postgres CPU",
                 [("whole history (every rebuild before migration 025)", WAYS[0]),
                  ("snapshot + tail", WAYS[1])], totals, opts.rounds)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--tail", type=int, default=5_000)


if __name__ == "__main__":
    passes.main(__doc__, options, measure, report)
