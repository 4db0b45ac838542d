"""The auto-recharge config API: bad input is a 4xx naming the field and saves nothing; saving
sets or removes the hot-path watch."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from tests.recharge_helpers import account_with_card, configure, recharges
from tests.stripe_fake import FakeStripe, Shop

BAD: list[tuple[dict[str, Any], str]] = [
    ({"threshold": "20.00", "recharge_to": "20.00"}, "recharge_to"),
    ({"threshold": "30.00", "recharge_to": "20.00"}, "recharge_to"),
    ({"threshold": "-1"}, "threshold"),
    ({"recharge_to": "0"}, "recharge_to"),
    ({"threshold": "5.001"}, "threshold"),
    ({"price_per_credit": "0"}, "price_per_credit"),
    ({"price_per_credit": "-2"}, "price_per_credit"),
    ({"currency": "xyz"}, "currency"),
    ({"min_charge": "0.001"}, "min_charge"),
    ({"min_charge": "-1"}, "min_charge"),
    ({"max_per_day": 0}, "max_per_day"),
    ({"expires_in_days": 0}, "expires_in_days"),
    ({"products": ["no-such-product"]}, "products"),
    ({"payment_method_id": "card_123"}, "payment_method_id"),
    ({"surprise": 1}, "surprise"),
]


@pytest.mark.parametrize(("body", "field"), BAD)
async def test_bad_input_names_the_field_and_saves_nothing(
        shop: Shop, stripe_fake: FakeStripe, body: dict[str, Any], field: str) -> None:
    n = await account_with_card(shop, stripe_fake)
    problem = await configure(shop, n, expect=422, **body)
    assert problem["field"] == field, problem
    await shop.api.call("GET", f"/v1/accounts/{n['account']}/auto-recharge/{n['credit_type']}",
                        expect=404)


async def test_account_without_a_stripe_customer_or_card_is_refused(
        shop: Shop, stripe_fake: FakeStripe) -> None:
    n = await shop.api.setup()
    problem = await configure(shop, n, expect=422)
    assert problem["field"] == "account" and problem["code"] == "no_stripe_customer"
    no_card = await shop.customer_account(stripe_fake, default_payment_method=None)
    problem = await configure(shop, no_card, expect=422)
    assert problem["field"] == "account" and problem["code"] == "no_default_payment_method"
    # a named payment method will do; a disabled config needs none
    assert (await configure(shop, no_card, payment_method_id="pm_other"))["payment_method_id"] \
        == "pm_other"
    assert (await configure(shop, n, enabled=False))["enabled"] is False


async def test_custom_credit_type_needs_its_price(shop: Shop, stripe_fake: FakeStripe) -> None:
    n = await shop.customer_account(stripe_fake, credit_type="tokens", decimal_places=0)
    problem = await configure(shop, n, threshold="100", recharge_to="1000", expect=422)
    assert problem["field"] == "price_per_credit"
    saved = await configure(shop, n, threshold="100", recharge_to="1000",
                            price_per_credit="0.002", min_charge="1")
    assert saved["price_per_credit"] == "0.002" and saved["threshold"] == "100"
    assert saved["min_charge"] == "1.00" and saved["max_per_day"] == 10
    listed = await shop.api.call("GET", f"/v1/accounts/{n['account']}/auto-recharge")
    assert [c["credit_type"] for c in listed["data"]] == [n["credit_type"]]


async def test_disabling_removes_the_watch(shop: Shop, stripe_fake: FakeStripe,
                                          db: asyncpg.Connection) -> None:
    n = await account_with_card(shop, stripe_fake)
    await configure(shop, n)
    await configure(shop, n, enabled=False)
    await shop.api.usage(n["account"], n["api"], "18.00")
    assert await recharges(db, n["account"]) == []
    await configure(shop, n, threshold="1.00", recharge_to="10.00")  # 2.00 left: above
    assert await recharges(db, n["account"]) == []
    await shop.api.usage(n["account"], n["api"], "1.50")  # 0.50: crosses the new threshold
    [row] = await recharges(db, n["account"])
    assert row["credits"] == 9.5
