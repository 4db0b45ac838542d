"""Balances that fall under the threshold without a crossing (a credit expired, a rebuild found
them low) are recharged by the sweep; a void is recharged once, whichever path sees it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from app.recharge import service
from tests.recharge_helpers import account_with_card, charged_intents, configure, recharges, run
from tests.stripe_fake import FakeStripe, Shop
from tests.test_recharge_triggers import configure as configure_in_postgres


async def _sweep_all(shop: Shop) -> None:
    cursor = await service.sweep(shop.ctx)
    while cursor != (0, 0):
        cursor = await service.sweep(shop.ctx, cursor)


async def test_credit_expiring_without_traffic_is_recharged_by_the_sweep(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake, balance="2.00")
    soon = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat().replace("+00:00", "Z")
    soon_id = (await shop.api.grant(n["account"], "10.00", expires_at=soon))["id"]
    await configure(shop, n)  # 12.00: above, nothing starts
    await _sweep_all(shop)
    assert await recharges(db, n["account"]) == []
    await asyncio.sleep(1.6)  # the 10.00 is no longer drawable; no debit crossed anything
    await _sweep_all(shop)
    await _sweep_all(shop)  # one per config: a second pass starts nothing more
    [row] = await recharges(db, n["account"])
    # the sweep, or the expiry entry if a worker wrote it first (its op crosses the watch)
    assert row["trigger_key"].startswith(("sweep:", f"x:x:{soon_id}:"))
    assert row["available"] == Decimal("2.00") and row["credits"] == Decimal("18.00")
    await run(shop, db, n["account"])
    assert len(charged_intents(stripe_fake)) == 1
    assert await shop.api.available(n["account"]) == "20.00"
    await _sweep_all(shop)
    assert len(await recharges(db, n["account"])) == 1


async def test_rebuild_that_finds_the_balance_low_is_recharged_by_the_sweep(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake, balance="4.00")
    # already below when the watch is installed: it is armed disarmed, no crossing will come
    await configure_in_postgres(db, _App(shop), n["account"],
                                n["credit_type"], "5.00", "20.00")
    await shop.api.usage(n["account"], n["api"], "1.00")
    assert await recharges(db, n["account"]) == []
    await _sweep_all(shop)
    [row] = await recharges(db, n["account"])
    assert row["trigger_key"].startswith("sweep:") and row["credits"] == Decimal("17.00")
    await run(shop, db, n["account"])
    assert await shop.api.available(n["account"]) == "20.00"


async def test_voided_grant_is_recharged_once(shop: Shop, stripe_fake: FakeStripe,
                                             db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake, balance="3.00")
    voided = await shop.api.grant(n["account"], "7.00")
    await configure(shop, n)
    await shop.api.call("POST", f"/v1/balances/{voided['id']}/void", json={})
    await _sweep_all(shop)
    [row] = await recharges(db, n["account"])
    assert row["available"] == Decimal("3.00") and row["credits"] == Decimal("17.00")
    await run(shop, db, n["account"])
    assert len(charged_intents(stripe_fake)) == 1
    assert await shop.api.available(n["account"]) == "20.00"


class _App:
    """What `configure_in_postgres` needs of an app: its state's context."""

    def __init__(self, shop: Shop) -> None:
        self.state = type("State", (), {"ctx": shop.ctx})()
