"""One re-rating pass after a pricing for another meter: the new pricing's meter only, against
every meter.

    .venv/bin/python bench/rerate.py [--measurements 200000] [--rounds 3]

A database of its own and a private redis-server, the app in-process with no background
workers. One account on a monthly plan that prices meter A, and `--measurements` measurements
of A in the current period, all rated. Then a pricing for meter B is added to the plan (its
re-rating request is what is timed) and, each round, one pass of that request:

* `every meter`: the request read as one from before migration 018 (`from_version` NULL):
  every measurement of the open period, each tested against the account's pricings;
* `new meters only`: the request as it is written now: the measurements of meter B (none).

Both find nothing to rate. Printed: ms per pass (wall, and the CPU of every postgres process)
and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as core  # bench/run.py: databases, the private redis-server
import unsent  # bench/unsent.py: Postgres CPU

from app.main import create_app
from app.rating.rerate import rerate_account
from app.settings import Settings

CATALOG = (
    ("/v1/credit-types", {"code": "usd", "name": "US dollar", "kind": "fiat",
                          "decimal_places": 2}),
    ("/v1/products", {"code": "api", "name": "API"}),
    ("/v1/accounts", {"code": "acct", "name": "acct", "credit_type": "usd"}),
    ("/v1/meters", {"code": "a", "name": "a", "data_fields": [
        {"code": "n", "category": "measure"}]}),
    ("/v1/meters", {"code": "b", "name": "b", "data_fields": [
        {"code": "n", "category": "measure"}]}),
    ("/v1/aggregations", {"code": "sum-a", "name": "sum-a", "meter": "a", "target_field": "n",
                          "function": "SUM"}),
    ("/v1/aggregations", {"code": "sum-b", "name": "sum-b", "meter": "b", "target_field": "n",
                          "function": "SUM"}),
    ("/v1/plan-templates", {"code": "t", "name": "t", "product": "api",
                            "bill_frequency": "monthly", "currency": "usd"}),
    ("/v1/plans", {"code": "p", "name": "p", "template": "t"}),
)


async def populate(app: object, url: str, admin_key: str, measurements: int) -> int:
    """The catalog and plan over the admin API, the measurements in bulk (rated by A's
    pricing, at its version); then the pricing for B. Returns its request's from_version."""
    start = datetime.now(UTC).date().replace(day=1).isoformat()
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://bench",
                                 headers={"Authorization": f"Bearer {admin_key}"}) as c:
        async def post(path: str, body: dict[str, object]) -> None:
            r = await c.post(path, json=body)
            if r.status_code != 201:
                raise RuntimeError(f"POST {path}: {r.status_code} {r.text}")

        for path, body in CATALOG:
            await post(path, body)
        await post("/v1/pricings", {"plan": "p", "aggregation": "sum-a", "start_date": start,
                                    "type": "per_unit", "bands": [{"up_to": None, "price": "0.01"}]})
        await post("/v1/accounts/acct/plans", {"plan": "p", "start_date": start})
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                """INSERT INTO measurements (account_id, uid, meter_id, ts, data, rated,
                                             config_version)
                   SELECT (SELECT id FROM accounts), 'm' || n, (SELECT id FROM meters
                          WHERE code = 'a'), now() - (n * interval '1 second') / 100,
                          '{"n": "1"}', true, (SELECT version FROM rating_config_version)
                   FROM generate_series(1, $1) AS n""", measurements)
            await conn.execute("DELETE FROM rerate_requests; ANALYZE measurements")
            await post("/v1/pricings", {"plan": "p", "aggregation": "sum-b",
                                        "start_date": start, "type": "per_unit",
                                        "bands": [{"up_to": None, "price": "0.01"}]})
            found = await conn.fetchval("SELECT from_version FROM rerate_requests")
        finally:
            await conn.close()
    if found is None:
        raise SystemExit("the pricing for B wrote no re-rating request with a version")
    return int(found)


async def measure(url: str, redis_url: str, admin_key: str, measurements: int,
                  rounds: int) -> dict[str, list[float]]:
    app = create_app(Settings(database_url=url, redis_url=redis_url, run_workers=False))
    totals = {"every meter": [0.0, 0.0], "new meters only": [0.0, 0.0]}
    async with app.router.lifespan_context(app):
        from_version = await populate(app, url, admin_key, measurements)
        ctx = app.state.ctx
        account_id = (await ctx.catalog.account("acct")).id
        for n in range(rounds):
            for name in totals:
                version = None if name == "every meter" else from_version
                wall, cpu = time.perf_counter(), unsent.postgres_cpu()
                rated, _ = await rerate_account(ctx, account_id, from_version=version)
                wall, cpu = time.perf_counter() - wall, unsent.postgres_cpu() - cpu
                if rated:
                    raise SystemExit(f"{name}: rated {rated}; there was nothing to rate")
                totals[name][0] += wall * 1000
                totals[name][1] += cpu * 1000
                print(f"round {n + 1} {name:15}  {wall * 1000:9.1f} ms wall  "
                      f"{cpu * 1000:7.1f} ms Postgres CPU")
    return totals


async def main_async(opts: argparse.Namespace, redis_url: str) -> None:
    name = f"creditgate_bench_{uuid.uuid4().hex[:8]}"
    url, keys = await core.prepare_database(opts.admin_database_url, name, 1)
    try:
        totals = await measure(url, redis_url, keys["admin"], opts.measurements, opts.rounds)
    finally:
        await core.drop_database(opts.admin_database_url, name)
    every, new = totals["every meter"], totals["new meters only"]
    r = opts.rounds
    print(f"\n{opts.measurements:,} rated measurements of meter A in the open period, a pricing "
          f"for meter B added; {r} rounds, per re-rating pass:")
    print("| re-rating pass | wall ms | Postgres CPU ms |\n|---|---:|---:|")
    print(f"| every meter (every request before) | {every[0] / r:.1f} | {every[1] / r:.1f} |")
    print(f"| the new pricings' meters only | {new[0] / r:.2f} | {new[1] / r:.2f} |")
    print(f"ratio every meter / new meters only: wall {every[0] / new[0]:.0f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measurements", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--admin-database-url", default=os.environ.get(
        "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    opts = p.parse_args()
    with core.redis_server("private") as redis_url:
        asyncio.run(main_async(opts, redis_url.split("?")[0]))


if __name__ == "__main__":
    main()
