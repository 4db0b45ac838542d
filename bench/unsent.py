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
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as core  # bench/run.py: databases, the private redis-server

from app.main import create_app
from app.rating.drawdown import UnsentCursor, send_unsent
from app.settings import Settings


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


def postgres_cpu() -> float:
    """CPU seconds of every postgres process on the machine (the scan runs there)."""
    return sum(core.cpu_of(core.named("postgres")).values())


async def measure(url: str, redis_url: str, rounds: int) -> dict[str, list[float]]:
    app = create_app(Settings(database_url=url, redis_url=redis_url, run_workers=False))
    totals = {"from 7 days back": [0.0, 0.0], "stored cursor": [0.0, 0.0]}
    async with app.router.lifespan_context(app):
        ctx = app.state.ctx
        await send_unsent(ctx, older_than_s=0, cursor=UnsentCursor(shared=True))  # stores it
        for n in range(rounds):
            for name in totals:
                cursor = UnsentCursor(shared=name == "stored cursor")
                wall, cpu = time.perf_counter(), postgres_cpu()
                sent = await send_unsent(ctx, older_than_s=0, cursor=cursor)
                wall, cpu = time.perf_counter() - wall, postgres_cpu() - cpu
                if sent:
                    raise SystemExit(f"{name}: sent {sent}: every debit should be sent already")
                totals[name][0] += wall * 1000
                totals[name][1] += cpu * 1000
                print(f"round {n + 1} {name:16}  {wall * 1000:9.1f} ms wall  "
                      f"{cpu * 1000:7.1f} ms Postgres CPU")
    return totals


async def main_async(opts: argparse.Namespace, redis_url: str) -> None:
    name = f"creditgate_bench_{uuid.uuid4().hex[:8]}"
    url, _ = await core.prepare_database(opts.admin_database_url, name, 1)
    try:
        await populate(url, opts.debits)
        totals = await measure(url, redis_url, opts.rounds)
    finally:
        await core.drop_database(opts.admin_database_url, name)
    full, stored = totals["from 7 days back"], totals["stored cursor"]
    r = opts.rounds
    print(f"\n{opts.debits:,} rated debits in the last 24 h, all sent; {r} rounds, "
          "per first pass of a process:")
    print("| first unsent-debit pass | wall ms | Postgres CPU ms |\n|---|---:|---:|")
    print(f"| from 7 days back (every process start before) | {full[0] / r:.1f} "
          f"| {full[1] / r:.1f} |")
    print(f"| from the stored cursor | {stored[0] / r:.2f} | {stored[1] / r:.2f} |")
    cpu = (f"{full[1] / stored[1]:.0f}x" if stored[1] else
           "the stored cursor's pass used less than the 10 ms the CPU counters count in")
    print(f"ratio 7 days / stored: wall {full[0] / stored[0]:.0f}x; Postgres CPU: {cpu}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--debits", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--admin-database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    opts = p.parse_args()
    with core.redis_server("private") as redis_url:
        asyncio.run(main_async(opts, redis_url.split("?")[0]))


if __name__ == "__main__":
    main()
