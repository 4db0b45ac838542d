"""Refunds of purchases: each report of Stripe's `charge.refunded` takes back the share of the
purchased credits that the amount refunded so far pays for (README: Purchases, Refunds)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import asyncpg
import pytest

from app.ledger.service import expire_balance
from tests.stripe_fake import FakeStripe, Outcome, Shop, event


async def _taken(db: asyncpg.Connection, balance_id: int) -> list[tuple[str, str, str]]:
    """The take-back entries of a purchase's balance (and the overage they created), in order."""
    rows = await db.fetch(
        """SELECT op_key, kind, amount FROM ledger_entries
           WHERE op_key IN (SELECT op_key FROM ledger_entries
                            WHERE balance_id = $1 AND op_key ~ '^(rp|rx|r):')
           ORDER BY id""", balance_id)
    return [(r["op_key"], r["kind"], str(r["amount"])) for r in rows]


async def _refund(shop: Shop, fake: FakeStripe, bought: dict[str, Any], refunded: int) -> Any:
    charge = fake.charge(bought["stripe"]["payment_intent"], refunded=refunded)
    response = await shop.deliver(event("charge.refunded", charge))
    assert response.status_code == 200, response.text
    return response.json()


async def _clawed_back_events(db: asyncpg.Connection, balance_id: int) -> list[str]:
    return [r["p"] for r in await db.fetch(
        "SELECT payload::text AS p FROM webhook_events WHERE type = 'credits.clawed_back' "
        "AND (payload->'data'->>'balance_id')::int8 = $1 "
        "ORDER BY (payload->'data'->>'sequence')::int8", balance_id)]


async def test_partial_refunds_take_back_their_share_and_the_spent_part_is_owed(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, credits="10.00", price="20.00")
    balance = bought["balance_id"]
    await _refund(shop, stripe_fake, bought, 500)  # 5.00 of 20.00: a quarter of the credits
    assert await shop.api.available(n["account"]) == "7.50"
    purchase = await shop.purchase(n["account"], bought["id"])
    assert purchase["status"] == "paid" and purchase["amount_refunded"] == "5.00"
    await shop.api.usage(n["account"], n["api"], "7.00")
    # 12.00 refunded in all: 6.00 of credits, 3.50 more; only 0.50 is left, 3.00 is owed
    await _refund(shop, stripe_fake, bought, 1200)
    live = await shop.api.live(n["account"])
    assert live["totals"] == [{"credit_type": n["credit_type"], "available": "0.00",
                               "overage": "3.00"}]
    assert await _taken(db, balance) == [
        (f"rp:{bought['id']}:500", "adjustment", "-2.50"),
        (f"rp:{bought['id']}:1200", "adjustment", "-0.50"),
        (f"rp:{bought['id']}:1200", "overage", "-3.00")]
    events = await _clawed_back_events(db, balance)
    assert len(events) == 2
    assert '"amount": "0.50"' in events[1] and '"overage": "3.00"' in events[1]
    assert '"reason": "partial_refund"' in events[1] and '"amount_refunded": "12.00"' in events[1]
    assert f'"purchase_id": {bought["id"]}' in events[1]
    # an older report arriving late, and a repeated one, change nothing
    await _refund(shop, stripe_fake, bought, 500)
    await _refund(shop, stripe_fake, bought, 1200)
    assert len(await _taken(db, balance)) == 3
    assert (await shop.purchase(n["account"], bought["id"]))["amount_refunded"] == "12.00"
    # the rest refunded: what partial refunds did not take (4.00) is voided or owed, not 10.00
    await _refund(shop, stripe_fake, bought, 2000)
    live = await shop.api.live(n["account"])
    assert live["totals"] == [{"credit_type": n["credit_type"], "available": "0.00",
                               "overage": "7.00"}]
    full = (await _taken(db, balance))[3:]
    assert full == [(f"r:{balance}", "void", "0.00"), (f"r:{balance}", "overage", "-4.00")]
    purchase = await shop.purchase(n["account"], bought["id"])
    assert purchase["status"] == "refunded" and purchase["amount_refunded"] == "20.00"
    # every credit bought is accounted for: taken back from the balance, or owed
    taken = await db.fetchval(
        "SELECT -sum(amount) FROM ledger_entries WHERE op_key LIKE 'rp:' || $1 || ':%' "
        "OR op_key = 'r:' || $2", str(bought["id"]), str(balance))
    assert str(taken) == "10.00"


async def test_shares_round_down_and_add_up_to_the_credits_bought(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, credits="10.00", price="3.00")
    await _refund(shop, stripe_fake, bought, 100)  # a third: 3.333… credits, 3.33 taken
    assert await shop.api.available(n["account"]) == "6.67"
    await _refund(shop, stripe_fake, bought, 200)  # two thirds: 6.66 in all
    assert await shop.api.available(n["account"]) == "3.34"
    await _refund(shop, stripe_fake, bought, 300)  # the rest: voided (no live balance left)
    assert await shop.api.available(n["account"]) == "0"
    amounts = [amount for _, _, amount in await _taken(db, bought["balance_id"])]
    assert amounts == ["-3.33", "-3.33", "-3.34"]


async def test_a_tiny_refund_worth_less_than_a_credit_unit_takes_nothing_yet(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, credits="1.00", price="1000.00")
    await _refund(shop, stripe_fake, bought, 1)  # 0.01 of 1,000.00: 0.00001 credits
    assert await shop.api.available(n["account"]) == "1.00"
    assert await _taken(db, bought["balance_id"]) == []
    assert (await shop.purchase(n["account"], bought["id"]))["amount_refunded"] == "0.01"
    await _refund(shop, stripe_fake, bought, 1001)  # then 10.01 in all: 0.01 credits
    assert await shop.api.available(n["account"]) == "0.99"


async def test_a_partial_refund_reported_before_the_success_grants_first(
        shop: Shop, stripe_fake: FakeStripe) -> None:
    n = await shop.customer_account(stripe_fake)
    stripe_fake.outcomes.append(Outcome("processing"))
    pending = await shop.buy(n["account"], 202)  # 20.00 credits for 20.00
    stripe_fake.set_status(pending["stripe"]["payment_intent"], "succeeded")
    await _refund(shop, stripe_fake, pending, 500)
    purchase = await shop.purchase(n["account"], pending["id"])
    assert purchase["status"] == "paid" and purchase["amount_refunded"] == "5.00"
    assert await shop.api.available(n["account"]) == "15.00"


async def test_reports_delivered_at_once_in_any_order_take_back_exactly_the_last_share(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, credits="70.00", price="7.00")
    reports = [100 * k for k in range(1, 7)] * 2  # 1.00 … 6.00 refunded, each twice
    random.Random(7).shuffle(reports)
    await asyncio.gather(*(_refund(shop, stripe_fake, bought, r) for r in reports))
    assert await shop.api.available(n["account"]) == "10.00"
    taken = await db.fetchval(
        "SELECT -sum(amount) FROM ledger_entries WHERE op_key LIKE 'rp:' || $1 || ':%'",
        str(bought["id"]))
    assert str(taken) == "60.00"
    assert (await shop.purchase(n["account"], bought["id"]))["amount_refunded"] == "6.00"


async def test_a_take_back_cut_short_before_its_commit_is_not_taken_twice(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, credits="10.00", price="10.00")
    journal = shop.ctx.journal
    real_commit = journal.commit

    async def die(records: Any) -> Any:  # the process dies after Redis, before Postgres
        raise RuntimeError("killed")

    monkeypatch.setattr(journal, "commit", die)
    charge = stripe_fake.charge(bought["stripe"]["payment_intent"], refunded=300)
    assert (await shop.deliver(event("charge.refunded", charge))).status_code == 500
    assert await _taken(db, bought["balance_id"]) == []  # applied in Redis only
    # a rebuild of the hot state meanwhile replays it from the journal onto Postgres's figures
    account = await shop.ctx.catalog.account(n["account"])
    await shop.ctx.hot.invalidate(account.root_id)
    assert await shop.api.available(n["account"]) == "7.00"
    monkeypatch.setattr(journal, "commit", real_commit)
    # the next report (5.00 in all) finds the first take-back, commits it, takes only the rest
    await _refund(shop, stripe_fake, bought, 500)
    assert [amount for _, _, amount in await _taken(db, bought["balance_id"])] == [
        "-3.00", "-2.00"]
    assert await shop.api.available(n["account"]) == "5.00"


async def _owed(shop: Shop, account: str) -> str | None:
    """The account's overage (None: no live balance and nothing owed, so no total at all)."""
    totals = (await shop.api.live(account))["totals"]
    return str(totals[0]["overage"]) if totals else None


async def test_a_refund_after_the_credits_expired_owes_only_what_was_spent(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, credits="10.00", price="20.00")
    balance = bought["balance_id"]
    await shop.api.usage(n["account"], n["api"], "3.00")
    await db.execute("UPDATE balances SET effective_at = now() - interval '2 seconds', "
                     "expires_at = now() - interval '1 second' "
                     "WHERE id = $1", balance)
    await expire_balance(shop.ctx, balance)  # the worker's expiry: 7.00 lapse unused
    # half refunded: its 5.00 of credits are covered by the 7.00 that lapsed
    await _refund(shop, stripe_fake, bought, 1000)
    assert await _owed(shop, n["account"]) is None
    assert await _taken(db, balance) == []
    # all refunded: 10.00 of credits, 7.00 lapsed, so the 3.00 used are owed
    await _refund(shop, stripe_fake, bought, 2000)
    assert await _owed(shop, n["account"]) == "3.00"
    assert await _taken(db, balance) == [(f"rx:{bought['id']}:2000", "adjustment", "0.00"),
                                         (f"rx:{bought['id']}:2000", "overage", "-3.00")]
    purchase = await shop.purchase(n["account"], bought["id"])
    assert purchase["status"] == "refunded" and purchase["amount_refunded"] == "20.00"
    events = await db.fetch(
        "SELECT payload->'data' AS d FROM webhook_events WHERE type = 'credits.clawed_back' "
        "AND (payload->'data'->>'purchase_id')::int8 = $1", bought["id"])
    assert [json.loads(e["d"]) for e in events] == [{
        "account": n["account"], "balance_id": balance, "credit_type": n["credit_type"],
        "amount": "0.00", "overage": "3.00", "reason": "refund", "purchase_id": bought["id"],
        "amount_refunded": "20.00"}]
    # the same report again, and an older one: nothing more is owed
    await _refund(shop, stripe_fake, bought, 2000)
    await _refund(shop, stripe_fake, bought, 1000)
    assert await _owed(shop, n["account"]) == "3.00"
    assert len(await _taken(db, balance)) == 2
    # the owed entry is in Postgres: a Redis flush, then the rebuilt hot copy, agree
    await shop.ctx.redis.flushall()
    assert await _owed(shop, n["account"]) == "3.00"


async def test_a_refund_after_a_partial_take_back_and_a_void_adds_up_to_the_credits_used(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, credits="10.00", price="20.00")
    balance = bought["balance_id"]
    await shop.api.usage(n["account"], n["api"], "6.00")
    # 10.00 refunded while live: 5.00 of credits, 4.00 left to take, 1.00 owed
    await _refund(shop, stripe_fake, bought, 1000)
    assert (await _owed(shop, n["account"]), await shop.api.available(n["account"])) == (
        "1.00", "0.00")
    await shop.api.call("POST", f"/v1/balances/{balance}/void", json={})
    # 15.00 refunded: 7.50 of credits, 4.00 taken, nothing lapsed: 3.50 owed, 1.00 of it before
    await _refund(shop, stripe_fake, bought, 1500)
    assert await _owed(shop, n["account"]) == "3.50"
    # all of it: the 6.00 used are owed in all, and every credit bought is accounted for
    await _refund(shop, stripe_fake, bought, 2000)
    assert await _owed(shop, n["account"]) == "6.00"
    accounted = await db.fetchval(
        "SELECT -sum(amount) FROM ledger_entries WHERE op_key IN "
        "(SELECT op_key FROM ledger_entries WHERE balance_id = $1 AND op_key ~ '^(rp|rx|r):')",
        balance)
    assert str(accounted) == "10.00"  # 4.00 taken back + 6.00 owed


async def test_reports_at_once_after_a_void_owe_the_used_credits_once(
        shop: Shop, stripe_fake: FakeStripe, db: asyncpg.Connection) -> None:
    n = await shop.customer_account(stripe_fake)
    bought = await shop.buy(n["account"], 201, credits="70.00", price="7.00")
    await shop.api.usage(n["account"], n["api"], "45.00")
    await shop.api.call("POST", f"/v1/balances/{bought['balance_id']}/void", json={})
    reports = [100 * k for k in range(1, 8)] * 2  # 1.00 … 7.00 refunded, each twice
    random.Random(11).shuffle(reports)
    await asyncio.gather(*(_refund(shop, stripe_fake, bought, r) for r in reports))
    # 25.00 lapsed unused cover the first 25.00 of refunded credits; the 45.00 used are owed
    assert await _owed(shop, n["account"]) == "45.00"
    owed = await db.fetchval("SELECT -sum(amount) FROM ledger_entries WHERE kind = 'overage' "
                             "AND op_key LIKE 'rx:' || $1 || ':%'", str(bought["id"]))
    assert str(owed) == "45.00"
    assert (await shop.purchase(n["account"], bought["id"]))["status"] == "refunded"
