"""Profile one scenario with the app in-process (no HTTP server): wall time by function.

    .venv/bin/python bench/inprocess.py batch [--requests 20] [--concurrency 1] [--html out.html]
    .venv/bin/python bench/inprocess.py check --requests 2000 --concurrency 64
    .venv/bin/python bench/inprocess.py usage --requests 2000 --concurrency 64 --timers

Complements run.py's py-spy option (CPU samples of the real server): pyinstrument in async
mode charges the time a request spends awaiting Redis or Postgres to the line that awaits,
so it shows where the *latency* goes. --timers instead wraps the main steps of the usage path
and prints their mean wall time per call. Uses a private database and redis-server like run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as bench

from app.main import create_app
from app.settings import Settings


def body(kind: str, prefix: str, accounts: int, n: int, batch: int) -> dict[str, Any]:
    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    if kind == "check":
        return {"account": f"{prefix}-{n % accounts}", "product": "api", "amount": "0.01"}
    event = {"product": "api", "amount": "0.01", "timestamp": ts}
    if kind == "usage":
        return {"uid": f"u-{n}", "account": f"{prefix}-{n % accounts}", **event}
    return {"events": [{"uid": f"b-{n}-{j}", "account": f"{prefix}-{(n + j) % accounts}", **event}
                       for j in range(batch)]}


TIMED = [
    ("app.http", "parse_call"), ("app.entitlements.service", "prepare"),
    ("app.ledger.ops", "decide"), ("app.entitlements.service", "_debit_root"),
    ("app.ledger.journal", "Journal.commit"), ("app.ledger.journal", "Journal.flush"),
    ("app.ledger.repository", "write_rows"), ("app.ledger.journal", "Journal._after_commit"),
    ("app.hotstate.store", "HotState.decide"), ("app.hotstate.store", "HotState.ack"),
]


def install_timers() -> dict[str, list[float]]:
    import importlib

    spent: dict[str, list[float]] = defaultdict(list)
    for module_name, qual in TIMED:
        module = importlib.import_module(module_name)
        owner: Any = module
        *parents, name = qual.split(".")
        for p in parents:
            owner = getattr(owner, p)
        original = getattr(owner, name)

        def wrap(fn: Any, label: str) -> Any:
            @functools.wraps(fn)
            async def timed(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await fn(*a, **kw)
                finally:
                    spent[label].append(time.perf_counter() - t)
            return timed

        setattr(owner, name, wrap(original, qual))
        # modules that imported the function by name keep their own reference
        for other in list(sys.modules.values()):
            if other and getattr(other, "__name__", "").startswith("app.") and \
                    getattr(other, name, None) is original and other is not module:
                setattr(other, name, getattr(owner, name))
    return spent


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["check", "usage", "batch"])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--accounts", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--html", default=None)
    p.add_argument("--timers", action="store_true", help="step timers instead of pyinstrument")
    p.add_argument("--admin-database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    opts = p.parse_args()

    name = f"creditgate_bench_{uuid.uuid4().hex[:8]}"
    db_url, keys = await bench.prepare_database(opts.admin_database_url, name, opts.accounts)
    try:
        with bench.redis_server("private") as redis_url:
            await profile(opts, db_url, redis_url, keys)
    finally:
        await bench.drop_database(opts.admin_database_url, name)


async def create_accounts(c: httpx.AsyncClient, admin_key: str, prefix: str,
                          accounts: int) -> None:
    """USD, product `api`, and accounts `<prefix>-<n>` with a large grant each, through `c`."""
    admin = {"Authorization": f"Bearer {admin_key}"}
    await c.post("/v1/credit-types", headers=admin, json={
        "code": "usd", "name": "usd", "kind": "fiat", "decimal_places": 2})
    await c.post("/v1/products", headers=admin, json={"code": "api", "name": "api"})
    for a in range(accounts):
        await c.post("/v1/accounts", headers=admin, json={
            "code": f"{prefix}-{a}", "name": "x", "credit_type": "usd"})
        await c.post(f"/v1/accounts/{prefix}-{a}/grants", headers=admin,
                     json={"amount": "1000000000"})


async def profile(opts: argparse.Namespace, db_url: str, redis_url: str,
                  keys: dict[str, str]) -> None:
    app = create_app(Settings(database_url=db_url, redis_url=redis_url))
    prefix = "ip"
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cg") as c:
            await create_accounts(c, keys["admin"], prefix, opts.accounts)
            runtime = {"Authorization": f"Bearer {keys['runtime']}"}
            path = "/v1/check" if opts.scenario == "check" else "/v1/usage"
            counter = iter(range(10**9))

            async def worker(n_requests: int) -> None:
                for _ in range(n_requests):
                    r = await c.post(path, headers=runtime, json=body(
                        opts.scenario, prefix, opts.accounts, next(counter), opts.batch_size))
                    assert r.status_code == 200, r.text[:300]

            await asyncio.gather(*(worker(2) for _ in range(opts.concurrency)))  # warm up
            per = max(1, opts.requests // opts.concurrency)
            spent = install_timers() if opts.timers else None
            profiler = None
            if not opts.timers:
                from pyinstrument import Profiler

                profiler = Profiler(async_mode="enabled" if opts.concurrency == 1 else "disabled",
                                    interval=0.0005)
                profiler.start()
            t = time.perf_counter()
            await asyncio.gather(*(worker(per) for _ in range(opts.concurrency)))
            wall = time.perf_counter() - t
            if profiler:
                profiler.stop()
                print(profiler.output_text(unicode=True, color=False, show_all=False))
                if opts.html:
                    Path(opts.html).write_text(profiler.output_html())  # noqa: ASYNC240
            done = per * opts.concurrency
            print(f"{done} requests in {wall:.2f} s: {done / wall:,.0f} req/s "
                  f"({wall / per * 1000:.1f} ms per request per worker)")
            if spent:
                print(f"\n{'calls':>7} {'mean ms':>9} {'total s':>8}  step")
                for label, times in spent.items():
                    print(f"{len(times):7d} {1000 * sum(times) / len(times):9.3f} "
                          f"{sum(times):8.2f}  {label}")


if __name__ == "__main__":
    asyncio.run(main())
