"""A real HTTP receiver for webhook tests: an asyncio server on 127.0.0.1 speaking HTTP/1.1
(keep-alive) that verifies every signed request with the `standardwebhooks` package.

Each path behaves as the test says: answer a status, wait, answer garbage, a redirect, or a
body that never ends. Paths with no behaviour answer 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.conftest import Api


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    verified_with: list[str] = field(default_factory=list)

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"ok": true}'
    delay_s: float = 0.0
    raw: bytes | None = None  # sent as is instead of an HTTP answer, then the connection closes
    endless: float | None = None  # a body that never ends: a 64 KB chunk every `endless` s


Behaviour = Callable[[Received], Awaitable[Reply] | Reply]


class Receiver:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.received: list[Received] = []
        self.behaviours: dict[str, Behaviour] = {}
        self.secrets: dict[str, list[str]] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
                asyncio.CancelledError):
            pass  # the client left, or the receiver stops
        finally:
            self._conns.discard(task)
            # abort, not close: a close waits to flush what a client may never read
            writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *lines = head.split("\r\n")
        _, path, _ = request_line.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        got = Received(path, headers, body, time.time())
        got.verified_with = self._verify(got)
        self.received.append(got)
        behaviour = self.behaviours.get(path)
        reply = Reply(400, body=b"bad signature") if self.secrets.get(path) and \
            not got.verified_with else Reply()
        if behaviour is not None and reply.status != 400:
            made = behaviour(got)
            reply = await made if asyncio.iscoroutine(made) else made  # type: ignore[assignment]
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.raw is not None:
            writer.write(reply.raw)
            await writer.drain()
            return False
        extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
        length = 10**12 if reply.endless is not None else len(reply.body)
        writer.write(f"HTTP/1.1 {reply.status} X\r\ncontent-length: {length}\r\n{extra}\r\n"
                     .encode())
        if reply.endless is not None:
            while True:
                writer.write(b"x" * 65536)
                await writer.drain()
                await asyncio.sleep(reply.endless)
        writer.write(reply.body)
        await writer.drain()
        return True

    def _verify(self, got: Received) -> list[str]:
        ok = []
        for secret in self.secrets.get(got.path, []):
            with contextlib.suppress(WebhookVerificationError):
                Webhook(secret).verify(got.body, got.headers)
                ok.append(secret)
        return ok


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    started = Receiver()
    await started.start()
    yield started
    await started.stop()


class Endpoints:
    """Creates webhook endpoints through the API and disables them all when the test ends,
    so they stop collecting the events of later tests."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.ids: list[int] = []

    async def create(self, receiver: Receiver | None, path: str | None = None, *,
                     url: str | None = None, event_types: list[str] | None = None,
                     **extra: Any) -> dict[str, Any]:
        path = path or f"/hook-{uuid.uuid4().hex[:8]}"
        body = {"url": url or (receiver.url(path) if receiver else ""), "event_types": event_types,
                **extra}
        created: dict[str, Any] = await self.api.call("POST", "/v1/webhook-endpoints",
                                                      expect=201, json=body)
        self.ids.append(created["id"])
        if receiver is not None:
            receiver.secrets[path] = [created["secret"]]
        created["path"] = path
        return created

    async def send_test(self, endpoint_id: int) -> str:
        sent = await self.api.call("POST", f"/v1/webhook-endpoints/{endpoint_id}/test", expect=202)
        return str(sent["event_id"])

    async def disable_all(self) -> None:
        for endpoint_id in self.ids:
            await self.api.call("PATCH", f"/v1/webhook-endpoints/{endpoint_id}",
                                json={"enabled": False})


@pytest.fixture
async def endpoints(api: Api) -> AsyncIterator[Endpoints]:
    made = Endpoints(api)
    yield made
    await made.disable_all()


async def eventually(probe: Callable[[], Awaitable[bool] | bool], within: float = 10.0,
                     every: float = 0.05) -> None:
    """Poll `probe` (a coroutine function or a plain one) until it is true; fail after `within`."""
    deadline = time.monotonic() + within

    async def true() -> bool:
        found = probe()
        return bool(await found) if inspect.isawaitable(found) else bool(found)

    while not await true():
        assert time.monotonic() < deadline, f"not true within {within} s"
        await asyncio.sleep(every)


async def delivery_rows(db: asyncpg.Connection, endpoint_id: int) -> list[asyncpg.Record]:
    return await db.fetch(
        """SELECT d.*, e.type FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id
           WHERE d.endpoint_id = $1 ORDER BY d.id""", endpoint_id)


async def attempt_rows(db: asyncpg.Connection, endpoint_id: int) -> list[asyncpg.Record]:
    return await db.fetch(
        """SELECT a.*, d.event_id FROM webhook_attempts a
           JOIN webhook_deliveries d ON d.id = a.delivery_id
           WHERE d.endpoint_id = $1 ORDER BY a.id""", endpoint_id)


async def statuses(db: asyncpg.Connection, endpoint_id: int) -> list[str]:
    return [r["status"] for r in await delivery_rows(db, endpoint_id)]


async def make_due(db: asyncpg.Connection, endpoint_id: int) -> None:
    """Time travel: the endpoint's pending retries are due now."""
    # only settled retries: a claim in flight (more claims than logged attempts) keeps its lease
    await db.execute(
        """UPDATE webhook_deliveries d SET next_attempt_at = now()
           WHERE endpoint_id = $1 AND status = 'pending' AND attempts > 0
             AND attempts = (SELECT count(*) FROM webhook_attempts a WHERE a.delivery_id = d.id)""",
        endpoint_id)


async def exhaust_retries(db: asyncpg.Connection, endpoint_id: int) -> None:
    """Time travel: the endpoint's pending deliveries are on their last try, due now."""
    await db.execute(
        """UPDATE webhook_deliveries SET retry_base = attempts - 7
           WHERE endpoint_id = $1 AND status = 'pending'""", endpoint_id)
    await make_due(db, endpoint_id)
