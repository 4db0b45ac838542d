"""Stripe's webhook: verified, stored once, handled in any order and on replay."""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from tests.stripe_fake import FakeStripe, Outcome, Shop, event, outbox


async def _pending(shop: Shop, fake: FakeStripe, status: str = "processing",
                   **body: Any) -> tuple[dict[str, str], dict[str, Any]]:
    n = await shop.customer_account(fake)
    fake.outcomes.append(Outcome(status))
    return n, await shop.buy(n["account"], 202, **body)


async def _grants(db: asyncpg.Connection, balance_id: int) -> int:
    return int(await db.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE balance_id = $1 AND kind = 'grant'", balance_id))


async def _stored(db: asyncpg.Connection, event_id: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM stripe_events WHERE id = $1", event_id)


async def test_a_bad_signature_is_a_400_and_nothing_is_stored(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n, pending = await _pending(shop, stripe_fake)
    intent = stripe_fake.set_status(pending["stripe"]["payment_intent"], "succeeded")
    evt = event("payment_intent.succeeded", intent)
    wrong_secret = await shop.deliver(evt, secret="whsec_someone_else")
    no_header = await shop.client.post("/v1/stripe/webhook", json=evt)
    for response in (wrong_secret, no_header):
        assert response.status_code == 400, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["field"] == "Stripe-Signature"
        assert response.json()["code"] == "invalid_signature"
    assert await _stored(db, evt["id"]) is None
    assert await shop.api.available(n["account"]) == "0"


async def test_an_expired_signature_is_rejected(shop: Shop, stripe_fake: FakeStripe,
                                                db: asyncpg.Connection) -> None:
    n, pending = await _pending(shop, stripe_fake)
    intent = stripe_fake.set_status(pending["stripe"]["payment_intent"], "succeeded")
    evt = event("payment_intent.succeeded", intent)
    expired = await shop.deliver(evt, timestamp=int(time.time()) - 301)
    assert expired.status_code == 400 and "tolerance" in expired.json()["detail"]
    assert await _stored(db, evt["id"]) is None
    recent = await shop.deliver(evt, timestamp=int(time.time()) - 250)
    assert recent.status_code == 200, recent.text
    assert await shop.api.available(n["account"]) == "20.00"


async def test_a_duplicate_event_is_acknowledged_and_applied_once(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n, pending = await _pending(shop, stripe_fake)
    intent = stripe_fake.set_status(pending["stripe"]["payment_intent"], "succeeded")
    evt = event("payment_intent.succeeded", intent)
    first = await shop.deliver(evt)
    assert first.status_code == 200
    assert first.json() == {"received": True, "duplicate": False,
                            "outcome": f"purchase {pending['id']}: pending -> paid"}
    again = await shop.deliver(evt)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    # Stripe may also send the same news under another event id
    assert (await shop.deliver(event("payment_intent.succeeded", intent))).status_code == 200
    assert await shop.api.available(n["account"]) == "20.00"
    assert await _grants(db, pending["balance_id"]) == 1
    assert len(await outbox(db, "payment.succeeded", pending["id"])) == 1
    stored = await _stored(db, evt["id"])
    assert stored is not None and stored["handled_at"] is not None


async def test_unknown_types_and_other_systems_events_get_200(shop: Shop,
                                                              stripe_fake: FakeStripe) -> None:
    unknown = await shop.deliver(event("customer.updated", {"id": "cus_x", "object": "customer"}))
    assert unknown.status_code == 200 and unknown.json()["outcome"] == "ignored"
    foreign = {"id": "pi_not_ours", "object": "payment_intent", "status": "succeeded",
               "amount": 100, "currency": "usd", "metadata": {}}
    response = await shop.deliver(event("payment_intent.succeeded", foreign))
    assert response.status_code == 200 and response.json()["outcome"] == "not ours"


async def test_payment_failed_after_succeeded_never_voids_the_grant(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n, pending = await _pending(shop, stripe_fake)
    intent_id = pending["stripe"]["payment_intent"]
    failed_snapshot = {**stripe_fake.intents[intent_id], "status": "requires_payment_method",
                       "last_payment_error": {"code": "card_declined", "decline_code": "do_not_honor"}}
    succeeded = stripe_fake.set_status(intent_id, "succeeded")
    assert (await shop.deliver(event("payment_intent.succeeded", succeeded))).status_code == 200
    late = await shop.deliver(event("payment_intent.payment_failed", failed_snapshot))
    assert late.status_code == 200 and late.json()["outcome"].endswith("paid -> paid")
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "paid"
    assert await shop.api.available(n["account"]) == "20.00"
    assert await outbox(db, "payment.failed", pending["id"]) == []
    assert stripe_fake.seen("POST", f"/v1/payment_intents/{intent_id}/cancel") == []


async def test_a_stale_failure_of_an_intent_that_since_succeeded_grants(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    """Events can arrive in any order: the failure of a first attempt, delivered after the
    customer's retry succeeded, must not void anything. Cancelling first finds that out."""
    n, pending = await _pending(shop, stripe_fake, "requires_action")
    intent_id = pending["stripe"]["payment_intent"]
    failed_snapshot = {**stripe_fake.intents[intent_id], "status": "requires_payment_method",
                       "last_payment_error": {"code": "payment_intent_authentication_failure"}}
    stripe_fake.set_status(intent_id, "succeeded")
    response = await shop.deliver(event("payment_intent.payment_failed", failed_snapshot))
    assert response.status_code == 200, response.text
    assert len(stripe_fake.seen("POST", f"/v1/payment_intents/{intent_id}/cancel")) == 1
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "paid"
    assert await shop.api.available(n["account"]) == "20.00"
    assert await outbox(db, "payment.failed", pending["id"]) == []


async def test_success_reported_before_our_create_call_returns_grants_once(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    deliveries: list[int] = []

    async def webhook_first(intent: dict[str, Any]) -> None:
        deliveries.append((await shop.deliver(event("payment_intent.succeeded", intent))).status_code)

    stripe_fake.during_create = webhook_first
    bought = await shop.buy(n["account"], 201)
    assert deliveries == [200]
    assert bought["status"] == "paid"
    assert await shop.api.available(n["account"]) == "20.00"
    assert await _grants(db, bought["balance_id"]) == 1
    assert len(await outbox(db, "payment.succeeded", bought["id"])) == 1


async def test_a_canceled_intent_fails_the_purchase(shop: Shop, stripe_fake: FakeStripe,
                                                   db: asyncpg.Connection) -> None:
    n, pending = await _pending(shop, stripe_fake)
    canceled = stripe_fake.set_status(pending["stripe"]["payment_intent"], "canceled",
                                      cancellation_reason="fraudulent")
    assert (await shop.deliver(event("payment_intent.canceled", canceled))).status_code == 200
    purchase = await shop.purchase(n["account"], pending["id"])
    assert purchase["status"] == "failed" and purchase["failure"]["code"] == "fraudulent"
    assert (await shop.api.call("GET", f"/v1/balances/{pending['balance_id']}"))["status"] == "voided"
    assert len(await outbox(db, "payment.failed", pending["id"])) == 1
    # success can no longer come for a canceled intent; if a snapshot says so, nothing changes
    late = await shop.deliver(event("payment_intent.succeeded", {**canceled, "status": "succeeded"}))
    assert late.status_code == 200
    assert await shop.api.available(n["account"]) == "0"


async def test_a_refund_voids_the_unspent_credits_and_the_spent_become_overage(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, credits="10.00", price="10.00")
    await shop.api.usage(n["account"], n["api"], "3.00")
    charge = stripe_fake.charge(bought["stripe"]["payment_intent"])
    response = await shop.deliver(event("charge.refunded", charge))
    assert response.status_code == 200, response.text
    purchase = await shop.purchase(n["account"], bought["id"])
    assert purchase["status"] == "refunded" and purchase["amount_refunded"] == "10.00"
    live = await shop.api.live(n["account"])
    assert live["totals"] == [{"credit_type": n["credit_type"], "available": "0.00",
                               "overage": "3.00"}]
    voided = await db.fetch(
        "SELECT payload::text AS p FROM webhook_events WHERE type = 'credits.voided' "
        "AND (payload->'data'->>'balance_id')::int8 = $1", bought["balance_id"])
    assert len(voided) == 1 and '"reason": "refund"' in voided[0]["p"]
    # the same refund reported again changes nothing
    assert (await shop.deliver(event("charge.refunded", charge))).status_code == 200
    assert (await shop.api.live(n["account"]))["totals"] == live["totals"]


async def test_a_refund_reported_before_the_success_grants_then_voids(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n, pending = await _pending(shop, stripe_fake)
    intent_id = pending["stripe"]["payment_intent"]
    succeeded = stripe_fake.set_status(intent_id, "succeeded")
    refunded = await shop.deliver(event("charge.refunded", stripe_fake.charge(intent_id)))
    assert refunded.status_code == 200
    assert refunded.json()["outcome"] == f"purchase {pending['id']}: pending -> refunded"
    assert (await shop.deliver(event("payment_intent.succeeded", succeeded))).status_code == 200
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "refunded"
    balance = await shop.api.call("GET", f"/v1/balances/{pending['balance_id']}")
    assert (balance["status"], balance["granted"], balance["remaining"]) == ("voided", "20.00", "0.00")
    assert (await shop.api.check(n["account"], n["api"]))["allowed"] is False
    assert await _grants(db, pending["balance_id"]) == 1
    assert len(await outbox(db, "payment.succeeded", pending["id"])) == 1


async def test_a_refund_of_a_charge_whose_intent_we_never_heard_of_is_found(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.faults.extend([None, "lost", "lost", "lost"])
    pending = await shop.buy(n["account"], 202)
    assert pending["stripe"]["payment_intent"] is None
    [intent_id] = stripe_fake.intents
    response = await shop.deliver(event("charge.refunded", stripe_fake.charge(intent_id)))
    assert response.json()["outcome"] == f"purchase {pending['id']}: pending -> refunded"
    assert await _grants(db, pending["balance_id"]) == 1
    assert (await shop.api.check(n["account"], n["api"]))["allowed"] is False


async def test_an_event_that_cannot_reach_stripe_is_finished_by_the_reconciler(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n, pending = await _pending(shop, stripe_fake, "requires_action")
    intent_id = pending["stripe"]["payment_intent"]
    failed = stripe_fake.set_status(intent_id, "requires_payment_method",
                                    last_payment_error={"code": "card_declined"})
    evt = event("payment_intent.payment_failed", failed)
    stripe_fake.faults.extend(["down"] * 3)  # the cancel and both SDK retries
    response = await shop.deliver(evt)
    assert response.status_code == 200 and response.json()["outcome"] is None
    stored = await _stored(db, evt["id"])
    assert stored is not None and stored["handled_at"] is None
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "pending"

    assert await shop.reconcile(db, event_id=evt["id"]) == 1
    stored = await _stored(db, evt["id"])
    assert stored is not None and stored["handled_at"] is not None
    purchase = await shop.purchase(n["account"], pending["id"])
    assert purchase["status"] == "failed" and purchase["failure"]["code"] == "card_declined"
    assert stripe_fake.intents[intent_id]["status"] == "canceled"
