"""Rebuilding a root after Redis lost it (FLUSHALL, a restart) for an account with a long usage
history: the uid marks of the last two days restored with and without the index
`usage_events (account_id, recorded_at)` (migration 028).

    .venv/bin/python bench/marks.py [--history 1000000] [--recent 5000] [--rounds 3]

A database of its own and a private redis-server, the app in-process with no background
workers. One account with `--history` usage events recorded 10 to 30 days ago and `--recent`
in the last day (the mark window is two days). Each round, for each way: the index dropped
(`no index`, every rebuild before migration 028) or built (`index`), untimed; then FLUSHALL
and the root's rebuild, timed: the rebuild reads the account's balances and restores the
marks of the window from Postgres. At the end a recent uid sent again must be a duplicate.

Printed: ms per rebuild (wall, and the CPU of every postgres process) and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # bench/passes.py: the database, the table, the CPU clock

from app.entitlements import service
from app.main import create_app
from app.settings import Settings

WAYS = ("no index", "index")
INDEX = "CREATE INDEX usage_events_recorded_idx ON usage_events (account_id, recorded_at)"


async def populate(conn: asyncpg.Connection, history: int, recent: int) -> None:
    await passes.one_account(conn, effective=timedelta(days=60))
    await conn.execute(
        """INSERT INTO usage_events (account_id, uid, product_code, credit_type_id, amount,
                                     event_time, recorded_at)
           SELECT 1, 'old-' || n, 'api', 1, 0.01, t, t
           FROM (SELECT n, now() - interval '30 days' + n * (interval '20 days' / $1) AS t
                 FROM generate_series(1, $1) AS n) s""", history)
    await conn.execute(
        """INSERT INTO usage_events (account_id, uid, product_code, credit_type_id, amount,
                                     event_time, recorded_at)
           SELECT 1, 'recent-' || n, 'api', 1, 0.01, t, t
           FROM (SELECT n, now() - interval '1 day' + n * (interval '23 hours' / $1) AS t
                 FROM generate_series(1, $1) AS n) s""", recent)
    await conn.execute("ANALYZE usage_events")


async def measure(opts: argparse.Namespace, url: str, redis_url: str,
                  _keys: dict[str, str]) -> passes.Totals:
    conn = await asyncpg.connect(url)
    redis = aioredis.from_url(redis_url)
    try:
        await populate(conn, opts.history, opts.recent)
        print(f"{opts.history:,} usage events 10-30 days old, {opts.recent:,} of the last day")
        app = create_app(Settings(database_url=url, redis_url=redis_url, run_workers=False))
        async with app.router.lifespan_context(app):
            ctx = app.state.ctx
            totals: passes.Totals = {way: [0.0, 0.0] for way in WAYS}
            for n in range(opts.rounds):
                for way in WAYS:
                    await conn.execute("DROP INDEX IF EXISTS usage_events_recorded_idx")
                    if way == "index":
                        await conn.execute(INDEX)
                    await conn.execute("ANALYZE usage_events")
                    await redis.flushall()
                    wall, used = time.perf_counter(), passes.postgres_cpu()
                    await ctx.loader.ensure(1)
                    wall, used = time.perf_counter() - wall, passes.postgres_cpu() - used
                    totals[way][0] += wall * 1000
                    totals[way][1] += used * 1000
                    print(f"round {n + 1} {way:9}  {wall * 1000:9.1f} ms wall  "
                          f"{used * 1000:7.1f} ms Postgres CPU")
            [again] = await service.record_usage(ctx, [{
                "uid": "recent-7", "account": "big", "product": "api", "amount": "0.01",
                "timestamp": datetime.now(UTC).isoformat()}], "")
            if again.status != "duplicate":
                raise SystemExit(f"a recent uid sent again was {again.status}, not a duplicate")
        return totals
    finally:
        await redis.aclose()
        await conn.close()


def report(opts: argparse.Namespace, totals: passes.Totals) -> None:
    passes.table(f"one account with {opts.history:,} usage events older than the mark window "
                 f"and {opts.recent:,} within it; a rebuild of its root after FLUSHALL",
                 "Postgres CPU",
                 [("no index (every rebuild before migration 028)", WAYS[0]),
                  ("index (account_id, recorded_at)", WAYS[1])], totals, opts.rounds)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--history", type=int, default=1_000_000)
    p.add_argument("--recent", type=int, default=5_000)


if __name__ == "__main__":
    passes.main(__doc__, options, measure, report)
