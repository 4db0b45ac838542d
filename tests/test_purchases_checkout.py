"""Buying through Stripe Checkout when the customer has no saved card, and linking customers."""

from __future__ import annotations

from urllib.parse import parse_qsl

import asyncpg

from tests.stripe_fake import FakeStripe, Shop, event, outbox

RETURN = "https://vendor.example/credits/thanks"


async def test_checkout_returns_the_session_url_and_grants_once_paid(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake, default_payment_method=None)
    no_card = await shop.buy(n["account"], 422)
    assert no_card["code"] == "no_default_payment_method" and no_card["field"] == "account"
    assert "method=checkout" in no_card["detail"]

    pending = await shop.buy(n["account"], 202, method="checkout", success_url=RETURN,
                             cancel_url=RETURN + "?cancel=1", credits="2000", price="20.00")
    session_id = pending["stripe"]["checkout_session"]
    assert pending["status"] == "pending"
    assert pending["checkout_url"] == f"https://checkout.stripe.com/c/pay/{session_id}"
    sent = dict(parse_qsl(stripe_fake.seen("POST", "/v1/checkout/sessions")[0].content.decode()))
    assert sent["mode"] == "payment" and sent["customer"] == n["customer"]
    assert sent["payment_intent_data[setup_future_usage]"] == "off_session"
    assert sent["payment_intent_data[metadata][creditgate_purchase]"] == str(pending["id"])
    assert sent["line_items[0][price_data][unit_amount]"] == "2000"
    assert sent["success_url"] == RETURN
    assert stripe_fake.seen("POST", "/v1/checkout/sessions")[0].headers["idempotency-key"] == \
        f"purchase-{pending['id']}-checkout"
    assert await shop.api.available(n["account"]) == "0"

    completed = stripe_fake.complete_session(session_id)
    response = await shop.deliver(event("checkout.session.completed", completed))
    assert response.status_code == 200, response.text
    purchase = await shop.purchase(n["account"], pending["id"])
    assert purchase["status"] == "paid" and purchase["checkout_url"] is None
    assert purchase["stripe"]["payment_intent"] == completed["payment_intent"]
    assert await shop.api.available(n["account"]) == "2000.00"
    assert len(await outbox(db, "payment.succeeded", pending["id"])) == 1
    # the intent's own success event, arriving too, changes nothing
    intent = stripe_fake.intents[completed["payment_intent"]]
    assert (await shop.deliver(event("payment_intent.succeeded", intent))).status_code == 200
    assert await shop.api.available(n["account"]) == "2000.00"

    # the card paid through Checkout is now the default: the next purchase needs no page
    customer = stripe_fake.customers[n["customer"]]
    assert customer["invoice_settings"]["default_payment_method"] == "pm_from_checkout"
    again = await shop.buy(n["account"], 201, credits="5", price="5.00")
    assert again["status"] == "paid"
    assert await shop.api.available(n["account"]) == "2005.00"


async def test_the_card_is_saved_even_when_the_intents_event_came_first(
        shop: Shop, stripe_fake: FakeStripe) -> None:
    n = await shop.customer_account(stripe_fake, default_payment_method=None)
    pending = await shop.buy(n["account"], 202, method="checkout", success_url=RETURN)
    completed = stripe_fake.complete_session(pending["stripe"]["checkout_session"])
    intent = stripe_fake.intents[completed["payment_intent"]]
    assert (await shop.deliver(event("payment_intent.succeeded", intent))).status_code == 200
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "paid"
    assert (await shop.deliver(event("checkout.session.completed", completed))).status_code == 200
    customer = stripe_fake.customers[n["customer"]]
    assert customer["invoice_settings"]["default_payment_method"] == "pm_from_checkout"
    assert await shop.api.available(n["account"]) == "20.00"


async def test_checkout_needs_a_return_url(shop: Shop, stripe_fake: FakeStripe) -> None:
    n = await shop.customer_account(stripe_fake, default_payment_method=None)
    problem = await shop.buy(n["account"], 422, method="checkout")
    assert problem["field"] == "success_url"


async def test_an_expired_checkout_session_fails_the_purchase(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake, default_payment_method=None)
    pending = await shop.buy(n["account"], 202, method="checkout", success_url=RETURN)
    session = stripe_fake.sessions[pending["stripe"]["checkout_session"]]
    session["status"] = "expired"
    assert (await shop.deliver(event("checkout.session.expired", session))).status_code == 200
    purchase = await shop.purchase(n["account"], pending["id"])
    assert purchase["status"] == "failed" and purchase["failure"]["code"] == "checkout_expired"
    assert (await shop.api.call("GET", f"/v1/balances/{pending['balance_id']}"))["status"] == "voided"
    assert len(await outbox(db, "payment.failed", pending["id"])) == 1


async def test_a_delayed_checkout_payment_waits_for_its_outcome(
        shop: Shop, stripe_fake: FakeStripe) -> None:
    n = await shop.customer_account(stripe_fake, default_payment_method=None)
    pending = await shop.buy(n["account"], 202, method="checkout", success_url=RETURN)
    session_id = pending["stripe"]["checkout_session"]
    unpaid = stripe_fake.complete_session(session_id, paid=False)
    assert (await shop.deliver(event("checkout.session.completed", unpaid))).status_code == 200
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "pending"
    # a failed attempt on the Checkout page does not end the purchase: the customer may retry
    intent = stripe_fake.set_status(unpaid["payment_intent"], "requires_payment_method")
    assert (await shop.deliver(event("payment_intent.payment_failed", intent))).status_code == 200
    assert stripe_fake.seen("POST", f"/v1/payment_intents/{intent['id']}/cancel") == []
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "pending"

    paid = {**unpaid, "payment_status": "paid"}
    stripe_fake.sessions[session_id]["payment_status"] = "paid"
    assert (await shop.deliver(event("checkout.session.async_payment_succeeded", paid))).status_code == 200
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "paid"
    assert await shop.api.available(n["account"]) == "20.00"


async def test_the_reconciler_settles_a_checkout_whose_event_never_came(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake, default_payment_method=None)
    pending = await shop.buy(n["account"], 202, method="checkout", success_url=RETURN)
    stripe_fake.complete_session(pending["stripe"]["checkout_session"])
    assert await shop.reconcile(db, pending["id"]) == 1
    assert (await shop.purchase(n["account"], pending["id"]))["status"] == "paid"
    assert await shop.api.available(n["account"]) == "20.00"


# linking accounts to Stripe customers

async def test_creditgate_creates_the_stripe_customer_on_request(
        shop: Shop, stripe_fake: FakeStripe) -> None:
    n = await shop.api.setup()
    path = f"/v1/accounts/{n['account']}/stripe-customer"
    await shop.api.call("GET", path, expect=404)
    await shop.api.call("PATCH", f"/v1/accounts/{n['account']}", json={"email": "billing@example.com"})
    linked = await shop.api.call("POST", path, json={})
    assert linked["created_here"] is True and linked["default_payment_method"] is None
    created = stripe_fake.customers[linked["customer_id"]]
    assert created["name"] == "Example Inc." and created["email"] == "billing@example.com"
    assert created["metadata"] == {"creditgate_account": n["account"]}
    [create] = stripe_fake.seen("POST", "/v1/customers")
    account_id = await shop.ctx.pool.fetchval("SELECT id FROM accounts WHERE code = $1", n["account"])
    assert create.headers["idempotency-key"] == f"account-{account_id}-customer"
    # asking again returns the link, creating nothing
    assert (await shop.api.call("POST", path, json={}))["customer_id"] == linked["customer_id"]
    assert len(stripe_fake.seen("POST", "/v1/customers")) == 1
    assert (await shop.api.call("GET", path))["customer_id"] == linked["customer_id"]


async def test_an_existing_customer_is_attached_by_id(shop: Shop, stripe_fake: FakeStripe) -> None:
    n = await shop.api.setup()
    path = f"/v1/accounts/{n['account']}/stripe-customer"
    unknown = await shop.api.call("POST", path, expect=422, json={"customer_id": "cus_nobody"})
    assert unknown["field"] == "customer_id"
    malformed = await shop.api.call("POST", path, expect=422, json={"customer_id": "acct_1"})
    assert malformed["field"] == "customer_id"

    customer_id = stripe_fake.customer("pm_saved")
    linked = await shop.api.call("POST", path, json={"customer_id": customer_id})
    assert linked == {"account": n["account"], "customer_id": customer_id, "created_here": False,
                      "default_payment_method": "pm_saved"}
    other = stripe_fake.customer()
    relink = await shop.api.call("POST", path, expect=409, json={"customer_id": other})
    assert relink["field"] == "customer_id"
    second = await shop.api.setup()
    taken = await shop.api.call("POST", f"/v1/accounts/{second['account']}/stripe-customer",
                                expect=409, json={"customer_id": customer_id})
    assert taken["field"] == "customer_id" and n["account"] in taken["detail"]
