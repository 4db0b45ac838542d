"""Request bodies are bounded: one over CREDITGATE_MAX_BODY_BYTES is refused 413 before it is
read whole (by its Content-Length, or as its chunks pass the limit), and JSON nested too deep
to walk is a 400, never a 500. Either way nothing changes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from app import http
from app.http import Endpoint
from app.main import ENDPOINTS, create_app
from app.settings import Settings
from tests.conftest import Api, now_iso
from tests.procs import run_apps

SWEPT = {"/v1/check", "/v1/accounts", "/v1/accounts/{code}/grants"}
TABLES = ("accounts", "products", "credit_types", "balances", "ledger_entries", "usage_events",
          "measurements", "meters", "audit_log", "idempotency_keys")


def _url(endpoint: Endpoint, account: str = "no-such-0") -> str:
    """Its path with `account` for {code}, 0 for an id and a name that exists nowhere for the
    rest: well-formed, so the body is parsed."""
    path = re.sub(r"{\w*id}", "0", endpoint.path.replace("{code}", account))
    return re.sub(r"{\w+}", "no-such-0", path)


def _assert_problem(response: httpx.Response, status: int, what: str) -> None:
    assert response.status_code == status, (what, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json"), what
    problem = response.json()
    assert problem["status"] == status and problem["field"] == "body", (what, problem)


async def _counts(db: asyncpg.Connection) -> dict[str, int]:
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}


@pytest.fixture
async def small_limit_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An app (no workers) with a 1 KiB limit."""
    app = create_app(dataclasses.replace(settings, max_body_bytes=1024, run_workers=False))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditgate") as client:
        yield client


async def test_every_route_refuses_a_body_over_the_limit(
        small_limit_client: httpx.AsyncClient) -> None:
    """Refused before the key is looked at: no key is sent."""
    for endpoint in ENDPOINTS:
        what = f"{endpoint.method} {endpoint.path}"
        response = await small_limit_client.request(
            endpoint.method, _url(endpoint), content=b" " * 1025,
            headers={"content-type": "application/json"})
        _assert_problem(response, 413, what)
        assert "1024 bytes" in response.json()["detail"], what


async def test_a_body_at_the_limit_is_served_and_one_byte_more_is_not(
        settings: Settings, api: Api, db: asyncpg.Connection) -> None:
    """Through a real server: a usage event padded to exactly the limit is accepted; the same
    padded one byte more (by Content-Length, then chunked with no length) is refused and not
    recorded; a client announcing a huge body is answered at once, without sending it."""
    names = await api.setup()
    await api.grant(names["account"], "10.00")
    limit = 2048

    def padded(uid: str, size: int) -> bytes:
        body = json.dumps({"uid": uid, "account": names["account"], "product": names["api"],
                           "amount": "1.00", "timestamp": now_iso()}).encode()
        return body + b" " * (size - len(body))

    headers = {**api.runtime, "content-type": "application/json"}
    async with run_apps(settings, 1, env={"CREDITGATE_MAX_BODY_BYTES": str(limit)}) as apps:
        async with apps[0].client() as client:
            at_limit, over, chunked = (f"lim-{uuid.uuid4().hex[:10]}" for _ in range(3))
            response = await client.post("/v1/usage", content=padded(at_limit, limit),
                                         headers=headers)
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "accepted"

            response = await client.post("/v1/usage", content=padded(over, limit + 1),
                                         headers=headers)
            _assert_problem(response, 413, "Content-Length over the limit")

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
                body = padded(chunked, limit + 1)
                for start in range(0, len(body), 500):
                    yield body[start:start + 500]

            response = await client.post("/v1/usage", content=chunks(), headers=headers)
            assert "content-length" not in response.request.headers
            _assert_problem(response, 413, "chunked body over the limit")

            # a gigabyte announced and never sent: answered from the headers alone
            reader, writer = await asyncio.open_connection("127.0.0.1", apps[0].port)
            writer.write(b"POST /v1/usage HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         + f"authorization: {api.runtime['Authorization']}\r\n".encode()
                         + b"content-length: 1000000000\r\n\r\n")
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), timeout=10)
            writer.close()
            assert status.startswith(b"HTTP/1.1 413"), status

    known = await db.fetch("SELECT uid FROM usage_events WHERE uid = ANY($1::text[])",
                           [at_limit, over, chunked])
    assert [r["uid"] for r in known] == [at_limit]


def _deep(names: dict[str, str], depth: int) -> bytes:
    """A body whose `amount` and `data` are a NUL `depth` lists down."""
    nested = b"[" * depth + b'"\\u0000"' + b"]" * depth
    return (b'{"uid": "deep", "code": "deep", "account": "%s", "amount": %s, "data": {"x": %s}}'
            % (names["account"].encode(), nested, nested))


async def test_json_nested_too_deep_is_a_400_on_every_route_and_changes_nothing(
        api: Api, db: asyncpg.Connection) -> None:
    """Deeper than the parser goes (a 400 naming the body), and as deep as it goes but too
    deep to walk for a NUL or to validate: a 4xx, never a 500."""
    names = await api.setup()
    deeper = b"[" * 100_000 + b"]" * 100_000
    before = await _counts(db)
    walked = set()
    for endpoint in ENDPOINTS:
        if endpoint.body is None and not endpoint.raw_body:
            continue
        what = f"{endpoint.method} {endpoint.path}"
        url = _url(endpoint, names["account"])
        headers = {**(api.admin if "admin" in {s.value for s in endpoint.scopes}
                      else api.runtime), "content-type": "application/json"}
        response = await api.client.request(endpoint.method, url, content=deeper,
                                            headers=headers)
        _assert_problem(response, 400, what)
        assert response.json()["code"] == "malformed_body", (what, response.text)
        # parsed, then walked for a NUL and validated; near the parser's own limit (which
        # depends on the stack it runs on) the walk can run out of stack where parsing did not
        for depth in (400, *range(900, 1000)) if endpoint.path in SWEPT else (400,):
            response = await api.client.request(endpoint.method, url, headers=headers,
                                                content=_deep(names, depth))
            assert 400 <= response.status_code < 500, (what, depth, response.text)
        walked.add(endpoint.path)
    assert {"/v1/check", "/v1/usage", "/v1/measurements", "/v1/accounts"} <= walked
    assert await _counts(db) == before


async def test_a_body_parsed_but_too_deep_to_walk_is_a_400(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """From Python 3.12 on the JSON parser's C recursion has a limit of its own, above the
    interpreter's: a body can parse that is too deep for the NUL walk and validation. Here a
    parser standing in for such a one hands over 5,000 levels (built without recursion)."""
    names = await api.setup()
    deep: Any = "\u0000"
    for _ in range(5_000):
        deep = [deep]
    monkeypatch.setattr(http, "loads", lambda raw: {"account": names["account"],
                                                    "product": names["api"], "x": deep})
    response = await api.client.post("/v1/check", content=b'"\\u0000"', headers={
        **api.runtime, "content-type": "application/json"})
    _assert_problem(response, 400, "parsed 5,000 deep")
    assert response.json()["detail"] == "request body is nested too deeply"
