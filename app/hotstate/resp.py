"""A small pipelined Redis client for the hot path: EVALSHA and nothing fancy.

redis-py's asyncio client costs ~100 µs of CPU per call, more than a whole bare request; this
one writes RESP with hiredis's packer and parses with hiredis's reader, keeps every call of a
process on a few long-lived connections and lets concurrent calls pipeline on them (Redis
answers in order, so replies are matched to a FIFO of futures). Everything else uses redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
from redis.exceptions import NoScriptError, ResponseError

# A call unanswered this long means Redis is stuck: its connection is dropped and every call
# waiting on it fails (the request answers 503 instead of hanging).
STALL_S = 5.0


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", errors="strict")
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.WriteTransport | None = None
        self.closed = False
        self._outbox: list[bytes] = []
        self.tracking: int | None = None  # the client id invalidations go to (checkcache.py)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future, _ = self.waiters.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                message = str(reply)
                error = NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)
                future.set_exception(error)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiters:
            future, _ = self.waiters.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"redis connection lost: {exc or 'closed'}"))

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._outbox:  # the first command of this loop tick: write them all at its end
            loop.call_soon(self._write)
        self._outbox.append(packed)
        self.waiters.append((future, time.monotonic()))
        return future

    def _write(self) -> None:
        data, self._outbox = b"".join(self._outbox), []
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def stalled(self, now: float) -> bool:  # float-ok: monotonic seconds
        return bool(self.waiters) and now - self.waiters[0][1] > STALL_S

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class FastRedis:
    """Pipelined connections to one Redis, used round-robin: one by default, so every call of
    a loop tick goes out in one write and its replies come back in one read."""

    def __init__(self, url: str, connections: int = 1) -> None:
        self._url = url
        self._slots: list[_Connection | None] = [None] * connections
        self._turn = itertools.cycle(range(connections))
        self._connecting: dict[int, asyncio.Task[_Connection]] = {}
        self._watchdog: asyncio.Task[None] | None = None
        # run on each new connection before it serves calls (checkcache.py turns tracking on)
        self.on_connect: Callable[[_Connection], Awaitable[None]] | None = None

    async def _open(self) -> _Connection:
        parsed = urlparse(self._url)
        loop = asyncio.get_running_loop()
        if parsed.scheme == "unix":
            _, conn = await loop.create_unix_connection(_Connection, unquote(parsed.path))
        else:
            _, conn = await loop.create_connection(_Connection, parsed.hostname or "127.0.0.1",
                                                   parsed.port or 6379)
        query = parse_qs(parsed.query)
        db = query.get("db", [parsed.path.strip("/") if parsed.scheme != "unix" else ""])[0]
        setup: list[tuple[str, ...]] = []
        if parsed.password:
            setup.append(("AUTH", unquote(parsed.username or "default"), unquote(parsed.password)))
        if db and db != "0":
            setup.append(("SELECT", db))
        for command in setup:
            await conn.send(hiredis.pack_command(command))  # type: ignore[arg-type]  # stub too narrow
        if self.on_connect is not None:
            await self.on_connect(conn)
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch())
        return conn

    async def _connection(self) -> _Connection:
        index = next(self._turn)
        conn = self._slots[index]
        if conn is not None and not conn.closed:
            return conn
        if index not in self._connecting:  # one connect per slot, however many callers wait
            self._connecting[index] = asyncio.create_task(self._open())
        try:
            conn = await asyncio.shield(self._connecting[index])
        finally:
            if self._connecting.get(index) and self._connecting[index].done():
                del self._connecting[index]
        self._slots[index] = conn
        return conn

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in self._slots:
                if conn is not None and conn.stalled(now):
                    conn.close()

    def open_connections(self) -> list[_Connection]:
        return [conn for conn in self._slots if conn is not None and not conn.closed]

    def tracked(self, client_id: int) -> bool:
        """Every open connection sends its invalidations to `client_id`."""
        return all(conn.tracking == client_id for conn in self.open_connections())

    def ready(self) -> _Connection | None:
        """The next open connection, when there is one: no coroutine on the hot path."""
        conn = self._slots[next(self._turn)]
        return conn if conn is not None and not conn.closed else None

    async def execute(self, *args: str | int) -> Any:
        conn = self.ready() or await self._connection()
        return await conn.send(hiredis.pack_command(args))  # type: ignore[arg-type]  # stub too narrow

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for conn in self._slots:
            if conn is not None:
                conn.close()


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Script:
    """A Lua script called by SHA, loaded on first NOSCRIPT (after a Redis restart too)."""

    def __init__(self, client: FastRedis, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        client = self.client
        try:
            conn = client.ready() or await client._connection()
            return await conn.send(hiredis.pack_command(
                ("EVALSHA", self.sha, len(keys), *keys, *args)))
        except NoScriptError:
            await self.client.execute("SCRIPT", "LOAD", self.source)
            return await self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args)

    async def after(self, command: bytes, keys: list[str], args: list[Any]) -> tuple[Any, bool]:
        """The call, preceded on the same connection (so applied first) by a packed command,
        in the same write: no round trip more. Returns the call's result and whether the
        command succeeded (its failure is the caller's to handle; the call ran all the same)."""
        client = self.client
        conn = client.ready() or await client._connection()
        before = conn.send(command)
        before.add_done_callback(_retrieved)  # (when the call fails, nobody awaits it)
        try:
            result = await conn.send(hiredis.pack_command(
                ("EVALSHA", self.sha, len(keys), *keys, *args)))
        except NoScriptError:
            result = await self(keys, args)
        try:
            await before
        except (ResponseError, ConnectionError):
            return result, False
        return result, True

    async def many(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Several calls pipelined on one connection without a task per call."""
        conn = await self.client._connection()
        futures = [conn.send(hiredis.pack_command(
            ("EVALSHA", self.sha, len(keys), *keys, *args))) for keys, args in calls]
        results = await asyncio.gather(*futures, return_exceptions=True)
        if any(isinstance(r, NoScriptError) for r in results):
            return [await self(keys, args) for keys, args in calls]
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results
