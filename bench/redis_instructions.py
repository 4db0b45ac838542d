"""The instructions redis-server executes per usage event, counted by callgrind: the same
events sent in batches of 1,000 (one script call per billing root and batch) and one per
request (one call each), in one run against one server.

    .venv/bin/python bench/redis_instructions.py [--events 3000] [--accounts 100]

Timings on this shared 2-core machine move by ±30% within minutes, which hides a change of a
few percent in the Lua scripts; instruction counts do not move (the same run twice agrees
within ~0.2%). redis-server runs under `valgrind --tool=callgrind` (about 50x slower); the
app runs in this process (no HTTP server) against it and a private database. After the set-up
and a warm-up (the hot state is built), the counters are zeroed (`callgrind_control -z`), a
workload runs, and they are dumped (`-d`): what is counted is the workload's alone, the
server's network handling included. Needs valgrind (a Debian package).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as bench
from inprocess import body, create_accounts

from app.main import create_app
from app.settings import Settings

TOTAL = re.compile(r"^summary: (\d+)", re.M)


def instructions(out_dir: Path, before: set[Path]) -> int:
    """The instructions of the dump callgrind wrote since `before` was listed."""
    for _ in range(100):
        new = set(out_dir.glob("callgrind.out*")) - before
        if new:
            text = max(new, key=lambda p: p.stat().st_mtime).read_text(errors="replace")
            if found := TOTAL.search(text):
                return int(found[1])
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def zero(pid: int) -> None:
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)


def dump(pid: int, out_dir: Path) -> int:
    before = set(out_dir.glob("callgrind.out*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    return instructions(out_dir, before)


async def counted(pid: int, out_dir: Path, work: Any) -> int:
    """Instructions of redis-server while `work` runs."""
    await asyncio.to_thread(zero, pid)
    await work()
    return await asyncio.to_thread(dump, pid, out_dir)


@contextlib.contextmanager
def callgrind_redis(out_dir: Path) -> Iterator[tuple[int, int]]:
    """redis-server under callgrind: (port, pid)."""
    port = bench.free_port()
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out",
         "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=out_dir)
    try:
        client = redis.Redis(port=port)
        for _ in range(300):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=60)


async def measure(opts: argparse.Namespace, db_url: str, redis_url: str, keys: dict[str, str],
                  pid: int, out_dir: Path) -> dict[str, float]:
    app = create_app(Settings(database_url=db_url, redis_url=redis_url, run_workers=False))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cg") as c:
            await create_accounts(c, keys["admin"], "ob", opts.accounts)
            runtime = {"Authorization": f"Bearer {keys['runtime']}"}
            run = uuid.uuid4().hex[:6]

            async def post(payload: dict[str, Any]) -> None:
                r = await c.post("/v1/usage", headers=runtime, json=payload)
                assert r.status_code == 200, r.text[:300]

            async def batches() -> None:
                for n in range(opts.events // 1000):
                    await post(body("batch", "ob", opts.accounts, n, 1000))

            async def singles() -> None:
                for n in range(opts.events):
                    await post(body("usage", "ob", opts.accounts, n, 1) | {"uid": f"{run}-s{n}"})

            await post(body("batch", "ob", opts.accounts, 10**6, 1000))  # warm: every root built
            per_event = {}
            for name, work in (("batched", batches), ("single", singles)):
                per_event[name] = await counted(pid, out_dir, work) / opts.events
            return per_event


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=3000, help="events per workload (x1000)")
    p.add_argument("--accounts", type=int, default=100)
    p.add_argument("--admin-database-url", default="postgresql://postgres@127.0.0.1:5432/test")
    opts = p.parse_args()
    opts.events = max(1000, opts.events // 1000 * 1000)
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("needs valgrind (apt-get install -y valgrind)")
    name = f"creditgate_bench_{uuid.uuid4().hex[:8]}"
    db_url, keys = await bench.prepare_database(opts.admin_database_url, name, opts.accounts)
    out_dir = Path(tempfile.mkdtemp(prefix="creditgate-callgrind-"))
    try:
        with callgrind_redis(out_dir) as (port, pid):
            per_event = await measure(opts, db_url, f"redis://127.0.0.1:{port}/0", keys, pid,
                                      out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        await bench.drop_database(opts.admin_database_url, name)
    batched, single = per_event["batched"], per_event["single"]
    print(f"redis-server instructions per usage event, {opts.events:,} events over "
          f"{opts.accounts} accounts\n")
    print("| events sent | instructions per event |")
    print("|---|---:|")
    print(f"| in batches of 1,000 | {batched:,.0f} |")
    print(f"| one per request | {single:,.0f} |")
    print(f"\nbatched / single: {batched / single:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
