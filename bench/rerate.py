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
import sys
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # bench/passes.py: the database, the rounds, the table

from app.main import create_app
from app.rating.rerate import rerate_account
from app.settings import Settings

WAYS = ("every meter", "new meters only")

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


async def measure(opts: argparse.Namespace, url: str, redis_url: str,
                  keys: dict[str, str]) -> passes.Totals:
    app = create_app(Settings(database_url=url, redis_url=redis_url, run_workers=False))
    async with app.router.lifespan_context(app):
        from_version = await populate(app, url, keys["admin"], opts.measurements)
        ctx = app.state.ctx
        account = await ctx.catalog.account("acct")
        assert account is not None

        async def one_pass(way: str) -> int:
            version = None if way == WAYS[0] else from_version
            rated, _ = await rerate_account(ctx, account.id, from_version=version)
            return rated

        return await passes.timed_rounds(opts.rounds, WAYS, one_pass, passes.postgres_cpu,
                                         "Postgres CPU")


def report(opts: argparse.Namespace, totals: passes.Totals) -> None:
    passes.table(f"{opts.measurements:,} rated measurements of meter A in the open period, a "
                 "pricing for meter B added; a re-rating pass", "Postgres CPU",
                 [("every meter (every request before)", WAYS[0]),
                  ("the new pricings' meters only", WAYS[1])], totals, opts.rounds)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--measurements", type=int, default=200_000)


if __name__ == "__main__":
    passes.main(__doc__, options, measure, report)
