"""The hot path's half of auto-recharge: a crossing of the recharge threshold by a committed
debit creates exactly one pending recharge, sized to close the gap, never two in flight."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from app.hotstate.keys import Keys
from app.settings import Settings
from tests.conftest import Api, now_iso


async def configure(db: asyncpg.Connection, app: Any, account: str, credit_type: str,
                    threshold: str, recharge_to: str) -> None:
    """Store a recharge config and tell the hot state (the config API comes with issue 6's
    runner; this sets the same two things directly)."""
    ids = await db.fetchrow(
        """SELECT a.id, a.root_id, ct.id AS ct FROM accounts a, credit_types ct
           WHERE a.code = $1 AND ct.code = $2""", account, credit_type)
    await db.execute(
        """INSERT INTO auto_recharge_configs (account_id, credit_type_id, threshold, recharge_to,
                                              price_per_credit, currency)
           VALUES ($1, $2, $3, $4, 1, 'usd')""", ids["id"], ids["ct"], Decimal(threshold),
        Decimal(recharge_to))
    ctx = app.state.ctx
    await ctx.hot.invalidate(ids["root_id"])  # the rebuild reads the new watch from Postgres


async def recharges(db: asyncpg.Connection, account: str) -> list[tuple[str, str, str]]:
    rows = await db.fetch(
        """SELECT r.status, r.available, r.credits FROM auto_recharges r
           JOIN accounts a ON a.id = r.account_id WHERE a.code = $1 ORDER BY r.id""", account)
    return [(r["status"], str(r["available"]), str(r["credits"])) for r in rows]


async def test_crossing_starts_one_recharge_sized_to_close_the_gap(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    n = await api.setup()
    await api.grant(n["account"], "20.00")
    await configure(db, app, n["account"], n["credit_type"], "5.00", "20.00")
    await api.usage(n["account"], n["api"], "10.00")  # 10.00 left: above
    assert await recharges(db, n["account"]) == []
    await api.usage(n["account"], n["api"], "6.50")  # 3.50 left: crossed
    await api.usage(n["account"], n["api"], "1.00")  # still below, one already in flight
    assert await recharges(db, n["account"]) == [("pending", "3.50", "16.50")]


async def test_concurrent_debits_crossing_at_once_start_exactly_one(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    n = await api.setup()
    await api.grant(n["account"], "10.00")
    await configure(db, app, n["account"], n["credit_type"], "5.00", "10.00")
    events = [{"uid": uuid.uuid4().hex, "account": n["account"], "product": n["api"],
               "amount": "0.25", "timestamp": now_iso()} for _ in range(40)]
    await asyncio.gather(*(api.call("POST", "/v1/usage", scope="runtime", json=e) for e in events))
    assert len(await recharges(db, n["account"])) == 1


async def test_a_rebuild_below_the_threshold_starts_nothing_by_itself(
        api: Api, app: Any, db: asyncpg.Connection, settings: Settings) -> None:
    n = await api.setup()
    await api.grant(n["account"], "4.00")
    await configure(db, app, n["account"], n["credit_type"], "5.00", "10.00")
    root = await db.fetchval("SELECT root_id FROM accounts WHERE code = $1", n["account"])
    await app.state.ctx.redis.delete(Keys(settings.redis_prefix).root(root))
    await api.usage(n["account"], n["api"], "1.00")
    # already below when the watch was installed: the no-traffic sweep handles it, not a crossing
    assert await recharges(db, n["account"]) == []
