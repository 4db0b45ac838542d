"""A Redis of its own that the test stops and restarts empty: the app answers 503 while it is
down, and afterwards rebuilds every balance from Postgres, without being restarted itself."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.auth.keys import KEY_SCOPES, create_api_key
from app.main import create_app
from app.settings import Settings
from tests.conftest import Api
from tests.procs import free_port


class PrivateRedis:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)], stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    async def ready(self) -> None:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("private redis did not start")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture
async def own_app(settings: Settings, private_redis: PrivateRedis,
                  database_url: str) -> AsyncIterator[Api]:
    await private_redis.ready()
    own = Settings(database_url=settings.database_url, redis_url=private_redis.url,
                   run_workers=False, redis_prefix=f"rr{uuid.uuid4().hex[:6]}")
    application = create_app(own)
    conn = await asyncpg.connect(database_url)
    try:
        keys = {s.value: await create_api_key(conn, s, "restart test") for s in KEY_SCOPES}
    finally:
        await conn.close()
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://cg") as client:
            yield Api(client, keys)


async def test_restarted_empty_redis_is_rebuilt_without_restarting_the_app(
        own_app: Api, private_redis: PrivateRedis) -> None:
    api = own_app
    n = await api.setup()
    balance = await api.grant(n["account"], "10.00")
    await api.usage(n["account"], n["api"], "2.50", uid="before-restart")
    before = await api.live(n["account"])

    private_redis.stop()
    down = await api.client.post("/v1/check", headers=api.runtime,
                                 json={"account": n["account"], "product": n["api"]})
    assert down.status_code == 503  # cannot decide: says so, never guesses
    assert down.headers["content-type"] == "application/problem+json"

    private_redis.start()
    await private_redis.ready()
    after: dict[str, Any] = {}
    for _ in range(50):  # the first calls may still meet the dead connection
        response = await api.client.get(f"/v1/accounts/{n['account']}/balances", headers=api.runtime)
        if response.status_code == 200:
            after = response.json()
            break
        await asyncio.sleep(0.05)
    assert after == before
    replay = await api.usage(n["account"], n["api"], "2.50", uid="before-restart")
    assert replay["status"] == "duplicate"
    await api.usage(n["account"], n["api"], "1.00")
    assert await api.available(n["account"]) == "6.50"
    stored = await api.call("GET", f"/v1/balances/{balance['id']}")
    assert stored["remaining"] == "6.50"
