"""Auto-recharge that pays what the account owes (`pays_overage`): the recharge buys the gap to
`recharge_to` plus the overage, fixed before its first charge, and once paid the overage is
settled out of it (README: Auto-recharge)."""

from __future__ import annotations

from decimal import Decimal
from urllib.parse import parse_qsl

import asyncpg

from tests.recharge_helpers import (
    account_with_card,
    charged_intents,
    configure,
    events,
    recharges,
    run,
)
from tests.stripe_fake import FakeStripe, Shop


async def _totals(shop: Shop, account: str) -> tuple[str, str]:
    [total] = (await shop.api.live(account))["totals"]
    return total["available"], total["overage"]


async def test_a_recharge_that_pays_overage_buys_the_debt_too_and_settles_it(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    saved = await configure(shop, n, pays_overage=True)
    assert saved["pays_overage"] is True
    await shop.api.usage(n["account"], n["api"], "26.00")  # 20.00 drawn, 6.00 owed: crossed
    assert await _totals(shop, n["account"]) == ("0.00", "6.00")
    [pending] = await recharges(db, n["account"])
    assert (pending["credits"], pending["owed"]) == (Decimal("20.00"), None)  # not fixed yet

    assert await run(shop, db, n["account"]) == 1
    [create] = stripe_fake.creates()
    assert dict(parse_qsl(create.content.decode()))["amount"] == "2600"
    assert await _totals(shop, n["account"]) == ("20.00", "0.00")
    [done] = await recharges(db, n["account"])
    assert (done["status"], done["credits"], done["owed"]) == (
        "succeeded", Decimal("26.00"), Decimal("6.00"))
    [succeeded] = await events(db, "auto_recharge.succeeded", n["account"])
    assert (succeeded["credits"], succeeded["owed"], succeeded["price"], succeeded["balance"]) == (
        "26.00", "6.00", "26.00", "20.00")
    [settled] = await events(db, "overage.settled", n["account"])
    assert (settled["amount"], settled["reference"]) == ("6.00", f"purchase:{done['purchase_id']}")
    listed = await shop.api.call("GET", f"/v1/accounts/{n['account']}/auto-recharges")
    assert [(r["credits"], r["owed"]) for r in listed["data"]] == [("26.00", "6.00")]
    # the hot copy rebuilt from Postgres agrees
    await shop.ctx.redis.flushall()
    assert await _totals(shop, n["account"]) == ("20.00", "0.00")


async def test_without_it_the_debt_stays_and_the_recharge_buys_the_gap_only(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    assert (await configure(shop, n))["pays_overage"] is False
    await shop.api.usage(n["account"], n["api"], "26.00")
    await run(shop, db, n["account"])
    [create] = stripe_fake.creates()
    assert dict(parse_qsl(create.content.decode()))["amount"] == "2000"
    assert await _totals(shop, n["account"]) == ("20.00", "6.00")
    [done] = await recharges(db, n["account"])
    assert (done["credits"], done["owed"]) == (Decimal("20.00"), None)
    [succeeded] = await events(db, "auto_recharge.succeeded", n["account"])
    assert "owed" not in succeeded
    assert await events(db, "overage.settled", n["account"]) == []


async def test_the_debt_is_fixed_before_the_first_charge_and_a_retry_asks_the_same(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    await configure(shop, n, pays_overage=True)
    await shop.api.usage(n["account"], n["api"], "23.00")  # 3.00 owed
    stripe_fake.faults.extend([None, "lost", "lost", "lost"])  # charged, every answer lost
    await run(shop, db, n["account"])
    [row] = await recharges(db, n["account"])
    assert (row["status"], row["credits"], row["owed"]) == (
        "processing", Decimal("23.00"), Decimal("3.00"))
    await shop.api.usage(n["account"], n["api"], "2.00")  # 5.00 owed now
    await run(shop, db, n["account"])  # asked again: the same key, the same amount
    [row] = await recharges(db, n["account"])
    assert (row["status"], row["credits"], row["owed"]) == (
        "succeeded", Decimal("23.00"), Decimal("3.00"))
    amounts = {dict(parse_qsl(r.content.decode()))["amount"] for r in stripe_fake.creates()}
    assert amounts == {"2300"} and len(charged_intents(stripe_fake)) == 1
    # once paid the credits pay what is owed then (5.00), as any purchase that pays overage
    assert await _totals(shop, n["account"]) == ("18.00", "0.00")


async def test_nothing_owed_fixes_zero_and_charges_the_gap(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    await configure(shop, n, pays_overage=True)
    await shop.api.usage(n["account"], n["api"], "16.00")  # 4.00 left, nothing owed
    await run(shop, db, n["account"])
    [done] = await recharges(db, n["account"])
    assert (done["status"], done["credits"], done["owed"]) == (
        "succeeded", Decimal("16.00"), Decimal("0"))
    assert await _totals(shop, n["account"]) == ("20.00", "0.00")
    assert await events(db, "overage.settled", n["account"]) == []
