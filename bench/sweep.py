"""The orphan sweep's cost per pass: the journal index against the keyspace scan, same run.

    .venv/bin/python bench/sweep.py [--idle 100000] [--active 100] [--rounds 3]

A private redis-server holds `--idle` billing roots that journalled long ago (their hot state:
eight keys each, as a loaded root with one account has) and `--active` roots that journalled
since the last pass (an empty journal stream each, and an index entry old enough to be swept).
Each round times one sweep pass both ways on the same keyspace, rebuilt before each:

* `scan`: what every pass did before the index, and a process's first pass still does
  (`Journal._sweep_keyspace`: SCAN with a stream filter, then each journal found);
* `index`: every later pass (`Journal.sweep`: the index shards, then each root found there).

Printed: wall ms and Redis CPU ms per pass (INFO's used_cpu_user + used_cpu_sys), and the
ratio scan / index. Postgres is not involved: the journals are empty, as they are after their
flushes (an orphan costs the same flush either way).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as core  # bench/run.py: the private redis-server

from app.hotstate.keys import Keys
from app.hotstate.resp import FastRedis
from app.hotstate.store import HotState
from app.ledger.journal import Journal

PREFIX = "cgsweep"


async def populate(r: aioredis.Redis, keys: Keys, idle: int, active: int) -> None:
    """A fresh keyspace: idle roots' hot state, active roots' empty journals and index entries."""
    await r.flushdb()
    for start in range(0, idle + active, 1000):
        async with r.pipeline(transaction=False) as pipe:
            for root in range(start, min(start + 1000, idle + active)):
                tag = keys.tag(root)
                pipe.hset(keys.root(root), "gen", "g")
                pipe.set(keys.ops(root), 1)
                pipe.hset(f"{tag}:a:{root}", mapping={"st": "active", "par": ""})
                pipe.hset(f"{tag}:b:{root}", "1", 100)
                pipe.hset(f"{tag}:d:{root}", "1", "1|0|0|0|a|*")
                pipe.hset(f"{tag}:e:{root}", "api|1", "1")
                pipe.hset(f"{tag}:u:{root}:20000", "uid", "1")
                pipe.set(f"{tag}:jl", "1-1")
                if root >= idle:  # written to since the last pass: an acknowledged journal
                    pipe.xadd(keys.journal(root), {"k": "usage"}, id="2-1")
                    pipe.xdel(keys.journal(root), "2-1")
                    pipe.zadd(keys.journal_index_of(root), {str(root): 0})
            await pipe.execute()


async def redis_cpu_ms(r: aioredis.Redis) -> float:  # float-ok: a CPU time, not money
    info: dict[str, Any] = await r.info("cpu")
    return (float(info["used_cpu_user"]) + float(info["used_cpu_sys"])) * 1000


async def one_pass(r: aioredis.Redis, journal: Journal, how: str) -> tuple[float, float, int]:
    """(wall ms, Redis CPU ms, journals deleted) of one pass."""
    keys = journal.hot.keys
    before = await redis_cpu_ms(r)
    started = time.perf_counter()
    if how == "scan":
        await journal._sweep_keyspace("3")
    else:
        journal._scanned = True
        await journal.sweep(0)
    wall = (time.perf_counter() - started) * 1000
    cpu = await redis_cpu_ms(r) - before
    left = 0
    async for _ in r.scan_iter(match=keys.journal_pattern, count=1000, _type="stream"):
        left += 1
    return wall, cpu, left


async def run(url: str, idle: int, active: int, rounds: int) -> None:
    r = aioredis.from_url(url, decode_responses=True)
    fast = FastRedis(url)
    keys = Keys(PREFIX)
    hot = HotState(r, fast, keys)
    journal = Journal(None, hot)  # type: ignore[arg-type]  # (empty journals: no flush)
    totals: dict[str, list[float]] = {"scan": [0.0, 0.0], "index": [0.0, 0.0]}
    try:
        for n in range(rounds):
            for how in ("scan", "index"):
                await populate(r, keys, idle, active)
                wall, cpu, left = await one_pass(r, journal, how)
                if left:
                    raise SystemExit(f"{how}: {left} journals left after the pass")
                totals[how][0] += wall
                totals[how][1] += cpu
                print(f"round {n + 1} {how:5}  {wall:9.1f} ms wall  {cpu:9.1f} ms Redis CPU")
    finally:
        await r.aclose()
        await fast.aclose()
    scan, index = totals["scan"], totals["index"]
    keyspace = idle * 8 + active * 9
    print(f"\n{idle:,} idle roots, {active:,} active ({keyspace:,} keys), {rounds} rounds, "
          "per pass:")
    print("| sweep pass | wall ms | Redis CPU ms |\n|---|---:|---:|")
    print(f"| keyspace scan (before; a process's first pass) | {scan[0] / rounds:.1f} | "
          f"{scan[1] / rounds:.1f} |")
    print(f"| journal index | {index[0] / rounds:.1f} | {index[1] / rounds:.1f} |")
    print(f"ratio scan / index: wall {scan[0] / index[0]:.1f}x, "
          f"Redis CPU {scan[1] / max(index[1], 0.001):.1f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idle", type=int, default=100_000)
    p.add_argument("--active", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--redis-url", default="private",
                   help="a Redis database the bench may empty (default: a private server)")
    opts = p.parse_args()
    with core.redis_server(opts.redis_url) as url:
        asyncio.run(run(url.split("?")[0], opts.idle, opts.active, opts.rounds))


if __name__ == "__main__":
    main()
