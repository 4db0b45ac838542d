"""Buying credits with the customer's saved card: paid at once, pending, declined."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import pytest

from tests.stripe_fake import FakeStripe, Outcome, Shop, event, outbox


async def _ledger_grants(db: asyncpg.Connection, balance_id: int) -> int:
    return int(await db.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE balance_id = $1 AND kind = 'grant'", balance_id))


async def test_paid_purchase_grants_the_credits_at_once(shop: Shop, stripe_fake: FakeStripe,
                                                        db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, products=[n["api"]], credits="2000",
                            price="20.00", description="2,000 credits")
    assert bought["status"] == "paid" and bought["credits"] == "2000.00"
    assert bought["stripe"]["payment_intent"].startswith("pi_")
    assert bought["stripe"]["customer"] == n["customer"] and bought["paid_at"]
    assert await shop.api.available(n["account"]) == "2000.00"
    assert (await shop.api.check(n["account"], n["api"], amount="1.00"))["allowed"] is True
    assert (await shop.api.check(n["account"], n["storage"]))["reason"] == "no_eligible_balance"
    assert await _ledger_grants(db, bought["balance_id"]) == 1

    [create] = stripe_fake.creates()
    sent = dict(parse_qsl(create.content.decode()))
    assert sent["amount"] == "2000" and sent["currency"] == "usd"
    assert sent["customer"] == n["customer"] and sent["payment_method"] == "pm_card_visa"
    assert sent["off_session"] == "true" and sent["confirm"] == "true"
    assert sent["metadata[creditgate_purchase]"] == str(bought["id"])
    assert create.headers["idempotency-key"] == f"purchase-{bought['id']}-pi"

    [succeeded] = await outbox(db, "payment.succeeded", bought["id"])
    assert succeeded["data"]["account"] == n["account"]
    assert succeeded["data"]["credits"] == "2000.00" and succeeded["data"]["price"] == "20.00"
    granted = await db.fetchval(
        "SELECT count(*) FROM webhook_events WHERE type = 'credits.granted' "
        "AND (payload->'data'->>'balance_id')::int8 = $1", bought["balance_id"])
    assert granted == 1


async def test_zero_decimal_currency_is_charged_in_whole_units(shop: Shop,
                                                               stripe_fake: FakeStripe) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, price="500", currency="JPY")
    assert bought["price"] == "500" and bought["currency"] == "jpy"
    sent = dict(parse_qsl(stripe_fake.creates()[0].content.decode()))
    assert sent["amount"] == "500" and sent["currency"] == "jpy"


async def test_processing_payment_stays_pending_until_stripe_settles_it(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.outcomes.append(Outcome("processing"))
    pending = await shop.buy(n["account"], 202)
    assert pending["status"] == "pending" and pending["stripe"]["status"] == "processing"
    assert pending["next_action"] is None
    assert await shop.api.available(n["account"]) == "0"
    assert (await shop.api.check(n["account"], n["api"]))["reason"] == "no_eligible_balance"

    intent = stripe_fake.set_status(pending["stripe"]["payment_intent"], "succeeded")
    response = await shop.deliver(event("payment_intent.succeeded", intent))
    assert response.status_code == 200, response.text
    assert await shop.api.available(n["account"]) == "20.00"
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "paid"
    assert await _ledger_grants(db, pending["balance_id"]) == 1


async def test_requires_action_says_what_the_customer_must_do(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.outcomes.append(Outcome("requires_action"))
    pending = await shop.buy(n["account"], 202)
    assert pending["status"] == "pending"
    intent_id = pending["stripe"]["payment_intent"]
    assert pending["next_action"] == {"type": "use_stripe_sdk", "redirect_url": None,
                                      "client_secret": f"{intent_id}_secret_x"}
    # a later read still says what is needed, but never hands out the secret again
    again = await shop.purchase(n["account"], pending["id"])
    assert again["next_action"]["type"] == "use_stripe_sdk"
    assert again["next_action"]["client_secret"] is None

    # the customer fails authentication: the intent is cancelled, then the purchase fails
    failed = stripe_fake.set_status(intent_id, "requires_payment_method", next_action=None,
                                    last_payment_error={"code": "payment_intent_authentication_failure",
                                                        "message": "authentication failed"})
    response = await shop.deliver(event("payment_intent.payment_failed", failed))
    assert response.status_code == 200, response.text
    assert stripe_fake.intents[intent_id]["status"] == "canceled"
    purchase = await shop.purchase(n["account"], pending["id"])
    assert purchase["status"] == "failed" and purchase["next_action"] is None
    assert purchase["failure"]["code"] == "payment_intent_authentication_failure"
    balance = await shop.api.call("GET", f"/v1/balances/{pending['balance_id']}")
    assert balance["status"] == "voided"
    assert len(await outbox(db, "payment.failed", pending["id"])) == 1


@pytest.mark.parametrize(("code", "decline_code"), [("card_declined", "insufficient_funds"),
                                                    ("authentication_required", None),
                                                    ("expired_card", None)])
async def test_declined_card_fails_the_purchase_and_voids_its_balance(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection, code: str,
        decline_code: str | None) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.outcomes.append(Outcome(decline=(code, decline_code)))
    problem = await shop.buy(n["account"], 402)
    assert problem["code"] == "payment_failed" and problem["field"] == "payment_method"
    assert (decline_code or code) in problem["detail"]
    purchase = problem["purchase"]
    assert purchase["status"] == "failed"
    assert purchase["failure"]["code"] == code and purchase["failure"]["decline_code"] == decline_code
    assert purchase["stripe"]["payment_intent"].startswith("pi_")
    assert (await shop.api.call("GET", f"/v1/balances/{purchase['balance_id']}"))["status"] == "voided"
    assert await shop.api.available(n["account"]) == "0"
    assert await _ledger_grants(db, purchase["balance_id"]) == 0
    [failed] = await outbox(db, "payment.failed", purchase["id"])
    assert failed["data"]["code"] == code and failed["data"]["decline_code"] == decline_code

    # a late failure event for the same intent changes nothing
    intent = stripe_fake.intents[purchase["stripe"]["payment_intent"]]
    assert (await shop.deliver(event("payment_intent.payment_failed", intent))).status_code == 200
    assert len(await outbox(db, "payment.failed", purchase["id"])) == 1


async def test_purchases_are_listed_with_status_and_stripe_ids(shop: Shop,
                                                               stripe_fake: FakeStripe) -> None:
    n = await shop.customer_account(stripe_fake)
    paid = await shop.buy(n["account"], 201)
    stripe_fake.outcomes.append(Outcome(decline=("card_declined", "generic_decline")))
    declined = (await shop.buy(n["account"], 402))["purchase"]
    stripe_fake.outcomes.append(Outcome("processing"))
    pending = await shop.buy(n["account"], 202)

    first = await shop.api.call("GET", f"/v1/accounts/{n['account']}/purchases?limit=2")
    assert [p["id"] for p in first["data"]] == [paid["id"], declined["id"]]
    assert first["next_cursor"]
    rest = await shop.api.call(
        "GET", f"/v1/accounts/{n['account']}/purchases?limit=2&cursor={first['next_cursor']}")
    assert [p["id"] for p in rest["data"]] == [pending["id"]] and rest["next_cursor"] is None
    statuses = {p["id"]: (p["status"], p["stripe"]["payment_intent"])
                for p in first["data"] + rest["data"]}
    assert statuses == {paid["id"]: ("paid", paid["stripe"]["payment_intent"]),
                        declined["id"]: ("failed", declined["stripe"]["payment_intent"]),
                        pending["id"]: ("pending", pending["stripe"]["payment_intent"])}
    other = await shop.api.setup()
    await shop.api.call("GET", f"/v1/accounts/{other['account']}/purchases/{paid['id']}", expect=404)


async def test_idempotency_key_is_required_and_replays_without_charging_again(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    path = f"/v1/accounts/{n['account']}/purchases"
    body = {"credits": "5", "price": "5.00", "currency": "usd", "expires_in": 86400}
    before = len(stripe_fake.requests)
    missing = await shop.api.call("POST", path, expect=422, json=body)
    assert missing["field"] == "Idempotency-Key"
    assert len(stripe_fake.requests) == before

    key = uuid.uuid4().hex
    first = await shop.api.call("POST", path, expect=201, json=body, headers={"Idempotency-Key": key})
    again = await shop.client.post(path, json=body, headers={**shop.api.admin, "Idempotency-Key": key})
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first
    assert len(stripe_fake.creates()) == 1
    assert await shop.api.available(n["account"]) == "5.00"


async def test_concurrent_requests_with_one_key_create_one_purchase(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    path = f"/v1/accounts/{n['account']}/purchases"
    body = json.dumps({"credits": "7", "price": "7.00", "currency": "usd", "expires_in": "P30D"})
    charging, gate = asyncio.Event(), asyncio.Event()

    async def slow_stripe(intent: dict[str, Any]) -> None:
        charging.set()
        await asyncio.wait_for(gate.wait(), 5)

    stripe_fake.during_create = slow_stripe
    headers = {**shop.api.admin, "Idempotency-Key": uuid.uuid4().hex,
               "content-type": "application/json"}
    first = asyncio.create_task(shop.client.post(path, content=body, headers=headers))
    await asyncio.wait_for(charging.wait(), 5)
    second = await shop.client.post(path, content=body, headers=headers)
    assert second.status_code == 409 and second.json()["field"] == "Idempotency-Key"
    gate.set()
    assert (await first).status_code == 201
    third = await shop.client.post(path, content=body, headers=headers)
    assert third.status_code == 201 and third.json() == (await first).json()

    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", n["account"])
    assert await db.fetchval("SELECT count(*) FROM purchases WHERE account_id = $1", account_id) == 1
    assert len(stripe_fake.creates()) == 1
    assert await shop.api.available(n["account"]) == "7.00"
