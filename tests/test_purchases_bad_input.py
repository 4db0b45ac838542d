"""A purchase Stripe would refuse, or that cannot be charged, is a 4xx naming the field, and
creates nothing: no purchase, no balance, no Stripe call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from app.purchases.schemas import after
from tests.stripe_fake import FakeStripe, Shop

PAST = (datetime.now(UTC) - timedelta(days=1)).isoformat()


@pytest.mark.parametrize(("change", "field", "status"), [
    ({"credits": "0"}, "credits", 422),
    ({"credits": "-5"}, "credits", 422),
    ({"credits": "1.001"}, "credits", 422),  # the credit type has 2 decimal places
    ({"price": "0"}, "price", 422),
    ({"price": "-1.00"}, "price", 422),
    ({"price": "0.49"}, "price", 422),  # USD minimum charge is 0.50
    ({"price": "10.005"}, "price", 422),  # finer than a cent: never rounded
    ({"price": "1000000.00"}, "price", 422),  # over Stripe's eight digits
    ({"price": "49", "currency": "jpy"}, "price", 422),  # JPY minimum is 50
    ({"price": "50.5", "currency": "jpy"}, "price", 422),  # JPY has no minor unit
    ({"price": "0.29", "currency": "gbp"}, "price", 422),
    ({"currency": "xyz"}, "currency", 422),
    ({"currency": "usdd"}, "currency", 422),
    ({"currency": "idr"}, "currency", 422),  # real, but no published minimum: not accepted
    ({"expires_in": None}, "expires_in", 422),
    ({"expires_in": "one year"}, "expires_in", 422),
    ({"expires_in": 0}, "expires_in", 422),
    ({"expires_in": "P0D"}, "expires_in", 422),
    ({"expires_in": "P1Y", "expires_at": "2099-01-01T00:00:00Z"}, "expires_at", 422),
    ({"expires_in": None, "expires_at": PAST}, "expires_at", 422),
    ({"expires_in": None, "expires_at": "2099-01-01T00:00:00"}, "expires_at", 422),
    ({"products": ["no-such-product"]}, "products", 422),
    ({"credit_type": "no-such-type"}, "credit_type", 422),
    ({"method": "cash"}, "method", 422),
    ({"surprise": 1}, "surprise", 422),
])
async def test_bad_purchase_is_rejected_and_creates_nothing(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection, change: dict[str, Any],
        field: str, status: int) -> None:
    n = await shop.customer_account(stripe_fake)
    before = len(stripe_fake.requests)
    body = {k: v for k, v in {"credits": "20.00", "price": "20.00", "currency": "usd",
                              "expires_in": "P1Y", **change}.items() if v is not None}
    problem = await shop.api.call("POST", f"/v1/accounts/{n['account']}/purchases", expect=status,
                                  json=body, headers={"Idempotency-Key": f"bad-{field}-{n['account']}"})
    assert problem["field"] == field, problem
    assert problem["type"].startswith("https://creditgate.dev/problems/")
    await _nothing_created(db, n["account"])
    assert len(stripe_fake.requests) == before


async def _nothing_created(db: asyncpg.Connection, account: str) -> None:
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", account)
    assert await db.fetchval("SELECT count(*) FROM purchases WHERE account_id = $1", account_id) == 0
    assert await db.fetchval("SELECT count(*) FROM balances WHERE account_id = $1", account_id) == 0


async def test_an_account_without_a_stripe_customer_says_so(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.api.setup()
    problem = await shop.buy(n["account"], 422)
    assert problem["code"] == "no_stripe_customer" and problem["field"] == "account"
    assert "/stripe-customer" in problem["detail"]
    await _nothing_created(db, n["account"])
    assert stripe_fake.requests == []


async def test_a_customer_without_a_default_payment_method_says_so(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake, default_payment_method=None)
    problem = await shop.buy(n["account"], 422)
    assert problem["code"] == "no_default_payment_method" and problem["field"] == "account"
    await _nothing_created(db, n["account"])
    assert stripe_fake.creates() == []


async def test_unknown_account_is_a_404(shop: Shop, stripe_fake: FakeStripe) -> None:
    problem = await shop.buy("no-such-account", 404)
    assert problem["field"] == "account"


async def test_stripe_unreachable_before_charging_creates_nothing(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.faults.extend(["down"] * 3)  # reading the default payment method
    problem = await shop.buy(n["account"], 503)
    assert problem["code"] == "stripe_unavailable"
    await _nothing_created(db, n["account"])


async def test_without_stripe_configured_purchases_are_refused(api: Any) -> None:
    n = await api.setup()
    problem = await api.call("POST", f"/v1/accounts/{n['account']}/stripe-customer", expect=409,
                             json={})
    assert problem["code"] == "stripe_not_configured"
    webhook = await api.client.post("/v1/stripe/webhook", content=b"{}")
    assert webhook.status_code == 409


@pytest.mark.parametrize(("start", "duration", "expected"), [
    ("2026-01-31T10:00:00+00:00", "P1M", "2026-02-28T10:00:00+00:00"),
    ("2028-02-29T00:00:00+00:00", "P1Y", "2029-02-28T00:00:00+00:00"),
    ("2026-01-01T00:00:00+00:00", "P1Y2M3DT4H5M6S", "2027-03-04T04:05:06+00:00"),
    ("2026-01-01T00:00:00+00:00", "P2W", "2026-01-15T00:00:00+00:00"),
    ("2026-01-01T00:00:00+00:00", 3600, "2026-01-01T01:00:00+00:00"),
])
def test_expires_in_counts_years_and_months_by_the_calendar(start: str, duration: str | int,
                                                            expected: str) -> None:
    assert after(datetime.fromisoformat(start), duration).isoformat() == expected
