"""Answers of plain checks kept in the process, dropped the moment Redis says they changed.

A plain `check` (no consume) of an (account, product, credit type) whose hot state has not
changed since the last one is answered from this process's memory, with no Redis round trip.
Freshness comes from Redis itself (server-assisted client-side caching, `CLIENT TRACKING`):

* every connection of the hot-path client (`FastRedis`) has tracking on, redirected to one
  subscriber connection of this process (`SUBSCRIBE __redis__:invalidate`);
* a check that goes to Redis declares the keys its answer depends on (the status, balance
  and definition hashes of each account of the chain) as script keys, so Redis remembers that
  this process read them;
* any later write to one of them (a debit from any process, a grant, a block, a rebuild, a
  key evicted or expired, a manual edit) makes Redis push an invalidation for that key, and
  the answers of its billing root are dropped; a FLUSHALL pushes a flush of everything;
* before an answer is served from memory, the subscriber socket is read without blocking, so
  every invalidation Redis sent before this request was read is applied first. A change that
  was acknowledged before the check was sent has had its invalidation written to that socket
  (Redis writes it in the same event-loop turn as the write's own reply, long before the
  journal's Postgres commit lets the write answer), so it is never missed;
* an answer read from Redis is only kept when no invalidation of its root (nor a flush, nor
  a lost subscriber) arrived while it was in flight;
* an answer also carries the next instant a balance of the chain becomes effective or expires
  (nothing is written to Redis then), and every answer is kept at most `ttl_ms` whatever
  happens: a bound on the damage of any invalidation that could still be lost.

When the subscriber is not connected (Redis restarted, the connection killed) nothing is
served from memory and nothing is kept; it reconnects in the background and re-arms tracking.
Check-and-consume and usage never use this: they always decide in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis
from redis.exceptions import ResponseError

from app.hotstate.keys import root_of
from app.hotstate.resp import FastRedis, _Connection
from app.settings import Seconds

log = logging.getLogger(__name__)
CHANNEL = "__redis__:invalidate"
RETRY_S: Seconds = 1.0


@dataclass(frozen=True, slots=True)
class Answer:
    """What a plain check learnt in Redis, independent of the amount asked."""

    root_id: int
    blocked: bool
    eligible: bool  # some balance of the credit type is eligible for the product
    available: int  # scaled
    until_ms: int  # served from memory only before this instant
    # what the caller built from this answer, per status (the check's reply: rebuilt only
    # when the answer changes, which drops it with its memo)
    memo: dict[str, Any] = field(default_factory=dict, compare=False)

    def status(self, amount: int) -> str:
        """decide.lua's order: blocked, then no eligible balance, then not enough."""
        if self.blocked:
            return "account_blocked"
        if not self.eligible:
            return "no_eligible_balance"
        if self.available < amount or self.available <= 0:
            return "insufficient_balance"
        return "ok"


CacheKey = tuple[int, str, str]  # account id, product, credit type code


class CheckCache:
    def __init__(self, url: str, fast: FastRedis, ttl_ms: int, max_entries: int = 100_000) -> None:
        self._url = url
        self._fast = fast
        self._ttl_ms = ttl_ms
        self._max = max_entries
        self._answers: dict[CacheKey, Answer] = {}
        self._by_root: dict[int, list[CacheKey]] = {}
        # moves: per root, how many invalidations arrived; epoch: flushes and lost subscribers
        self._moves: dict[int, int] = {}
        self._epoch = 0
        # balance streams waiting for their root to change (app/entitlements/streams.py)
        self._wakers: dict[int, set[asyncio.Event]] = {}
        self._sock: socket.socket | None = None
        self._poll: select.poll | None = None  # asked before a read: an empty socket raises nothing
        self._reader = hiredis.Reader()
        self._sub_id: int | None = None
        self._arming: asyncio.Task[None] | None = None
        self._closed = False
        self._connecting = asyncio.Lock()
        self.hits = 0
        fast.on_connect = self.track

    # -- serving ------------------------------------------------------------------------

    def lookup(self, key: CacheKey, now_ms: int) -> Answer | None:
        answer = self._answers.get(key)
        if answer is None:
            return None
        self._drain()  # invalidations Redis sent before this request: applied first
        answer = self._answers.get(key)
        if answer is None or now_ms >= answer.until_ms:
            return None
        self.hits += 1
        return answer

    def token(self, root_id: int) -> tuple[int, int] | None:
        """Taken before a check goes to Redis; `keep` refuses its answer when it moved."""
        if self._sub_id is None:
            return None
        return self._epoch, self._moves.get(root_id, 0)

    def keep(self, token: tuple[int, int] | None, key: CacheKey, answer: Answer) -> None:
        if token is None:
            return
        self._drain()
        if (self._sub_id is None or token != (self._epoch, self._moves.get(answer.root_id, 0))
                or not self._fast.tracked(self._sub_id)):
            return
        if len(self._answers) >= self._max:
            self._forget_all()
        if key not in self._answers:
            self._by_root.setdefault(answer.root_id, []).append(key)
        self._answers[key] = answer

    def ttl_end(self, now_ms: int, boundary_ms: int) -> int:
        end = now_ms + self._ttl_ms
        return min(end, boundary_ms) if boundary_ms else end

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def armed(self) -> bool:
        return self._sub_id is not None

    # -- wakers: the same invalidations, for balance streams -----------------------------------

    def wake_on(self, root_id: int, waker: asyncio.Event) -> None:
        """Set `waker` whenever Redis says a key of the root this process read changed (and on
        a flush, or when the subscriber is lost). A stream reads with its keys declared, so
        each read arms the next wake-up."""
        self._wakers.setdefault(root_id, set()).add(waker)

    def stop_waking(self, root_id: int, waker: asyncio.Event) -> None:
        wakers = self._wakers.get(root_id)
        if wakers is not None:
            wakers.discard(waker)
            if not wakers:
                del self._wakers[root_id]

    def _wake(self, root_id: int | None) -> None:
        groups = self._wakers.values() if root_id is None else [self._wakers.get(root_id, ())]
        for wakers in groups:
            for waker in wakers:
                waker.set()

    # -- invalidations ----------------------------------------------------------------------

    def _forget_root(self, root_id: int) -> None:
        if len(self._moves) >= self._max:
            self._forget_all()
        self._moves[root_id] = self._moves.get(root_id, 0) + 1
        for key in self._by_root.pop(root_id, ()):
            self._answers.pop(key, None)
        self._wake(root_id)

    def _forget_all(self) -> None:
        self._epoch += 1
        self._answers.clear()
        self._by_root.clear()
        self._moves.clear()
        self._wake(None)

    def _drain(self) -> None:
        sock, poll = self._sock, self._poll
        if sock is None or poll is None:
            return
        if not poll.poll(0):  # nothing sent (the common case: cheaper than a refused recv)
            return
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._lost(exc)
                return
            if not data:
                self._lost(None)
                return
            self._reader.feed(data)
            if len(data) < 65536:
                break
        while (message := self._reader.gets()) is not False:
            self._apply(message)

    def _apply(self, message: Any) -> None:
        if not isinstance(message, list) or len(message) != 3 or message[0] != b"message":
            return  # (the subscribe confirmation)
        keys = message[2]
        if keys is None:  # FLUSHALL / FLUSHDB
            self._forget_all()
            return
        for key in keys:
            with contextlib.suppress(ValueError):
                self._forget_root(root_of(key.decode()))

    def _lost(self, exc: BaseException | None) -> None:
        log.warning("check cache: invalidation connection lost (%s); serving from Redis until "
                    "it is back", exc or "closed")
        self._disarm()
        if not self._closed:
            self._rearm_soon()

    def _disarm(self) -> None:
        sock, self._sock, self._sub_id, self._poll = self._sock, None, None, None
        self._forget_all()
        self._reader = hiredis.Reader()
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    # -- connecting -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the subscriber (best effort: without it checks simply go to Redis)."""
        try:
            await self._ensure()
        except OSError as exc:
            log.warning("check cache: cannot subscribe to invalidations yet: %s", exc)
            self._rearm_soon()

    async def close(self) -> None:
        self._closed = True
        if self._arming is not None:
            self._arming.cancel()
        self._disarm()

    def _rearm_soon(self) -> None:
        if self._arming is None or self._arming.done():
            self._arming = asyncio.get_running_loop().create_task(self._rearm())

    async def _rearm(self) -> None:
        while not self._closed and self._sub_id is None:
            await asyncio.sleep(RETRY_S)
            try:
                await self._ensure()
                for conn in self._fast.open_connections():
                    await self.track(conn)
            except (OSError, ConnectionError) as exc:
                log.info("check cache: re-arming failed, retrying: %s", exc)
                self._disarm()

    async def track(self, conn: _Connection) -> None:
        """Turn tracking on for a hot-path connection (FastRedis calls this on connect)."""
        with contextlib.suppress(OSError):
            await self._ensure()
        sub_id = self._sub_id
        if sub_id is None:
            return
        try:
            await conn.send(hiredis.pack_command(("CLIENT", "TRACKING", "on", "REDIRECT",
                                                  str(sub_id))))  # type: ignore[arg-type]
        except ResponseError as exc:  # (the subscriber went away meanwhile: re-armed later)
            log.warning("check cache: CLIENT TRACKING refused (%s): checks go to Redis", exc)
            return
        conn.tracking = sub_id

    async def _ensure(self) -> None:
        async with self._connecting:  # one subscriber, however many connections ask at once
            if self._sub_id is None and not self._closed:
                await self._subscribe()

    async def _subscribe(self) -> None:
        loop = asyncio.get_running_loop()
        parsed = urlparse(self._url)
        if parsed.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = unquote(parsed.path)
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in (parsed.hostname or "") else
                                 socket.AF_INET, socket.SOCK_STREAM)
            address = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            reader = hiredis.Reader()

            async def call(*args: str) -> Any:
                await loop.sock_sendall(sock, hiredis.pack_command(args))  # type: ignore[arg-type]
                while (reply := reader.gets()) is False:
                    data = await loop.sock_recv(sock, 65536)
                    if not data:
                        raise ConnectionError("redis closed the invalidation connection")
                    reader.feed(data)
                if isinstance(reply, hiredis.ReplyError):
                    raise ConnectionError(str(reply))
                return reply

            if parsed.password:
                await call("AUTH", unquote(parsed.username or "default"), unquote(parsed.password))
            sub_id = int(await call("CLIENT", "ID"))
            await call("SUBSCRIBE", CHANNEL)
        except BaseException:
            sock.close()
            raise
        poll = select.poll()
        poll.register(sock.fileno(), select.POLLIN)
        self._sock, self._reader, self._sub_id, self._poll = sock, reader, sub_id, poll
        loop.add_reader(sock.fileno(), self._drain)
