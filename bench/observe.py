"""What counting requests for GET /metrics costs (app/observe.py): the same requests through
two apps in one process, one counting (the default) and one with CREDITGATE_REQUEST_METRICS=0,
in interleaved rounds; CPU of this process per request, each way.

    .venv/bin/python bench/observe.py [--requests 20000] [--rounds 5]

The requests go straight to each app's ASGI callable (no HTTP server, no client library), so
the figure is the app's own CPU per request and the counting's share of it is not diluted by
a server's. Scenarios: a plain check answered from the check cache (the cheapest request
there is, so the largest share) and a single usage event (waits for Redis and Postgres).
Uses a private database and redis-server like run.py; the background workers are off in both
apps so that only the requests spend CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as bench
from inprocess import create_accounts

from app.main import create_app
from app.settings import Settings

ACCOUNTS = 100


def asgi_post(app: Any, path: str, key: str) -> Callable[[bytes], Any]:
    """A POST of `body` straight to the app's ASGI callable; returns the status."""
    headers = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")]

    async def post(body: bytes) -> int:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("cg", 80),
                 "scheme": "http", "root_path": ""}
        status = 0

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope, receive, send)
        return status
    return post


def bodies(kind: str, n: int, tag: str) -> list[bytes]:
    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    if kind == "check":
        return [json.dumps({"account": f"ob-{i % ACCOUNTS}", "product": "api",
                            "amount": "0.01"}).encode() for i in range(n)]
    return [json.dumps({"uid": f"{tag}-{i}", "account": f"ob-{i % ACCOUNTS}", "product": "api",
                        "amount": "0.01", "timestamp": ts}).encode() for i in range(n)]


async def timed(post: Callable[[bytes], Any], payloads: list[bytes], concurrency: int) -> float:
    """CPU seconds of this process for the requests, `concurrency` at a time."""
    it = iter(payloads)

    async def worker() -> None:
        for body in it:
            status = await post(body)
            assert status == 200, status

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - started


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=20_000, help="checks per round and way")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--admin-database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    opts = p.parse_args()
    name = f"creditgate_bench_{uuid.uuid4().hex[:8]}"
    db_url, keys = await bench.prepare_database(opts.admin_database_url, name, ACCOUNTS)
    try:
        with bench.redis_server("private") as redis_url:
            await compare(opts, db_url, redis_url, keys)
    finally:
        await bench.drop_database(opts.admin_database_url, name)


async def setup(app: Any, admin_key: str) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cg") as c:
        await create_accounts(c, admin_key, "ob", ACCOUNTS)


async def compare(opts: argparse.Namespace, db_url: str, redis_url: str,
                  keys: dict[str, str]) -> None:
    apps = {way: create_app(Settings(database_url=db_url, redis_url=redis_url, run_workers=False,
                                     request_metrics=way == "counted"))
            for way in ("counted", "uncounted")}
    async with apps["counted"].router.lifespan_context(apps["counted"]), \
            apps["uncounted"].router.lifespan_context(apps["uncounted"]):
        await setup(apps["counted"], keys["admin"])
        # (requests per round, per slice, concurrency): the ways take turns slice by slice,
        # each going first in every other slice, so that the machine's drift falls on both
        scenarios = {"check": (opts.requests, 1000, 1), "usage": (opts.requests // 10, 320, 64)}
        spent = {(s, w): 0.0 for s in scenarios for w in apps}
        done = {s: 0 for s in scenarios}
        for kind, (requests, n, concurrency) in scenarios.items():
            posts = {way: asgi_post(app, f"/v1/{kind}", keys["runtime"])
                     for way, app in apps.items()}
            for way, post in posts.items():  # warm both alike: caches, connections
                await timed(post, bodies(kind, 1000, f"warm-{way}"), concurrency)
            slices = max(2, requests // n // 2 * 2)
            for i in range(slices * opts.rounds):
                ways = list(posts) if i % 2 == 0 else list(posts)[::-1]
                for way in ways:
                    spent[kind, way] += await timed(posts[way], bodies(kind, n, f"{way}-{i}"),
                                                    concurrency)
                done[kind] += n
        print(f"{opts.rounds} rounds, interleaved by slices; CPU of this process per request\n")
        print("| request | counted µs | uncounted µs | counting costs | "
              "requests per CPU-second, counted / uncounted |")
        print("|---|---:|---:|---:|---:|")
        for kind in scenarios:
            on, off = (spent[kind, way] / done[kind] * 1e6 for way in ("counted", "uncounted"))
            print(f"| {kind} | {on:.1f} | {off:.1f} | {on - off:+.1f} µs ({(on - off) / off:+.1%}) "
                  f"| {on and off / on:.3f} |")


if __name__ == "__main__":
    asyncio.run(main())
