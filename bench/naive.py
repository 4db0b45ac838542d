"""The naive baseline: debit a balance with one Postgres UPDATE per request.

POST /debit {"account": <id>, "amount": <int>} runs
    UPDATE naive_balances SET remaining = remaining - $1 WHERE id = $2 RETURNING remaining
in its own transaction (autocommit; synchronous_commit as the server has it, on) and answers
only after the commit, like creditgate answers a usage event only after its journal commit.
Served by the same granian settings; pool size as creditgate's default (10).
Needs NAIVE_DATABASE_URL; run.py creates and fills the table.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

POOL_SIZE = int(os.environ.get("NAIVE_POOL_SIZE", "10"))
# asyncpg resets a connection (one more round trip) on every release by default; creditgate's
# pool skips that (app/db.py: LeanConnection), so the naive baseline does too, for a fair
# comparison (NAIVE_POOL_RESET=1 restores asyncpg's default).
POOL_RESET = os.environ.get("NAIVE_POOL_RESET", "0") != "0"


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None
DEBIT = "UPDATE naive_balances SET remaining = remaining - $1 WHERE id = $2 RETURNING remaining"
SCHEMA = """CREATE TABLE IF NOT EXISTS naive_balances (
    id integer PRIMARY KEY, remaining bigint NOT NULL)"""


async def debit(request: Request) -> Response:
    body = json.loads(await request.body())
    pool: asyncpg.Pool = request.app.state.pool
    remaining = await pool.fetchval(DEBIT, int(body["amount"]), int(body["account"]))
    if remaining is None:
        return Response('{"error": "unknown account"}', status_code=404,
                        media_type="application/json")
    return Response(json.dumps({"status": "accepted", "remaining": remaining}),
                    media_type="application/json")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(os.environ["NAIVE_DATABASE_URL"], min_size=POOL_SIZE,
                                     max_size=POOL_SIZE, reset=None if POOL_RESET else _no_reset)
    assert pool is not None
    app.state.pool = pool
    try:
        yield
    finally:
        await pool.close()


def create_app() -> Starlette:
    return Starlette(routes=[Route("/debit", debit, methods=["POST"])], lifespan=lifespan)
