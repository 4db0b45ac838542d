"""Real-time balances as server-sent events (`GET /v1/accounts/{code}/balances/stream`).

A browser showing a customer its credits (with a customer token) or a vendor's dashboard opens
one stream per account and gets `event: balances` with the same JSON as `GET …/balances`: at
once, then each time it changes. A change is found by reading the account's hot state every
`stream_poll_ms` (one Redis script call per stream and tick) and comparing the answer with the
last one sent, so time-driven changes (a balance becoming effective or expiring, which write
nothing) are seen like writes. A comment line after `stream_heartbeat_s` of silence keeps
proxies from closing an idle stream.

The caller's credentials are checked again on every tick (from the key cache: no round trip
while cached), so a stream ends within a tick of its customer token expiring, and within the
key cache's bound of its key being revoked or its signing secret retired. A stream also ends
after `stream_max_s`, and when the process stops; `retry:` tells the browser's EventSource to
reconnect after RETRY_MS, which opens a fresh, re-authenticated stream. While Postgres or Redis
cannot answer, ticks are skipped and the heartbeat goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pydantic import Field
from starlette.responses import StreamingResponse

from app.entitlements import service
from app.errors import STORE_ERRORS, Problem
from app.http import authenticate
from app.schemas import Strict

if TYPE_CHECKING:
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


def _frame(body: bytes) -> bytes:
    return b"event: balances\ndata: " + body + b"\n\n"


async def balances_stream(call: Call) -> StreamingResponse:
    ctx, code, request = call.ctx, call.path("code"), call.request
    first = await service.live_balances(ctx, code)  # an unknown account: 404, no stream
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

    async def events() -> AsyncIterator[bytes]:
        last = first.__pydantic_serializer__.to_json(first)
        yield f"retry: {RETRY_MS}\n".encode() + _frame(last)  # one event with the first
        end = loop.time() + settings.stream_max_s
        beat = loop.time() + settings.stream_heartbeat_s
        while not closing.is_set() and loop.time() < end:
            try:
                await asyncio.wait_for(closing.wait(), tick_s)
                return  # the process is stopping
            except TimeoutError:
                pass
            if not await still_allowed():
                return
            try:
                now = await service.live_balances(ctx, code)
            except SKIPPED as exc:
                log.debug("balance stream of %s: tick skipped: %r", code, exc)
            else:
                body = now.__pydantic_serializer__.to_json(now)
                if body != last:
                    last = body
                    yield _frame(body)
                    beat = loop.time() + settings.stream_heartbeat_s
                    continue
            if loop.time() >= beat:
                yield b": keep-alive\n\n"
                beat = loop.time() + settings.stream_heartbeat_s

    return StreamingResponse(events(), media_type=MEDIA_TYPE,
                             headers={"cache-control": "no-store",
                                      "x-accel-buffering": "no"})  # nginx: do not buffer
