"""Stripe slow, down or answering into the void, and our process dying mid-purchase: a
purchase is never granted twice and never lost."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from app.ledger import service as ledger
from app.purchases import repository as purchases_repo
from app.purchases import service
from tests.stripe_fake import FakeStripe, Outcome, Shop, event, outbox


async def _grants(db: asyncpg.Connection, balance_id: int) -> int:
    return int(await db.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE balance_id = $1 AND kind = 'grant'", balance_id))


def _keys(fake: FakeStripe) -> list[str]:
    return [r.headers["idempotency-key"] for r in fake.creates()]


async def test_a_timeout_is_retried_with_the_same_idempotency_key(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    # Stripe charges, but the answer is lost; the SDK asks again with the same key
    stripe_fake.faults.extend([None, "lost"])  # the customer read passes
    bought = await shop.buy(n["account"], 201)
    assert bought["status"] == "paid"
    keys = _keys(stripe_fake)
    assert keys == [f"purchase-{bought['id']}-pi"] * 2
    assert len(stripe_fake.intents) == 1  # the retry got the first answer again
    assert await shop.api.available(n["account"]) == "20.00"
    assert await _grants(db, bought["balance_id"]) == 1


async def test_a_5xx_is_retried_with_the_same_idempotency_key(
        shop: Shop, stripe_fake: FakeStripe) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.faults.extend([None, "500"])
    bought = await shop.buy(n["account"], 201)
    assert bought["status"] == "paid" and len(set(_keys(stripe_fake))) == 1
    assert len(_keys(stripe_fake)) == 2 and len(stripe_fake.intents) == 1


async def test_stripe_down_leaves_the_purchase_pending_and_the_reconciler_settles_it(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.faults.extend([None, "down", "down", "down"])
    pending = await shop.buy(n["account"], 202)
    assert pending["status"] == "pending" and pending["stripe"]["payment_intent"] is None
    assert stripe_fake.intents == {}
    assert await shop.api.available(n["account"]) == "0"
    row = await db.fetchrow("SELECT last_error FROM purchases WHERE id = $1", pending["id"])
    assert "APIConnectionError" in row["last_error"]

    # Stripe is back: the reconciler re-sends the create, with the same key
    assert await shop.reconcile(db, pending["id"]) == 1
    purchase = await shop.purchase(n["account"], pending["id"])
    assert purchase["status"] == "paid"
    assert _keys(stripe_fake) == [f"purchase-{pending['id']}-pi"] * 4
    assert await shop.api.available(n["account"]) == "20.00"
    assert await _grants(db, pending["balance_id"]) == 1


async def test_a_charge_whose_every_answer_was_lost_is_found_and_granted_once(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.faults.extend([None, "lost", "lost", "lost"])
    pending = await shop.buy(n["account"], 202)
    assert pending["stripe"]["payment_intent"] is None
    [intent] = stripe_fake.intents.values()  # Stripe did charge
    assert intent["status"] == "succeeded"
    assert await shop.api.available(n["account"]) == "0"

    # the webhook may come first or the reconciler: both settle the same purchase once
    assert (await shop.deliver(event("payment_intent.succeeded", intent))).status_code == 200
    assert await shop.reconcile(db, pending["id"]) == 0  # settled: nothing due
    purchase = await shop.purchase(n["account"], pending["id"])
    assert purchase["status"] == "paid" and purchase["stripe"]["payment_intent"] == intent["id"]
    assert len(stripe_fake.intents) == 1
    assert await _grants(db, pending["balance_id"]) == 1


async def test_killed_between_stripes_success_and_our_grant(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    n = await shop.customer_account(stripe_fake)
    real_activate = ledger.activate

    async def killed(ctx: Any, balance_id: int, amount: Decimal) -> bool:
        raise RuntimeError("process killed")

    monkeypatch.setattr(ledger, "activate", killed)
    key = uuid.uuid4().hex
    crashed = await shop.client.post(
        f"/v1/accounts/{n['account']}/purchases", headers={**shop.api.admin, "Idempotency-Key": key},
        json={"credits": "20.00", "price": "20.00", "currency": "usd", "expires_in": "P1Y"})
    assert crashed.status_code == 500
    monkeypatch.setattr(ledger, "activate", real_activate)
    row = await db.fetchrow("SELECT * FROM purchases WHERE request_key = $1", key)
    assert row["status"] == "granting" and row["payment_intent_id"]
    assert await shop.api.available(n["account"]) == "0"

    # the reconciler finishes the grant; then the webhook and a client retry change nothing
    assert await shop.reconcile(db, row["id"]) == 1
    assert await shop.api.available(n["account"]) == "20.00"
    intent = stripe_fake.intents[row["payment_intent_id"]]
    assert (await shop.deliver(event("payment_intent.succeeded", intent))).status_code == 200
    retried = await shop.buy(n["account"], 201, key=key)
    assert retried["id"] == row["id"] and retried["status"] == "paid"
    assert len(stripe_fake.creates()) == 1
    assert await shop.api.available(n["account"]) == "20.00"
    assert await _grants(db, row["balance_id"]) == 1
    assert len(await outbox(db, "payment.succeeded", row["id"])) == 1


async def test_killed_after_the_grant_before_the_purchase_was_marked_paid(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    n = await shop.customer_account(stripe_fake)
    real_mark_paid = purchases_repo.mark_paid

    async def killed(conn: Any, purchase_id: int) -> bool:
        raise RuntimeError("process killed")

    monkeypatch.setattr(purchases_repo, "mark_paid", killed)
    key = uuid.uuid4().hex
    crashed = await shop.client.post(
        f"/v1/accounts/{n['account']}/purchases", headers={**shop.api.admin, "Idempotency-Key": key},
        json={"credits": "20.00", "price": "20.00", "currency": "usd", "expires_in": "P1Y"})
    assert crashed.status_code == 500
    monkeypatch.setattr(purchases_repo, "mark_paid", real_mark_paid)
    row = await db.fetchrow("SELECT * FROM purchases WHERE request_key = $1", key)
    assert row["status"] == "granting"
    assert await shop.api.available(n["account"]) == "20.00"  # the grant itself is committed

    assert await shop.reconcile(db, row["id"]) == 1
    assert (await shop.purchase(n["account"], row["id"]))["status"] == "paid"
    assert await _grants(db, row["balance_id"]) == 1
    assert len(await outbox(db, "payment.succeeded", row["id"])) == 1


async def test_concurrent_settlers_grant_once(shop: Shop, stripe_fake: FakeStripe,
                                             db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.outcomes.append(Outcome("processing"))
    pending = await shop.buy(n["account"], 202)
    intent = stripe_fake.set_status(pending["stripe"]["payment_intent"], "succeeded")
    row = await purchases_repo.purchase(shop.ctx.pool, pending["id"])
    assert row is not None
    deliveries = [shop.deliver(event("payment_intent.succeeded", intent)) for _ in range(3)]
    advances = [service.advance(shop.ctx, row) for _ in range(3)]
    responses = await asyncio.gather(*deliveries)
    await asyncio.gather(*advances)
    assert [r.status_code for r in responses] == [200] * 3
    assert await _grants(db, pending["balance_id"]) == 1
    assert len(await outbox(db, "payment.succeeded", pending["id"])) == 1
    assert await shop.api.available(n["account"]) == "20.00"


async def test_a_create_too_old_to_resend_is_searched_for(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.faults.extend([None, "lost", "lost", "lost"])
    charged = await shop.buy(n["account"], 202)
    stripe_fake.faults.extend([None, "down", "down", "down"])
    never_sent = await shop.buy(n["account"], 202)
    await db.execute("UPDATE purchases SET created_at = now() - interval '2 days' "
                     "WHERE id = ANY($1::int8[])", [charged["id"], never_sent["id"]])
    creates = len(stripe_fake.creates())

    # past Stripe's 24 h key memory a re-send could charge twice: search by metadata instead
    await shop.reconcile(db, charged["id"])
    await shop.reconcile(db, never_sent["id"])
    assert len(stripe_fake.creates()) == creates
    assert len(stripe_fake.seen("GET", "/v1/payment_intents/search")) == 2
    assert (await shop.purchase(n["account"], charged["id"]))["status"] == "paid"
    lost = await shop.purchase(n["account"], never_sent["id"])
    assert lost["status"] == "failed" and lost["failure"]["code"] == "stripe_unreachable"
    assert await shop.api.available(n["account"]) == "20.00"


async def test_a_payment_left_waiting_for_the_customer_is_cancelled_after_a_day(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.outcomes.append(Outcome("requires_action"))
    pending = await shop.buy(n["account"], 202)
    assert await shop.reconcile(db, pending["id"]) == 1  # still young: keeps waiting
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "pending"

    await db.execute("UPDATE purchases SET created_at = now() - interval '25 hours' WHERE id = $1",
                     pending["id"])
    await shop.reconcile(db, pending["id"])
    purchase = await shop.purchase(n["account"], pending["id"])
    assert purchase["status"] == "failed"
    assert purchase["failure"]["code"] == "authentication_abandoned"
    assert stripe_fake.intents[pending["stripe"]["payment_intent"]]["status"] == "canceled"


async def test_a_missing_intent_is_never_read_as_a_failed_payment(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.outcomes.append(Outcome("processing"))
    pending = await shop.buy(n["account"], 202)
    del stripe_fake.intents[pending["stripe"]["payment_intent"]]  # e.g. another Stripe account's key
    await shop.reconcile(db, pending["id"])
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "pending"
    row = await db.fetchrow("SELECT last_error FROM purchases WHERE id = $1", pending["id"])
    assert "refused to show" in row["last_error"]
    await db.execute("UPDATE purchases SET check_after = now() + interval '1 day' WHERE id = $1",
                     pending["id"])
