"""What comparing a root's hot copy with Postgres costs (`creditgate hotstate verify`, the
workers' sampled check: `Loader.verify`) against rebuilding that root (`Loader.ensure` after an
invalidation), which reads the same from Postgres.

    .venv/bin/python bench/verify.py [--balances 1000] [--debits 10] [--rounds 3]

A database of its own and a private redis-server, the app in-process with no background
workers. One account with `--balances` balances, each granted 100.00 and drawn `--debits`
times. Each round rebuilds the root, then verifies it (which must find no difference).

Printed: ms per pass (wall, and the CPU of every postgres process) and the ratio.
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
from app.settings import Settings

WAYS = ("verify", "rebuild")


async def populate(conn: asyncpg.Connection, balances: int, debits: int) -> None:
    """Balances 2.. of account 1 (balance 1 is passes.one_account's), with their entries."""
    await conn.execute(
        """INSERT INTO balances (id, account_id, credit_type_id, priority, effective_at,
                                 description, source, status)
           SELECT n, 1, 1, n % 10, now() - interval '1 day', 'bench', 'grant', 'active'
           FROM generate_series(2, $1 + 1) AS n""", balances)
    await conn.execute(
        """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id, kind,
                                       amount, created_at)
           SELECT 'g:' || n, 0, 1, n, 1, 'grant', 100, now() - interval '1 day'
           FROM generate_series(2, $1 + 1) AS n""", balances)
    await conn.execute(
        """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id, kind,
                                       amount, usage_uid, product_code, created_at)
           SELECT 'u:1:' || n || '-' || d, 0, 1, n, 1, 'debit', -0.01, n || '-' || d, 'api', now()
           FROM generate_series(2, $1 + 1) AS n, generate_series(1, $2) AS d""",
        balances, debits)
    await conn.execute("ANALYZE")


async def measure(opts: argparse.Namespace, url: str, redis_url: str,
                  _keys: dict[str, str]) -> passes.Totals:
    conn = await asyncpg.connect(url)
    try:
        await passes.one_account(conn)
        await populate(conn, opts.balances, opts.debits)
        print(f"one account, {opts.balances + 1:,} balances, "
              f"{opts.balances * (opts.debits + 1):,} entries")
        app = create_app(Settings(database_url=url, redis_url=redis_url, run_workers=False))
        async with app.router.lifespan_context(app):
            ctx = app.state.ctx

            async def one(way: str) -> int:
                if way == "rebuild":
                    await ctx.hot.invalidate(1)
                    await ctx.loader.ensure(1)
                    return 0
                found = await ctx.loader.verify(1)
                if found is None:
                    raise SystemExit("the root is not loaded: nothing was compared")
                return len(found)  # (a difference would stop the bench)

            await ctx.loader.ensure(1)
            return await passes.timed_rounds(opts.rounds, WAYS, one, passes.postgres_cpu,
                                             "Postgres CPU")
    finally:
        await conn.close()


def report(opts: argparse.Namespace, totals: passes.Totals) -> None:
    passes.table(f"one account with {opts.balances + 1:,} balances", "Postgres CPU",
                 [("verify (compare, change nothing)", WAYS[0]),
                  ("rebuild (invalidate, load again)", WAYS[1])], totals, opts.rounds)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--balances", type=int, default=1_000)
    p.add_argument("--debits", type=int, default=10)


if __name__ == "__main__":
    passes.main(__doc__, options, measure, report)
