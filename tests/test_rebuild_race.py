"""A rebuild of a root's hot state that read Postgres before a change must not install after
the change invalidated the root (the give-backs' overage credits and the journal's stale-root
repair write Postgres, then invalidate)."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from tests.conftest import Api
from tests.procs import live_remaining


async def test_a_rebuild_under_way_cannot_install_what_an_invalidation_made_stale(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    n = await api.setup()
    balance = await api.grant(n["account"], "10.00")
    ctx = app.state.ctx
    account = await ctx.catalog.account(n["account"])
    await ctx.hot.invalidate(account.root_id)

    # a rebuild that stops between its Postgres read and its install
    original = ctx.loader._state
    read, resume = asyncio.Event(), asyncio.Event()

    async def paused(root_id: int, records: list[Any]) -> Any:
        state = await original(root_id, records)
        read.set()
        await resume.wait()
        return state

    ctx.loader._state = paused
    try:
        rebuild = asyncio.create_task(ctx.loader.ensure(account.root_id))
        await asyncio.wait_for(read.wait(), 10)
    finally:
        ctx.loader._state = original

    # meanwhile a change is written straight to Postgres, and the root invalidated
    await db.execute(
        """INSERT INTO ledger_entries (op_key, seq, account_id, balance_id, credit_type_id, kind,
                                       amount, description, created_at)
           SELECT $1, 0, b.account_id, b.id, b.credit_type_id, 'adjustment', 2.50, 'direct',
                  now()
           FROM balances b WHERE b.id = $2""", f"test:{uuid.uuid4().hex}", balance["id"])
    await ctx.hot.invalidate(account.root_id)
    resume.set()
    await asyncio.wait_for(rebuild, 10)

    # the paused rebuild's state (10.00) was refused; what is live is what Postgres holds
    assert live_remaining(await api.live(n["account"])) == {balance["id"]: Decimal("12.50")}
