"""Pending (purchased) balances: not drawable until activated, activated once, refunds."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg

from app.ledger import service
from tests.conftest import Api


async def test_pending_balance_is_not_available_until_activated(api: Api, app: Any,
                                                                db: asyncpg.Connection) -> None:
    n = await api.setup()
    ctx = app.state.ctx
    account = await ctx.catalog.account(n["account"])
    balance_id = await service.create_pending(ctx, account, account.credit_type, products=None,
                                              expires_at=None, description="2,000 credits")
    assert (await api.check(n["account"], n["api"]))["reason"] == "no_eligible_balance"
    assert await api.available(n["account"]) == "0"
    results = await asyncio.gather(*(service.activate(ctx, balance_id, Decimal("20.00"))
                                     for _ in range(5)))
    assert sorted(results) == [False, False, False, False, True]
    assert await api.available(n["account"]) == "20.00"
    grants = await db.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE balance_id = $1 AND kind = 'grant'", balance_id)
    assert grants == 1
    assert await service.cancel_pending(ctx, balance_id) is False  # paid: stays granted
    assert (await api.call("GET", f"/v1/balances/{balance_id}"))["status"] == "active"


async def test_failed_payment_voids_the_pending_balance(api: Api, app: Any) -> None:
    n = await api.setup()
    ctx = app.state.ctx
    account = await ctx.catalog.account(n["account"])
    balance_id = await service.create_pending(ctx, account, account.credit_type, products=None,
                                              expires_at=None, description="declined")
    assert await service.cancel_pending(ctx, balance_id) is True
    assert (await api.call("GET", f"/v1/balances/{balance_id}"))["status"] == "voided"


async def test_refund_voids_the_unspent_part_and_records_the_spent_part_as_overage(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    n = await api.setup()
    ctx = app.state.ctx
    account = await ctx.catalog.account(n["account"])
    balance_id = await service.create_pending(ctx, account, account.credit_type, products=None,
                                              expires_at=None, description="bought")
    await service.activate(ctx, balance_id, Decimal("10.00"))
    await api.usage(n["account"], n["api"], "3.00")
    assert await service.refund(ctx, balance_id, 1000, "charge refunded") is True
    assert await service.refund(ctx, balance_id, 1000, "again") is False
    live = await api.live(n["account"])
    assert live["totals"] == [{"credit_type": n["credit_type"], "available": "0.00", "overage": "3.00"}]
    rows = await db.fetch(
        """SELECT kind, amount FROM ledger_entries WHERE op_key = $1 ORDER BY seq""", f"r:{balance_id}")
    assert [(r["kind"], str(r["amount"])) for r in rows] == [("void", "-7.00"), ("overage", "-3.00")]
