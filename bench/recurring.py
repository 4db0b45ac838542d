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

Printed: ms per pass (wall, and this process's CPU) and the ratio (bench/passes.py).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # bench/passes.py: the database, the rounds, the table

from app.main import create_app
from app.rating import recurring
from app.settings import Settings

WAYS = ("every plan", "gated")


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
            await passes.post_all(c, [
                    ("/v1/credit-types", {"code": "usd", "name": "US dollar", "kind": "fiat",
                                          "decimal_places": 2}),
                    ("/v1/products", {"code": "api", "name": "API"}),
                    ("/v1/plan-templates", {"code": "t", "name": "t", "product": "api",
                                            "bill_frequency": "monthly", "currency": "usd",
                                            "standing_charge": "10.00"}),
                    ("/v1/plans", {"code": "p", "name": "p", "template": "t"})])
        await passes.accounts_on_the_plan(url, accounts, date.fromisoformat(start))
        drawn = await recurring.sweep(app.state.ctx)
        if drawn != accounts:
            raise SystemExit(f"the settling pass drew {drawn} standing charges, not {accounts}")


async def measure(opts: argparse.Namespace, url: str, redis_url: str,
                  keys: dict[str, str]) -> passes.Totals:
    await populate(url, redis_url, keys["admin"], opts.accounts)
    app = create_app(Settings(database_url=url, redis_url=redis_url, run_workers=False))
    async with app.router.lifespan_context(app):
        ctx = app.state.ctx
        memory = recurring.SweepMemory()
        await recurring.sweep_when_due(ctx, memory)  # the day's first pass (settles nothing)

        async def one_pass(way: str) -> int:
            if way == WAYS[0]:
                return await recurring.sweep(ctx)
            return await recurring.sweep_when_due(ctx, memory)

        return await passes.timed_rounds(opts.rounds, WAYS, one_pass, passes.app_cpu,
                                         "app CPU")


def report(opts: argparse.Namespace, totals: passes.Totals) -> None:
    passes.table(f"{opts.accounts:,} account plans with a standing charge, settled; a "
                 "recurring sweep pass", "app CPU",
                 [("every account plan (every pass before)", WAYS[0]),
                  ("gated (day and configuration unchanged)", WAYS[1])], totals, opts.rounds)


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accounts", type=int, default=10_000)


if __name__ == "__main__":
    passes.main(__doc__, options, measure, report, rounds=5)
