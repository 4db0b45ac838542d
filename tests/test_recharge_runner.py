"""Auto-recharge end to end with Stripe faked: one crossing is one charge that closes the gap;
declines disable it; guards fail loudly; Stripe timeouts reuse the recharge's key."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from urllib.parse import parse_qsl

import asyncpg

from app.recharge import repository as repo
from app.recharge import service
from app.recharge.runner import run_once
from tests.recharge_helpers import (
    account_with_card,
    charged_intents,
    configure,
    events,
    recharges,
    run,
)
from tests.stripe_fake import FakeStripe, Outcome, Shop


async def test_crossing_charges_once_and_closes_the_gap(shop: Shop, stripe_fake: FakeStripe,
                                                        db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    saved = await configure(shop, n, products=[n["api"]], expires_in_days=30)
    assert saved["enabled"] and saved["threshold"] == "5.00" and saved["price_per_credit"] == "1"
    await shop.api.usage(n["account"], n["api"], "16.50")  # 3.50 left: crossed
    await shop.api.usage(n["account"], n["api"], "1.00")  # 2.50: one is in flight already
    [pending] = await recharges(db, n["account"])
    assert pending["status"] == "pending" and pending["credits"] == Decimal("16.50")

    assert await run(shop, db, n["account"]) == 1
    [create] = stripe_fake.creates()
    sent = dict(parse_qsl(create.content.decode()))
    assert sent["amount"] == "1650" and sent["off_session"] == "true"
    assert sent["payment_method"] == "pm_card_visa"
    assert create.headers["idempotency-key"] == f"auto-recharge-{pending['id']}-pi"
    # 2.50 + 16.50: the gap at the crossing is closed (the later 1.00 came out of it)
    assert await shop.api.available(n["account"]) == "19.00"
    [done] = await recharges(db, n["account"])
    assert done["status"] == "succeeded" and done["purchase_id"] is not None
    [succeeded] = await events(db, "auto_recharge.succeeded", n["account"])
    assert succeeded["credits"] == "16.50" and succeeded["price"] == "16.50"
    assert succeeded["balance"] == "19.00" and succeeded["trigger"] == "crossing"
    assert await run(shop, db, n["account"]) == 0 and len(stripe_fake.creates()) == 1
    listed = await shop.api.call("GET", f"/v1/accounts/{n['account']}/auto-recharges")
    assert [r["status"] for r in listed["data"]] == ["succeeded"]


async def test_decline_disables_it_with_both_events_and_grants_nothing(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    await configure(shop, n)
    stripe_fake.outcomes.append(Outcome(decline=("card_declined", "insufficient_funds")))
    await shop.api.usage(n["account"], n["api"], "16.00")
    await run(shop, db, n["account"])
    assert len(stripe_fake.creates()) == 1
    assert await shop.api.available(n["account"]) == "4.00"
    [failed_row] = await recharges(db, n["account"])
    assert failed_row["status"] == "failed" and failed_row["reason"] == "payment_failed"
    [failed] = await events(db, "auto_recharge.failed", n["account"])
    assert failed["reason"] == "payment_failed" and failed["decline_code"] == "insufficient_funds"
    [disabled] = await events(db, "auto_recharge.disabled", n["account"])
    assert "insufficient_funds" in disabled["reason"]
    config = await shop.api.call("GET", f"/v1/accounts/{n['account']}/auto-recharge/{n['credit_type']}")
    assert config["enabled"] is False and "insufficient_funds" in config["disabled_reason"]
    # disabled: more usage starts nothing, and the sweep leaves it alone
    await shop.api.usage(n["account"], n["api"], "1.00")
    assert len(await recharges(db, n["account"])) == 1


async def test_reenabling_below_the_threshold_charges_once_at_once(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    await configure(shop, n)
    stripe_fake.outcomes.append(Outcome(decline=("card_declined", "expired_card")))
    await shop.api.usage(n["account"], n["api"], "17.00")
    await run(shop, db, n["account"])
    assert (await shop.api.call("GET", f"/v1/accounts/{n['account']}/auto-recharge"))[
        "data"][0]["enabled"] is False

    saved = await configure(shop, n)  # the customer fixed the card
    assert saved["enabled"] is True and saved["disabled_reason"] is None
    await configure(shop, n)  # saved twice: still one in flight
    started = await recharges(db, n["account"])
    assert [r["status"] for r in started] == ["failed", "pending"]
    assert started[1]["trigger_key"].startswith("enable:") and started[1]["credits"] == Decimal("17.00")
    await run(shop, db, n["account"])
    assert len(stripe_fake.creates()) == 2
    assert await shop.api.available(n["account"]) == "20.00"
    [succeeded] = await events(db, "auto_recharge.succeeded", n["account"])
    assert succeeded["trigger"] == "enable" and succeeded["balance"] == "20.00"


async def test_stripe_timing_out_then_succeeding_is_one_charge_with_one_key(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    await configure(shop, n)
    await shop.api.usage(n["account"], n["api"], "15.00")
    # the customer read passes; Stripe charges but every answer is lost (the SDK retries too)
    stripe_fake.faults.extend([None, "lost", "lost", "lost"])
    await run(shop, db, n["account"])
    [row] = await recharges(db, n["account"])
    assert row["status"] == "processing" and row["purchase_id"] is not None
    assert await shop.api.available(n["account"]) == "5.00"  # not drawable before it is paid
    await run(shop, db, n["account"])  # later: asked again with the same key
    [row] = await recharges(db, n["account"])
    assert row["status"] == "succeeded"
    assert len(charged_intents(stripe_fake)) == 1
    keys = {r.headers["idempotency-key"] for r in stripe_fake.creates()}
    assert keys == {f"auto-recharge-{row['id']}-pi"} and len(stripe_fake.creates()) >= 2
    assert await shop.api.available(n["account"]) == "20.00"


async def test_daily_limit_reached_makes_no_charge_and_says_why(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    await configure(shop, n, max_per_day=1)
    await shop.api.usage(n["account"], n["api"], "16.00")
    await run(shop, db, n["account"])
    await shop.api.usage(n["account"], n["api"], "18.00")  # crossed again
    await run(shop, db, n["account"])
    assert len(stripe_fake.creates()) == 1
    assert [r["status"] for r in await recharges(db, n["account"])] == ["succeeded", "failed"]
    [failed] = await events(db, "auto_recharge.failed", n["account"])
    assert failed["reason"] == "daily_limit" and "max_per_day is 1" in failed["message"]
    assert await events(db, "auto_recharge.disabled", n["account"]) == []
    # the sweep does not retry a config the daily limit stopped today
    await run(shop, db, n["account"])
    assert len(await recharges(db, n["account"])) == 2


async def test_charge_under_the_minimum_is_not_made_and_says_why(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    await configure(shop, n, min_charge="20.00")
    await shop.api.usage(n["account"], n["api"], "15.00")
    await run(shop, db, n["account"])
    assert stripe_fake.creates() == []
    [failed] = await events(db, "auto_recharge.failed", n["account"])
    assert failed["reason"] == "below_min_charge" and "20.00" in failed["message"]


async def test_long_run_of_debits_charges_once_per_crossing_and_closes_every_gap(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake, balance="50.00")
    await configure(shop, n, threshold="10.00", recharge_to="50.00", max_per_day=1000)
    rng = random.Random(6)
    crossings = 0
    for _ in range(150):
        before = Decimal(await shop.api.available(n["account"]))
        amount = Decimal(rng.randint(50, 900)) / 100
        if amount > before:
            amount = before
        await shop.api.usage(n["account"], n["api"], f"{amount:.2f}")
        after = before - amount
        if before > Decimal("10.00") >= after:
            crossings += 1
            await run(shop, db, n["account"])
            assert await shop.api.available(n["account"]) == "50.00"  # the whole gap, at once
    rows = await recharges(db, n["account"])
    assert crossings >= 10
    assert len(rows) == crossings == len(stripe_fake.creates()) == len(charged_intents(stripe_fake))
    assert all(r["status"] == "succeeded" and r["available"] + r["credits"] == Decimal("50.00")
               for r in rows)


async def test_a_claim_left_by_a_dead_runner_is_taken_over_with_the_same_key(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    await configure(shop, n)
    await shop.api.usage(n["account"], n["api"], "15.00")
    [row] = await recharges(db, n["account"])
    # a runner claimed it and died before charging: processing, its lease not yet over
    await db.execute("UPDATE auto_recharges SET status = 'processing', "
                     "retry_after = now() + interval '1 minute' WHERE id = $1", row["id"])
    await shop.api.usage(n["account"], n["api"], "3.00")  # lower still: nothing new in flight
    assert len(await recharges(db, n["account"])) == 1
    await db.execute("UPDATE auto_recharges SET retry_after = now() + interval '1 hour' "
                     "WHERE status IN ('pending', 'processing') AND id <> $1", row["id"])
    assert await run_once(shop.ctx) == 0  # its lease is still running
    await run(shop, db, n["account"])  # the lease ran out
    assert [r["status"] for r in await recharges(db, n["account"])] == ["succeeded"]
    assert len(charged_intents(stripe_fake)) == 1
    assert await shop.api.available(n["account"]) == "17.00"  # 2.00 + the 15.00 of the gap


async def test_runners_racing_for_the_same_recharge_charge_once(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    await configure(shop, n)
    await shop.api.usage(n["account"], n["api"], "15.00")
    await run(shop, db, n["account"])
    await shop.api.usage(n["account"], n["api"], "16.00")
    await db.execute("UPDATE auto_recharges SET retry_after = now() + interval '1 hour' "
                     "WHERE status IN ('pending', 'processing')")
    [_, new] = await recharges(db, n["account"])
    await db.execute("UPDATE auto_recharges SET retry_after = now() - interval '1 second' "
                     "WHERE id = $1", new["id"])
    claimed = await asyncio.gather(*(run_once(shop.ctx) for _ in range(4)))
    assert sum(claimed) == 1
    assert len(charged_intents(stripe_fake)) == 2
    assert len(await events(db, "auto_recharge.succeeded", n["account"])) == 2
    # a late second runner working on the finished recharge changes nothing
    finished = await repo.recharge(db, new["id"])
    assert finished is not None and finished["status"] == "succeeded"
    await service.process(shop.ctx, finished)
    assert len(charged_intents(stripe_fake)) == 2
    assert [r["status"] for r in await recharges(db, n["account"])] == ["succeeded"] * 2
