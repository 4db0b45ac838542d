"""Real Postgres and Redis for every test: the machine's (TEST_DATABASE_URL / TEST_REDIS_URL)
or embedded ones started here. Each session migrates a fresh database of its own."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from app.auth.keys import KEY_SCOPES, create_api_key
from app.db import migrate
from app.main import create_app
from app.settings import REPO_ROOT, Settings


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    db_url, redis_url = os.environ.get("TEST_DATABASE_URL"), os.environ.get("TEST_REDIS_URL")
    if db_url and redis_url:
        yield db_url, redis_url
        return
    from app.embedded import start_embedded

    embedded = start_embedded(Path(tmp_path_factory.mktemp("embedded")))
    try:
        yield embedded.database_url, embedded.redis_url
    finally:
        embedded.stop()


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + name
    return base + ("?" + query if query else "")


@pytest.fixture(scope="session")
async def database_url(servers: tuple[str, str]) -> AsyncIterator[str]:
    admin_url = servers[0]
    name = f"creditgate_test_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = _with_database(admin_url, name)
    await migrate(url, REPO_ROOT / "migrations")
    yield url
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


@pytest.fixture(scope="session")
def redis_url(servers: tuple[str, str]) -> str:
    return servers[1]


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str) -> Settings:
    # a key prefix of its own: parallel test sessions may share one Redis
    # no automatic bill run: tests date plans in the past and bill them when they choose
    # snapshots every few entries: every rebuild in the suite reads snapshots and their tails
    # balance streams of the in-process apps end after 0.2 s: an in-process client reads an
    # answer to its end (the route walk, the fuzzer); app processes get their own settings
    # no sampled hot-state check: tests that change Redis on purpose must not see it repaired
    # (tests/test_hotstate_verify.py runs it itself)
    return Settings(database_url=database_url, redis_url=redis_url, worker_interval_s=0.5,
                    journal_orphan_ms=1_000, redis_prefix=f"cgt{uuid.uuid4().hex[:6]}",
                    bills_auto=False, snapshot_every=3, stream_max_s=0.2, verify_every_s=0)


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="session")
async def keys(database_url: str) -> dict[str, str]:
    conn = await asyncpg.connect(database_url)
    try:
        return {scope.value: await create_api_key(conn, scope, "tests") for scope in KEY_SCOPES}
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://creditgate") as c:
        yield c


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(redis_url, decode_responses=True)
    yield r
    await r.aclose()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


class Api:
    """The admin and runtime API as a test uses them; each call asserts its status."""

    def __init__(self, client: httpx.AsyncClient, keys: dict[str, str]) -> None:
        self.client = client
        self.admin = {"Authorization": f"Bearer {keys['admin']}"}
        self.runtime = {"Authorization": f"Bearer {keys['runtime']}"}

    async def call(self, method: str, path: str, *, scope: str = "admin", expect: int = 200,
                   headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        auth = self.admin if scope == "admin" else self.runtime
        response = await self.client.request(method, path, headers={**auth, **(headers or {})},
                                             **kwargs)
        assert response.status_code == expect, (response.status_code, response.text)
        return response.json()

    async def setup(self, *, credit_type: str = "usd", decimal_places: int = 2,
                    products: tuple[str, ...] = ("api", "storage"), parent: str | None = None,
                    ) -> dict[str, str]:
        """A fresh account (and its credit type and products) with unique codes."""
        suffix = uuid.uuid4().hex[:8]
        names = {"account": f"acct-{suffix}", "credit_type": f"{credit_type}-{suffix}"}
        await self.call("POST", "/v1/credit-types", expect=201, json={
            "code": names["credit_type"], "name": credit_type, "kind": "fiat" if credit_type == "usd"
            else "custom", "decimal_places": decimal_places})
        for product in products:
            names[product] = f"{product}-{suffix}"
            await self.call("POST", "/v1/products", expect=201,
                            json={"code": names[product], "name": product})
        body: dict[str, Any] = {"code": names["account"], "name": "Example Inc.",
                                "credit_type": names["credit_type"]}
        if parent:
            body["parent"] = parent
        await self.call("POST", "/v1/accounts", expect=201, json=body)
        return names

    async def grant(self, account: str, amount: str, **extra: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", f"/v1/accounts/{account}/grants", expect=201, json={"amount": amount, **extra})
        return result

    async def usage(self, account: str, product: str, amount: str, uid: str | None = None,
                    expect: int = 200, **extra: Any) -> dict[str, Any]:
        event = {"uid": uid or uuid.uuid4().hex, "account": account, "product": product,
                 "amount": amount, "timestamp": now_iso(), **extra}
        result: dict[str, Any] = await self.call("POST", "/v1/usage", scope="runtime",
                                                 expect=expect, json=event)
        return result

    async def check(self, account: str, product: str, expect: int = 200,
                    **extra: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", "/v1/check", scope="runtime", expect=expect,
            json={"account": account, "product": product, **extra})
        return result

    async def live(self, account: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("GET", f"/v1/accounts/{account}/balances",
                                                 scope="runtime")
        return result

    async def available(self, account: str) -> str:
        totals = (await self.live(account))["totals"]
        return str(totals[0]["available"]) if totals else "0"


def now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@pytest.fixture
def api(client: httpx.AsyncClient, keys: dict[str, str]) -> Api:
    return Api(client, keys)


# Stripe, faked at the HTTP boundary (tests/stripe_fake.py), for the purchase and recharge tests


@pytest.fixture(scope="module")
async def shop(settings: Settings, keys: dict[str, str]) -> AsyncIterator[Any]:
    from tests.stripe_fake import open_shop

    async with open_shop(settings, keys) as opened:
        yield opened


@pytest.fixture
def stripe_fake() -> Iterator[Any]:
    from tests.stripe_fake import fake_stripe

    with fake_stripe() as fake:
        yield fake
