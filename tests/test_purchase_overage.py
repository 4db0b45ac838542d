"""Purchases that pay what the account owes (`pays_overage`): once paid, the credits go to the
account's overage in their credit type first (README: Purchases, Paying what is owed)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from app.ledger import service as ledger
from tests.stripe_fake import FakeStripe, Outcome, Shop, event


async def _totals(shop: Shop, account: str) -> tuple[str, str]:
    [total] = (await shop.api.live(account))["totals"]
    return total["available"], total["overage"]


async def _paid_entries(db: asyncpg.Connection, purchase_id: int) -> list[tuple[str, str]]:
    rows = await db.fetch("SELECT kind, amount FROM ledger_entries WHERE op_key = $1 ORDER BY seq",
                          f"po:{purchase_id}")
    return [(r["kind"], str(r["amount"])) for r in rows]


async def _settled_events(db: asyncpg.Connection, purchase_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT payload->'data' AS d FROM webhook_events "
                          "WHERE type = 'overage.settled' AND payload->'data'->>'reference' = $1",
                          f"purchase:{purchase_id}")
    return [json.loads(r["d"]) for r in rows]


async def test_a_purchase_pays_the_overage_first_and_the_rest_stays_drawable(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    await shop.api.usage(n["account"], n["api"], "3.00")  # no credit: 3.00 owed
    bought = await shop.buy(n["account"], 201, credits="10.00", price="10.00", pays_overage=True)
    assert (bought["status"], bought["pays_overage"], bought["overage_paid"]) == (
        "paid", True, "3.00")
    assert await _totals(shop, n["account"]) == ("7.00", "0.00")
    assert await _paid_entries(db, bought["id"]) == [("adjustment", "-3.00"), ("overage", "3.00")]
    balance = await shop.api.call("GET", f"/v1/balances/{bought['balance_id']}")
    assert balance["remaining"] == "7.00"
    [settled] = await _settled_events(db, bought["id"])
    assert isinstance(settled.pop("sequence"), int)  # the journal's order, as other events
    assert settled == {
        "account": n["account"], "credit_type": n["credit_type"],
        "reference": f"purchase:{bought['id']}", "amount": "3.00", "purchase_id": bought["id"],
        "balance_id": bought["balance_id"]}
    # the hot copy rebuilt from Postgres agrees
    await shop.ctx.redis.flushall()
    assert await _totals(shop, n["account"]) == ("7.00", "0.00")


async def test_a_debt_larger_than_the_credits_takes_them_all_and_the_rest_stays_owed(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    await shop.api.usage(n["account"], n["api"], "15.00")
    bought = await shop.buy(n["account"], 201, credits="10.00", price="10.00", pays_overage=True)
    assert bought["overage_paid"] == "10.00"
    assert await _totals(shop, n["account"]) == ("0.00", "5.00")
    # without pays_overage a purchase leaves the debt alone
    plain = await shop.buy(n["account"], 201, credits="4.00", price="4.00")
    assert (plain["pays_overage"], plain["overage_paid"]) == (False, None)
    assert await _totals(shop, n["account"]) == ("4.00", "5.00")
    assert await _paid_entries(db, plain["id"]) == []


async def test_nothing_owed_pays_nothing(shop: Shop, stripe_fake: FakeStripe,
                                         db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, credits="10.00", price="10.00", pays_overage=True)
    assert bought["overage_paid"] is None
    assert await shop.api.available(n["account"]) == "10.00"
    assert await _settled_events(db, bought["id"]) == []


async def test_a_payment_confirmed_later_pays_once_however_many_settlers_race(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    await shop.api.usage(n["account"], n["api"], "2.50")
    stripe_fake.outcomes.append(Outcome("processing"))
    pending = await shop.buy(n["account"], 202, credits="10.00", price="10.00",
                             pays_overage=True)
    assert pending["overage_paid"] is None
    assert await _totals(shop, n["account"]) == ("0.00", "2.50")  # nothing paid before Stripe
    intent = stripe_fake.set_status(pending["stripe"]["payment_intent"], "succeeded")
    responses = await asyncio.gather(
        *(shop.deliver(event("payment_intent.succeeded", intent)) for _ in range(3)),
        shop.reconcile(db, pending["id"]))
    assert all(r.status_code == 200 for r in responses[:3])
    assert await _totals(shop, n["account"]) == ("7.50", "0.00")
    assert await _paid_entries(db, pending["id"]) == [("adjustment", "-2.50"),
                                                      ("overage", "2.50")]
    assert len(await _settled_events(db, pending["id"])) == 1


async def test_killed_between_the_grant_and_the_payment_of_the_debt(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    n = await shop.customer_account(stripe_fake)
    await shop.api.usage(n["account"], n["api"], "1.00")
    real = ledger.pay_overage

    async def killed(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("process killed")

    monkeypatch.setattr(ledger, "pay_overage", killed)
    crashed = await shop.client.post(
        f"/v1/accounts/{n['account']}/purchases",
        headers={**shop.api.admin, "Idempotency-Key": "pay-debt-1"},
        json={"credits": "5.00", "price": "5.00", "currency": "usd", "expires_in": "P1Y",
              "pays_overage": True})
    assert crashed.status_code == 500
    monkeypatch.setattr(ledger, "pay_overage", real)
    row = await db.fetchrow("SELECT * FROM purchases WHERE request_key = 'pay-debt-1' "
                            "AND account_id = (SELECT id FROM accounts WHERE code = $1)",
                            n["account"])
    assert row["status"] == "granting"  # granted, the debt not paid yet: not paid either
    assert await _totals(shop, n["account"]) == ("5.00", "1.00")
    assert await shop.reconcile(db, row["id"]) == 1
    assert (await shop.purchase(n["account"], row["id"]))["status"] == "paid"
    assert await _totals(shop, n["account"]) == ("4.00", "0.00")
    assert await shop.reconcile(db, row["id"]) == 0
    assert await _paid_entries(db, row["id"]) == [("adjustment", "-1.00"), ("overage", "1.00")]


async def test_a_refund_of_a_purchase_that_paid_the_debt_brings_the_debt_back(
        shop: Shop, stripe_fake: FakeStripe) -> None:
    n = await shop.customer_account(stripe_fake)
    await shop.api.usage(n["account"], n["api"], "3.00")
    bought = await shop.buy(n["account"], 201, credits="10.00", price="10.00", pays_overage=True)
    charge = stripe_fake.charge(bought["stripe"]["payment_intent"], refunded=1000)
    assert (await shop.deliver(event("charge.refunded", charge))).status_code == 200
    # the 7.00 left are voided and the 3.00 that paid the debt are owed again
    assert await _totals(shop, n["account"]) == ("0.00", "3.00")
