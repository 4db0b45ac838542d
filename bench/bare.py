"""The ceiling: a bare Starlette JSON endpoint served exactly like creditgate.

POST /bare reads and parses the JSON body (like /v1/check does) and answers a small JSON object,
so the number it gets is what the server + framework cost before any creditgate code runs.

POST /bare_redis does the same plus one EVALSHA of a one-line Lua script through redis-py, and
POST /bare_fast through creditgate's own pipelined client (app/hotstate/resp.py, how its Lua is
called), when BARE_REDIS_URL is set: the floor of any endpoint that must ask Redis once, as
/v1/check does.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.hotstate.resp import FastRedis, Script

SCRIPT = "return redis.call('HGET', KEYS[1], ARGV[1])"


async def bare(request: Request) -> Response:
    body = json.loads(await request.body() or b"{}")
    out = {"allowed": True, "reason": "ok", "account": body.get("account")}
    return Response(json.dumps(out), media_type="application/json")


async def bare_redis(request: Request) -> Response:
    body = json.loads(await request.body() or b"{}")
    value = await request.app.state.script(keys=["bench:bare"], args=[body.get("account", "")])
    out = {"allowed": True, "reason": "ok", "account": body.get("account"), "value": value}
    return Response(json.dumps(out), media_type="application/json")


async def bare_fast(request: Request) -> Response:
    """The same with creditgate's own pipelined client (app/hotstate/resp.py)."""
    body = json.loads(await request.body() or b"{}")
    value = await request.app.state.fast_script(keys=["bench:bare"], args=[body.get("account", "")])
    out = {"allowed": True, "reason": "ok", "account": body.get("account"), "value": value}
    return Response(json.dumps(out), media_type="application/json")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    url = os.environ.get("BARE_REDIS_URL")
    if not url:
        yield
        return
    client = aioredis.from_url(url, decode_responses=True)
    app.state.script = client.register_script(SCRIPT)
    fast = FastRedis(url)
    app.state.fast_script = Script(fast, SCRIPT)
    try:
        yield
    finally:
        await fast.aclose()
        await client.aclose()


def create_app() -> Starlette:
    return Starlette(routes=[Route("/bare", bare, methods=["POST"]),
                             Route("/bare_redis", bare_redis, methods=["POST"]),
                             Route("/bare_fast", bare_fast, methods=["POST"])],
                     lifespan=lifespan)


app = create_app()
