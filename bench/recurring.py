"""The recurring-charge sweep's cost per worker pass: every account plan against the gated pass.

    .venv/bin/python bench/recurring.py [--accounts 10000] [--rounds 5]

The app in-process (no HTTP server, no background workers) on a database of its own and a
private redis-server: `--accounts` accounts, each on a monthly plan with a standing charge,
their current period settled (as it is after the first pass of the day). Then, each round:

* `every plan`: `recurring.sweep`, what every worker pass did before (every 2 s, in every
  process): all account plans in effect, their expected charges, which of them are settled;
* `gated`: `recurring.sweep_when_due` with the memory of a pass the same day: the
  configuration version, and nothing else when it has not moved (what every pass does now
  between a new day or a plan change and the next).

Printed: ms per pass (wall, and this process's CPU) and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as core  # bench/run.py: databases, the private redis-server

from app.main import create_app
from app.rating import recurring
from app.settings import Settings


async def populate(url: str, base: str, admin_key: str, accounts: int) -> None:
    """The catalog over the admin API, the accounts and their plans in bulk, then one pass
    that settles every current period."""
    start = datetime.now(UTC).date().replace(day=1).isoformat()
    headers = {"Authorization": f"Bearer {admin_key}"}
    app = create_app(Settings(database_url=url, redis_url=base, run_workers=False))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench",
                                     headers=headers) as c:
            for path, body in (
                    ("/v1/credit-types", {"code": "usd", "name": "US dollar", "kind": "fiat",
                                          "decimal_places": 2}),
                    ("/v1/products", {"code": "api", "name": "API"}),
                    ("/v1/plan-templates", {"code": "t", "name": "t", "product": "api",
                                            "bill_frequency": "monthly", "currency": "usd",
                                            "standing_charge": "10.00"}),
                    ("/v1/plans", {"code": "p", "name": "p", "template": "t"})):
                r = await c.post(path, json=body)
                if r.status_code != 201:
                    raise RuntimeError(f"POST {path}: {r.status_code} {r.text}")
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                """INSERT INTO accounts (id, code, name, root_id, credit_type_id)
                   SELECT n, 'acct-' || n, 'acct-' || n, n, (SELECT id FROM credit_types)
                   FROM generate_series(1, $1) AS n""", accounts)
            await conn.execute("SELECT setval('accounts_id_seq', $1)", accounts)
            await conn.execute(
                """INSERT INTO account_plans (account_id, plan_id, start_date)
                   SELECT n, (SELECT id FROM plans), $2::date FROM generate_series(1, $1) AS n""",
                accounts, date.fromisoformat(start))
        finally:
            await conn.close()
        drawn = await recurring.sweep(app.state.ctx)
        if drawn != accounts:
            raise SystemExit(f"the settling pass drew {drawn} standing charges, not {accounts}")


async def measure(url: str, redis_url: str, rounds: int) -> dict[str, list[float]]:
    app = create_app(Settings(database_url=url, redis_url=redis_url, run_workers=False))
    totals = {"every plan": [0.0, 0.0], "gated": [0.0, 0.0]}
    async with app.router.lifespan_context(app):
        ctx = app.state.ctx
        memory = recurring.SweepMemory()
        await recurring.sweep_when_due(ctx, memory)  # the day's first pass (settles nothing)
        for n in range(rounds):
            for name in totals:
                wall, cpu = time.perf_counter(), time.process_time()
                if name == "every plan":
                    drawn = await recurring.sweep(ctx)
                else:
                    drawn = await recurring.sweep_when_due(ctx, memory)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if drawn:
                    raise SystemExit(f"{name}: drew {drawn}: the periods were not settled")
                totals[name][0] += wall * 1000
                totals[name][1] += cpu * 1000
                print(f"round {n + 1} {name:10}  {wall * 1000:8.1f} ms wall  "
                      f"{cpu * 1000:8.1f} ms CPU")
    return totals


async def main_async(opts: argparse.Namespace, redis_url: str) -> None:
    name = f"creditgate_bench_{uuid.uuid4().hex[:8]}"
    url, keys = await core.prepare_database(opts.admin_database_url, name, 1)
    try:
        await populate(url, redis_url, keys["admin"], opts.accounts)
        totals = await measure(url, redis_url, opts.rounds)
    finally:
        await core.drop_database(opts.admin_database_url, name)
    every, gated = totals["every plan"], totals["gated"]
    r = opts.rounds
    print(f"\n{opts.accounts:,} account plans with a standing charge, settled; {r} rounds, "
          "per worker pass:")
    print("| recurring sweep pass | wall ms | app CPU ms |\n|---|---:|---:|")
    print(f"| every account plan (every pass before) | {every[0] / r:.1f} | {every[1] / r:.1f} |")
    print(f"| gated (day and configuration unchanged) | {gated[0] / r:.2f} | {gated[1] / r:.2f} |")
    print(f"ratio every plan / gated: wall {every[0] / gated[0]:.0f}x, "
          f"CPU {every[1] / max(gated[1], 0.001):.0f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--admin-database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    opts = p.parse_args()
    with core.redis_server("private") as redis_url:
        asyncio.run(main_async(opts, redis_url.split("?")[0]))


if __name__ == "__main__":
    main()
