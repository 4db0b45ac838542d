"""`GET /v1/accounts/{code}/balances/stream`: the real-time balances as server-sent events, at
once and then at each change, ending when its credentials stop being good, after its lifetime,
or when the process stops (app/entitlements/streams.py). Streams are read from real app
processes: an in-process transport would wait for the end of the answer before showing any."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import jsonschema_rs
import pytest
import redis.asyncio as aioredis

from app import openapi
from app.auth.tokens import rotate_secret
from app.main import ENDPOINTS
from app.settings import Settings
from tests.conftest import Api
from tests.fresh import Fresh, fresh_app
from tests.procs import AppProcess, call_as, run_apps

FAST = {"CREDITGATE_STREAM_POLL_MS": "50", "CREDITGATE_STREAM_HEARTBEAT_S": "0.5"}
PATH = "/v1/accounts/{}/balances/stream"


class Events:
    """The events of one open stream, read one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, within: float = 5.0) -> dict[str, str] | None:
        """The next event (its fields; a comment as `comment`), or None when the stream ended."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(within):
            async for line in self._lines:
                if not line:
                    if fields:
                        return fields
                    continue
                name, _, value = line.partition(":")
                fields[name or "comment"] = value.removeprefix(" ")
        return fields or None

    async def balances(self, within: float = 5.0) -> dict[str, Any]:
        """The next `balances` event's data, skipping keep-alive comments."""
        deadline = time.monotonic() + within
        while True:
            event = await self.next(deadline - time.monotonic())
            assert event is not None, "the stream ended"
            if event.get("event") == "balances":
                data: dict[str, Any] = json.loads(event["data"])
                return data


@asynccontextmanager
async def stream(app: AppProcess, account: str, key: str) -> AsyncIterator[Events]:
    async with app.client() as client, client.stream(
            "GET", PATH.format(account), headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(10.0)) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Events(response)


def _as_documented(event: dict[str, str]) -> None:
    """The event is what /openapi.json says each event of the stream is (the schema of one
    event: Open API 3.1 has no `itemSchema`), its data included."""
    document = openapi.build(ENDPOINTS)
    one = document["paths"][PATH.format("{code}")]["get"]["responses"]["200"]["content"][
        "text/event-stream"]["schema"]
    components = {"components": document["components"]}
    jsonschema_rs.validate({**components, **one},
                           {k: int(v) if k == "retry" else v for k, v in event.items()})
    jsonschema_rs.validate({**components, **one["properties"]["data"]["contentSchema"]},
                           json.loads(event["data"]))


def _totals(data: dict[str, Any]) -> list[tuple[str, str]]:
    return [(t["available"], t["overage"]) for t in data["totals"]]


async def _use(client: httpx.AsyncClient, key: str, n: dict[str, str], amount: str) -> None:
    await call_as(client, key, "POST", "/v1/usage", json={
        "uid": uuid.uuid4().hex, "account": n["account"], "product": n["api"], "amount": amount,
        "timestamp": datetime.now(UTC).isoformat()})


async def _token(client: httpx.AsyncClient, key: str, account: str) -> str:
    minted = await call_as(client, key, "POST", f"/v1/accounts/{account}/customer-tokens",
                           json={"ttl_s": 600})
    return str(minted["token"])


async def test_a_customer_sees_its_balances_now_and_at_each_change(
        api: Api, settings: Settings, keys: dict[str, str]) -> None:
    n = await api.setup()
    async with run_apps(settings, 1, env=FAST) as apps, apps[0].client() as client:
        await call_as(client, keys["admin"], "POST", f"/v1/accounts/{n['account']}/grants",
                      json={"amount": "3.00"})
        token = await _token(client, keys["runtime"], n["account"])
        async with stream(apps[0], n["account"], token) as events:
            opened = await events.next()
            assert opened is not None and opened["retry"] == "2000"
            assert opened["event"] == "balances"
            _as_documented(opened)
            first = json.loads(opened["data"])
            assert first["account"] == n["account"] and _totals(first) == [("3.00", "0.00")]
            await _use(client, keys["runtime"], n, "1.00")
            assert _totals(await events.balances()) == [("2.00", "0.00")]
            await call_as(client, keys["admin"], "POST", f"/v1/accounts/{n['account']}/grants",
                          json={"amount": "5.00"})
            after = await events.balances()
            assert _totals(after) == [("7.00", "0.00")] and len(after["balances"]) == 2
            await _use(client, keys["runtime"], n, "8.00")  # beyond every balance: overage
            assert _totals(await events.balances()) == [("0.00", "1.00")]
            # nothing changes: only keep-alive comments, no repeated balances
            quiet = [await events.next(2.0) for _ in range(2)]
            assert quiet == [{"comment": "keep-alive"}] * 2


async def test_a_change_is_pushed_without_waiting_for_the_next_tick(
        api: Api, settings: Settings, keys: dict[str, str], redis: aioredis.Redis) -> None:
    """Ticks a minute apart: only Redis's word that the account changed can bring these
    events. With the check cache (and its subscriber) off, the same changes wait for a tick."""
    n = await api.setup()
    slow = {"CREDITGATE_STREAM_POLL_MS": "60000", "CREDITGATE_STREAM_HEARTBEAT_S": "60"}
    async with run_apps(settings, 2, env=slow) as apps, apps[1].client() as other:
        await call_as(other, keys["admin"], "POST", f"/v1/accounts/{n['account']}/grants",
                      json={"amount": "3.00"})
        async with stream(apps[0], n["account"], keys["runtime"]) as events:
            assert _totals(await events.balances()) == [("3.00", "0.00")]
            await _use(other, keys["runtime"], n, "1.00")  # through the other process
            assert _totals(await events.balances()) == [("2.00", "0.00")]
            await _use(other, keys["runtime"], n, "0.50")
            assert _totals(await events.balances()) == [("1.50", "0.00")]
            await redis.flushall()  # a lost hot state: rebuilt, the same balances, no event
            await call_as(other, keys["admin"], "POST", f"/v1/accounts/{n['account']}/grants",
                          json={"amount": "5.00"})
            assert _totals(await events.balances()) == [("6.50", "0.00")]
    for off in ({"CREDITGATE_CHECK_CACHE": "0"}, {"CREDITGATE_STREAM_PUSH": "0"}):
        async with run_apps(settings, 1, env={**slow, **off}) as apps, \
                apps[0].client() as client:
            async with stream(apps[0], n["account"], keys["runtime"]) as events:
                available = _totals(await events.balances())[0][0]
                await _use(client, keys["runtime"], n, "1.00")
                with pytest.raises(TimeoutError):
                    await events.balances(within=2.0)
                now = await call_as(client, keys["runtime"], "GET",
                                    f"/v1/accounts/{n['account']}/balances")
                assert Decimal(now["totals"][0]["available"]) == Decimal(available) - 1


async def test_a_balance_that_becomes_effective_is_streamed_though_nothing_was_written(
        api: Api, settings: Settings, keys: dict[str, str]) -> None:
    n = await api.setup()
    async with run_apps(settings, 1, env=FAST) as apps, apps[0].client() as client:
        soon = datetime.fromtimestamp(time.time() + 1.5, UTC).isoformat()
        await call_as(client, keys["admin"], "POST", f"/v1/accounts/{n['account']}/grants",
                      json={"amount": "4.00", "effective_at": soon})
        async with stream(apps[0], n["account"], keys["runtime"]) as events:
            first = await events.balances()
            assert _totals(first) == [("0.00", "0.00")]
            assert first["balances"][0]["drawable"] is False
            later = await events.balances(within=5.0)
            assert _totals(later) == [("4.00", "0.00")] and later["balances"][0]["drawable"]


async def test_a_stream_ends_after_its_lifetime_and_when_the_process_stops(
        api: Api, settings: Settings, keys: dict[str, str]) -> None:
    n = await api.setup()
    env = {**FAST, "CREDITGATE_STREAM_MAX_S": "1"}
    async with run_apps(settings, 1, env=env) as apps:
        async with stream(apps[0], n["account"], keys["runtime"]) as events:
            await events.balances()
            started = time.monotonic()
            while await events.next(5.0) is not None:  # keep-alives, then the end
                pass
            assert 0.4 < time.monotonic() - started < 3.0
    async with run_apps(settings, 1, env=FAST) as apps:
        async with stream(apps[0], n["account"], keys["runtime"]) as events:
            await events.balances()
            stopping = asyncio.get_running_loop().run_in_executor(None, apps[0].stop)
            started = time.monotonic()
            while True:
                try:
                    if await events.next(5.0) is None:
                        break
                except httpx.HTTPError:  # (the connection closed under the read)
                    break
            assert time.monotonic() - started < 4.0
            await stopping
            assert apps[0].proc.returncode == 0, apps[0].log_tail()


async def test_who_may_open_a_stream(api: Api, settings: Settings, keys: dict[str, str]) -> None:
    n, other = await api.setup(), await api.setup()
    async with run_apps(settings, 1, env=FAST) as apps, apps[0].client() as client:
        token = await _token(client, keys["runtime"], n["account"])

        async def status(account: str, key: str | None) -> tuple[int, str]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = await client.get(PATH.format(account), headers=headers)
            return response.status_code, response.headers["content-type"]

        problem = "application/problem+json"
        assert await status(other["account"], token) == (403, problem)  # another account's
        assert await status("no-such-account", keys["runtime"]) == (404, problem)
        assert await status(n["account"], None) == (401, problem)
        async with stream(apps[0], n["account"], keys["admin"]) as events:  # admin reads too
            assert (await events.balances())["account"] == n["account"]
        # a browser's EventSource sends no headers: a customer token may come in the URL ...
        async with client.stream("GET", PATH.format(n["account"]),
                                 params={"access_token": token}) as response:
            assert response.status_code == 200
            assert (await Events(response).balances())["account"] == n["account"]
        refused = await client.get(PATH.format(other["account"]), params={"access_token": token})
        assert refused.status_code == 403
        # ... an API key never does
        for key in (keys["runtime"], keys["admin"]):
            refused = await client.get(PATH.format(n["account"]), params={"access_token": key})
            assert refused.status_code == 401 and refused.json()["field"] == "access_token"
        # and other routes do not read it
        refused = await client.get(f"/v1/accounts/{n['account']}/balances",
                                   params={"access_token": token})
        assert refused.status_code == 401, refused.text


async def test_a_retired_signing_secret_ends_the_streams_it_opened(
        servers: tuple[str, str], settings: Settings) -> None:
    async with fresh_app(servers, settings) as f:
        await _retire_under_a_stream(f)


async def _retire_under_a_stream(f: Fresh) -> None:
    n = await f.api.setup()
    env = {**FAST, "CREDITGATE_TOKEN_SECRETS_TTL_S": "0.2"}
    async with run_apps(f.settings, 1, env=env) as apps, apps[0].client() as client:
        token = await _token(client, f.api.runtime["Authorization"].removeprefix("Bearer "),
                             n["account"])
        async with stream(apps[0], n["account"], token) as events:
            await events.balances()
            await asyncio.sleep(0.6)  # still open: only keep-alives
            assert await events.next(2.0) == {"comment": "keep-alive"}
            await rotate_secret(f.db, retire_now=True)
            started = time.monotonic()
            while await events.next(5.0) is not None:
                pass
            assert time.monotonic() - started < 3.0
        refused = await client.get(PATH.format(n["account"]),
                                   headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 401
