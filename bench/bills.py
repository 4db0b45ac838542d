"""The bill run's cost per bill, against reading bill-to-date for the same account and period.

    .venv/bin/python bench/bills.py [--accounts 1000] [--rounds 3]

The app in-process (no HTTP server, no background workers) on a database of its own and a
private redis-server: `--accounts` accounts, each on a daily plan (a pricing of a SUM, a
minimum spend of 1.00, so each bill draws a top-up through the usage path) attached
`--rounds` + 1 days ago. Each round takes the next closed day:

* `bill-to-date`: `billing.bill_to_date` of every account for that day, one after another
  (what `GET /v1/accounts/{code}/usage?at=` computes: the baseline, a read of the same lines);
* `bill run`: `bills.run` through the end of that day: one bill per account, each in its own
  transaction (lock, hold rating, settle, lines, top-up, write, event), then its top-up debit
  through the usage path (committed before the run returns).

Printed: ms per account each way (wall, and this process's CPU), bills per second, and the
ratio bill run / bill-to-date.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # bench/passes.py: the database, the private redis-server

from app.main import create_app
from app.rating import billing, bills
from app.settings import Settings

WAYS = ("bill-to-date", "bill run")


async def populate(app: object, url: str, admin_key: str, accounts: int, rounds: int) -> None:
    start = datetime.now(UTC).date() - timedelta(days=rounds + 1)
    headers = {"Authorization": f"Bearer {admin_key}"}
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://bench",
                                 headers=headers) as c:
        await passes.post_all(c, [
                ("/v1/credit-types", {"code": "usd", "name": "US dollar", "kind": "fiat",
                                      "decimal_places": 2}),
                ("/v1/products", {"code": "api", "name": "API"}),
                ("/v1/meters", {"code": "calls", "name": "Calls", "product": "api",
                                "data_fields": [{"code": "calls", "category": "measure"}]}),
                ("/v1/aggregations", {"code": "calls", "name": "Calls", "meter": "calls",
                                      "target_field": "calls", "function": "SUM"}),
                ("/v1/plan-templates", {"code": "t", "name": "t", "product": "api",
                                        "bill_frequency": "daily", "currency": "usd",
                                        "minimum_spend": "1.00"}),
                ("/v1/plans", {"code": "p", "name": "p", "template": "t"}),
                ("/v1/pricings", {"plan": "p", "aggregation": "calls", "type": "per_unit",
                                  "bands": [{"up_to": None, "price": "0.01"}],
                                  "start_date": start.isoformat()})])
    await passes.accounts_on_the_plan(url, accounts, start)


async def measure(opts: argparse.Namespace, url: str, redis_url: str,
                  keys: dict[str, str]) -> passes.Totals:
    app = create_app(Settings(database_url=url, redis_url=redis_url, run_workers=False))
    async with app.router.lifespan_context(app):
        await populate(app, url, keys["admin"], opts.accounts, opts.rounds)
        ctx = app.state.ctx
        codes = [f"acct-{n}" for n in range(1, opts.accounts + 1)]
        first = datetime.now(UTC).date() - timedelta(days=opts.rounds + 1)
        totals: passes.Totals = {way: [0.0, 0.0] for way in WAYS}
        for n in range(opts.rounds):
            day = first + timedelta(days=n)
            for way in WAYS:
                wall, used = time.perf_counter(), passes.app_cpu()
                if way == WAYS[0]:
                    for code in codes:
                        await billing.bill_to_date(ctx, code, day)
                else:
                    outcome = await bills.run(ctx, day + timedelta(days=1),
                                              limit=opts.accounts)
                    if len(outcome.bills) != opts.accounts or outcome.failed:
                        raise SystemExit(f"the run wrote {len(outcome.bills)} bills, not "
                                         f"{opts.accounts}: {outcome.failed}")
                wall, used = time.perf_counter() - wall, passes.app_cpu() - used
                totals[way][0] += wall * 1000
                totals[way][1] += used * 1000
                print(f"round {n + 1} {way:14}  {wall * 1000:9.1f} ms wall  "
                      f"{used * 1000:7.1f} ms app CPU")
        return totals


def report(opts: argparse.Namespace, totals: passes.Totals) -> None:
    per = opts.accounts * opts.rounds
    print(f"\n{opts.accounts:,} accounts on a daily plan, {opts.rounds} rounds, per account:")
    print("| way | wall ms | app CPU ms | per second |\n|---|---:|---:|---:|")
    for way in WAYS:
        wall, used = (t / per for t in totals[way])
        print(f"| {way} | {wall:.2f} | {used:.2f} | {1000 / wall:,.0f} |")
    (w1, c1), (w2, c2) = totals[WAYS[1]], totals[WAYS[0]]
    print(f"ratio bill run / bill-to-date: wall {w1 / w2:.2f}x, app CPU {c1 / c2:.2f}x")


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accounts", type=int, default=1_000)


if __name__ == "__main__":
    passes.main(__doc__, options, measure, report, rounds=3)
