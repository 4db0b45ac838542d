"""How the dispatcher connects: an httpx transport over plain asyncio streams.

httpx's default network layer goes through anyio, which costs more per request than the rest
of an attempt together (measured in bench/webhooks.py); this backend is asyncio streams and
nothing else. It is also where the address rule of urls.py is enforced on every new
connection: the host is resolved here, every address checked, and the connection made to a
checked address, so DNS cannot be changed between the check and the connect.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import httpcore
import httpx

from app.settings import Seconds
from app.webhooks.urls import first_problem, host_problem, resolve

READ_LIMIT = 2**16


class Stream(httpcore.AsyncNetworkStream):
    """Writes are held until the next read, so a request's head and body leave in one send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._unsent: list[bytes] = []

    async def read(self, max_bytes: int, timeout: Seconds | None = None) -> bytes:  # noqa: ASYNC109
        try:
            if timeout is None:  # the dispatcher's own deadline covers the whole attempt
                await self._flush()
                return await self._reader.read(max_bytes)
            async with asyncio.timeout(timeout):
                await self._flush()
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout("read timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: Seconds | None = None) -> None:  # noqa: ASYNC109
        if buffer:
            self._unsent.append(buffer)

    async def _flush(self) -> None:
        if self._unsent:
            data = b"".join(self._unsent)
            self._unsent.clear()
            self._writer.write(data)
            await self._writer.drain()

    async def aclose(self) -> None:
        self._writer.transport.abort()  # never wait to flush to a receiver that does not read

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: Seconds | None = None) -> httpcore.AsyncNetworkStream:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            await self.aclose()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            await self.aclose()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # an idle connection the server closed
            return self._reader.at_eof() or self._writer.transport.is_closing()
        names = {"ssl_object": "ssl_object", "client_addr": "sockname", "server_addr": "peername",
                 "socket": "socket"}
        return self._writer.get_extra_info(names[info]) if info in names else None


class Backend(httpcore.AsyncNetworkBackend):
    """TCP over asyncio streams; `guarded`: refuses link-local and metadata addresses."""

    def __init__(self, guarded: bool) -> None:
        self.guarded = guarded

    async def connect_tcp(self, host: str, port: int, timeout: Seconds | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._addresses(host, port)
                failure: Exception = httpcore.ConnectError(f"{host} has no address")
                for address in addresses:
                    try:
                        reader, writer = await asyncio.open_connection(address, port,
                                                                       limit=READ_LIMIT)
                        return Stream(reader, writer)
                    except OSError as exc:
                        failure = httpcore.ConnectError(str(exc) or type(exc).__name__)
                raise failure
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc

    async def _addresses(self, host: str, port: int) -> list[str]:
        if not self.guarded:
            return [host]
        named = host_problem(host)
        if named:
            raise httpcore.ConnectError(f"refused: {named}")
        try:
            addresses = await resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        problem = first_problem(addresses)
        if problem:
            raise httpcore.ConnectError(f"refused: {host} resolves to {problem}")
        return addresses

    async def connect_unix_socket(self, path: str, timeout: Seconds | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not receivers")

    async def sleep(self, seconds: Seconds) -> None:
        await asyncio.sleep(seconds)


class ResponseStream:
    """A response body; closing it hands its connection back for keep-alive (or closes it)."""

    def __init__(self, inner: AsyncIterable[bytes], origin: httpcore.Origin,
                 connection: httpcore.AsyncHTTPConnection, pool: KeepAlivePool) -> None:
        self._inner = inner
        self._origin = origin
        self._connection = connection
        self._pool = pool

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        closer = getattr(self._inner, "aclose", None)
        if closer is not None:
            await closer()
        await self._pool.put_back(self._origin, self._connection)


def _key(origin: httpcore.Origin) -> tuple[bytes, bytes, int]:
    return origin.scheme, origin.host, origin.port


class KeepAlivePool:
    """Keep-alive HTTP/1.1 connections per origin, in place of httpcore's connection pool.

    httpcore's pool queues requests and rescans every connection for every request and every
    answer (quadratic in the requests in flight); the dispatcher already bounds what is in
    flight, so this pool only reuses an idle connection or opens one, and never waits.
    """

    def __init__(self, backend: httpcore.AsyncNetworkBackend, max_idle: int,
                 keepalive_expiry: Seconds = 5.0) -> None:
        self._backend = backend
        self._ssl = httpx.create_ssl_context(trust_env=False)
        self._max_idle = max_idle
        self._expiry = keepalive_expiry
        self._idle: dict[tuple[bytes, bytes, int], list[httpcore.AsyncHTTPConnection]] = {}

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        connection = await self._take(request.url.origin)
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            await connection.aclose()
            raise
        assert isinstance(response.stream, AsyncIterable)
        return httpcore.Response(status=response.status, headers=response.headers,
                                 content=ResponseStream(response.stream, request.url.origin,
                                                        connection, self),
                                 extensions=response.extensions)

    async def _take(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        idle = self._idle.get(_key(origin), [])
        while idle:
            connection = idle.pop()
            if connection.is_available() and not connection.has_expired():
                return connection
            await connection.aclose()
        return httpcore.AsyncHTTPConnection(origin=origin, ssl_context=self._ssl,
                                            keepalive_expiry=self._expiry,
                                            network_backend=self._backend)

    async def put_back(self, origin: httpcore.Origin,
                       connection: httpcore.AsyncHTTPConnection) -> None:
        idle = self._idle.setdefault(_key(origin), [])
        if connection.is_idle() and not connection.has_expired() and len(idle) < self._max_idle:
            idle.append(connection)
        else:
            await connection.aclose()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                await connection.aclose()
        self._idle.clear()

    async def __aenter__(self) -> KeepAlivePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def transport(max_idle_per_origin: int, guarded: bool) -> httpx.AsyncHTTPTransport:
    """An httpx transport on KeepAlivePool and Backend; it never reads proxy settings."""
    made = httpx.AsyncHTTPTransport(trust_env=False)
    # httpx builds the request and response objects and maps the errors; the pool is ours
    setattr(made, "_pool", KeepAlivePool(Backend(guarded), max_idle_per_origin))  # noqa: B010
    return made
