"""Real-time balances as server-sent events (`GET /v1/accounts/{code}/balances/stream`).

A browser showing a customer its credits (with a customer token) or a vendor's dashboard opens
one stream per account and gets `event: balances` with the same JSON as `GET …/balances`: at
once, then each time it changes. A change is found by reading the account's hot state when
Redis says it changed, and every `stream_poll_ms` (one Redis script call per read): the same
state as last time, before the next instant a balance becomes effective or expires, builds
nothing; anything else is built and sent if its JSON differs from the last sent. So
time-driven changes (which write nothing) are seen like writes, within a tick.

The wake-up is the check cache's (app/hotstate/checkcache.py): each read declares the
account's hashes to Redis, which tracks them for this process and pushes an invalidation on
the next write to any of them (a debit from any process, a grant, a rebuild, a FLUSHALL);
the invalidation wakes the stream, whose next read arms the next one. A busy account's changes
are coalesced: a stream reads at most once every MIN_GAP_S after an event it sent. Without
the cache's subscriber (`CREDITGATE_CHECK_CACHE=0`, or Redis unreachable), or with
`CREDITGATE_STREAM_PUSH=0`, the ticks alone find changes. A comment line after
`stream_heartbeat_s` of silence keeps proxies from closing an idle stream.

The caller's credentials are checked again on every tick (from the key cache: no round trip
while cached), so a stream ends within a tick of its customer token expiring, and within the
key cache's bound of its key being revoked or its signing secret retired. A stream also ends
after `stream_max_s`, and within a tick of the process being told to stop; `retry:` tells the
browser's EventSource to reconnect after RETRY_MS, which opens a fresh, re-authenticated
stream. While Postgres or Redis cannot answer, ticks are skipped and the heartbeat goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field
from starlette.responses import StreamingResponse

from app.entitlements import service
from app.errors import STORE_ERRORS, Problem
from app.http import authenticate
from app.ledger.ops import now_ms
from app.ledger.service import account_ref
from app.schemas import Strict
from app.settings import Seconds

if TYPE_CHECKING:
    from app.context import AppContext
    from app.http import Call

log = logging.getLogger(__name__)
RETRY_MS = 2_000
MIN_GAP_S: Seconds = 0.1  # at most ten events a second per stream, however busy the account
MEDIA_TYPE = "text/event-stream"


class _Open:
    """How many streams this process holds open (GET /metrics)."""

    count = 0


OPEN = _Open()
# a tick that cannot read the balances is skipped (the account, the stores: all may come back)
SKIPPED: tuple[type[BaseException], ...] = (Problem, *STORE_ERRORS)


class StreamQuery(Strict):
    access_token: str | None = Field(
        default=None, description="a customer token, for a browser's EventSource (which cannot "
                                  "send an Authorization header); API keys are refused here")


@dataclass
class Sent:
    """What a stream sent last, and the hot state it was built from: until `turn` (a balance
    becoming effective or expiring) the same state builds the same answer, so a tick that
    reads it again builds nothing."""

    raw: list[Any] | None = None
    turn: int | None = None
    body: bytes = b""

    async def changed(self, ctx: AppContext, code: str, watched: bool = False) -> bytes | None:
        """The account's balances as JSON when they differ from what was sent last. `watched`:
        the read declares its keys, so that Redis tells this process when they change."""
        account = await account_ref(ctx, code)
        tracked = ctx.hot.keys.stream_reads(account.root_id, account.id) if watched else ()
        raw, at = await service.read_hot(ctx, account, tracked), now_ms()
        if raw == self.raw and (self.turn is None or at < self.turn):
            return None
        out = await service.balances_out(ctx, code, raw, at)
        self.raw, self.turn = raw, service.next_turn(raw, at)
        body = out.__pydantic_serializer__.to_json(out)
        if body == self.body:
            return None
        self.body = body
        return body


def _frame(body: bytes) -> bytes:
    return b"event: balances\ndata: " + body + b"\n\n"


async def balances_stream(call: Call) -> StreamingResponse:
    ctx, code, request = call.ctx, call.path("code"), call.request
    settings = ctx.settings
    loop = asyncio.get_running_loop()
    scopes = frozenset({call.principal.scope}) if call.principal is not None else frozenset()
    tick_s = settings.stream_poll_ms / 1000
    closing = ctx.closing

    async def still_allowed() -> bool:
        try:
            await authenticate(ctx, request, scopes, token_in_query=True)
        except Problem:
            return False
        except STORE_ERRORS:
            return True  # (a key the cache forgot cannot be checked now: the next tick will)
        return True

    # woken by Redis's invalidations when the account's hot state changes (the check cache's
    # subscriber), else at the next tick; without a subscriber, ticks alone
    cache, wake = ctx.hot.cache if settings.stream_push else None, asyncio.Event()
    root_id = (await account_ref(ctx, code)).root_id  # an unknown account: 404, no stream
    sent = Sent()
    first = await sent.changed(ctx, code, watched=cache is not None and cache.armed)
    assert first is not None

    async def events() -> AsyncIterator[bytes]:
        yield f"retry: {RETRY_MS}\n".encode() + _frame(first)  # one event with the first
        end = loop.time() + settings.stream_max_s
        beat = loop.time() + settings.stream_heartbeat_s
        ready = loop.time()  # no read before: MIN_GAP_S after the last event sent
        if cache is not None:  # woken at once: a change since the first read is not missed
            cache.wake_on(root_id, wake)
            wake.set()
        OPEN.count += 1
        try:
            while loop.time() < end:
                # the tick sets the same event: one wait, whichever comes first
                tick = loop.call_later(tick_s, wake.set)
                await wake.wait()
                tick.cancel()
                if (gap := ready - loop.time()) > 0:
                    await asyncio.sleep(gap)  # a busy account: changes coalesced
                if closing.is_set() or not await still_allowed():
                    return  # the process is stopping, or the caller may no longer read
                wake.clear()  # before the read: a change after it wakes the next wait
                try:
                    body = await sent.changed(ctx, code, watched=cache is not None and cache.armed)
                except SKIPPED as exc:
                    log.debug("balance stream of %s: tick skipped: %r", code, exc)
                    body = None
                if body is not None:
                    yield _frame(body)
                    beat, ready = (loop.time() + settings.stream_heartbeat_s,
                                   loop.time() + MIN_GAP_S)
                elif loop.time() >= beat:
                    yield b": keep-alive\n\n"
                    beat = loop.time() + settings.stream_heartbeat_s
        finally:
            OPEN.count -= 1
            if cache is not None:
                cache.stop_waking(root_id, wake)

    return StreamingResponse(events(), media_type=MEDIA_TYPE,
                             headers={"cache-control": "no-store",
                                      "x-accel-buffering": "no"})  # nginx: do not buffer
