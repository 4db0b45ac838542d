"""How much CPU one Redis script call costs from Python, by client style (no HTTP at all).

    .venv/bin/python bench/redis_micro.py [--calls 20000]

Runs a one-line EVALSHA against a private redis-server:
  redis-py, one call at a time / 64 concurrent callers / pipelines of 100 calls;
  a minimal asyncio protocol with hiredis.Reader and one pipelined connection (what a
  purpose-built hot-path client could cost), 64 concurrent callers.
Prints calls/s and process CPU µs per call: the floor any endpoint pays per Redis call.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import hiredis
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

SCRIPT = "return redis.call('HGET', KEYS[1], ARGV[1])"


class Pipelined(asyncio.Protocol):
    """One connection; every caller's command is written at once, replies matched in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            self.waiting.popleft().set_result(reply)

    def call(self, *args: str | int) -> asyncio.Future[Any]:
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a.encode() if isinstance(a, str) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        assert self.transport is not None
        self.transport.write(b"".join(parts))
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        return fut


async def timed(label: str, calls: int, fn: Any) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    await fn()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{label:<44} {calls / wall:>10,.0f} calls/s {1e6 * cpu / calls:>8.1f} µs CPU/call")


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=20_000)
    n = p.parse_args().calls
    with bench.redis_server("private") as url:
        client = aioredis.from_url(url, decode_responses=True)
        script = client.register_script(SCRIPT)
        await script(keys=["k"], args=["f"])
        sha = script.sha

        async def sequential() -> None:
            for i in range(n):
                await script(keys=["k"], args=[str(i)])

        async def concurrent() -> None:
            async def worker() -> None:
                for i in range(n // 64):
                    await script(keys=["k"], args=[str(i)])
            await asyncio.gather(*(worker() for _ in range(64)))

        async def pipelined() -> None:
            for _ in range(n // 100):
                pipe = client.pipeline(transaction=False)
                for i in range(100):
                    pipe.evalsha(sha, 1, "k", str(i))
                await pipe.execute()

        await timed("redis-py, sequential", n, sequential)
        await timed("redis-py, 64 concurrent callers", n // 64 * 64, concurrent)
        await timed("redis-py, pipelines of 100", n // 100 * 100, pipelined)
        await client.aclose()

        host, port = url.split("//")[1].split("/")[0].split(":")
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(Pipelined, host, int(port))

        async def raw() -> None:
            async def worker() -> None:
                for i in range(n // 64):
                    await proto.call("EVALSHA", sha, 1, "k", i)
            await asyncio.gather(*(worker() for _ in range(64)))

        await timed("hiredis protocol, 1 conn, 64 concurrent", n // 64 * 64, raw)
        assert proto.transport is not None
        proto.transport.close()


if __name__ == "__main__":
    asyncio.run(main())
