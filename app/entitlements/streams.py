"""Real-time balances as server-sent events (`GET /v1/accounts/{code}/balances/stream`).

A browser showing a customer its credits (with a customer token) or a vendor's dashboard opens
one stream per account and gets `event: balances` with the same JSON as `GET …/balances`: at
once, then each time it changes. A change is found by reading the account's hot state every
`stream_poll_ms` (one Redis script call per stream and tick): the same state as last time,
before the next instant a balance becomes effective or expires, builds nothing; anything else
is built and sent if its JSON differs from the last sent. So time-driven changes (which write
nothing) are seen like writes. A comment line after `stream_heartbeat_s` of silence keeps
proxies from closing an idle stream.

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

if TYPE_CHECKING:
    from app.context import AppContext
    from app.http import Call

log = logging.getLogger(__name__)
RETRY_MS = 2_000
MEDIA_TYPE = "text/event-stream"
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

    async def changed(self, ctx: AppContext, code: str) -> bytes | None:
        """The account's balances as JSON when they differ from what was sent last."""
        raw, at = await service.read_hot(ctx, await account_ref(ctx, code)), now_ms()
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

    sent = Sent()
    first = await sent.changed(ctx, code)  # an unknown account: 404, no stream
    assert first is not None

    async def events() -> AsyncIterator[bytes]:
        yield f"retry: {RETRY_MS}\n".encode() + _frame(first)  # one event with the first
        end = loop.time() + settings.stream_max_s
        beat = loop.time() + settings.stream_heartbeat_s
        while loop.time() < end:
            await asyncio.sleep(tick_s)
            if closing.is_set() or not await still_allowed():
                return  # the process is stopping, or the caller may no longer read
            try:
                body = await sent.changed(ctx, code)
            except SKIPPED as exc:
                log.debug("balance stream of %s: tick skipped: %r", code, exc)
                body = None
            if body is not None:
                yield _frame(body)
                beat = loop.time() + settings.stream_heartbeat_s
            elif loop.time() >= beat:
                yield b": keep-alive\n\n"
                beat = loop.time() + settings.stream_heartbeat_s

    return StreamingResponse(events(), media_type=MEDIA_TYPE,
                             headers={"cache-control": "no-store",
                                      "x-accel-buffering": "no"})  # nginx: do not buffer
