"""Auto-recharge as the tests drive it: a shop account with a card, a config, runner passes
that see only the test's own recharges."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import asyncpg

from app.recharge.runner import run_once
from tests.stripe_fake import FakeStripe, Shop


async def account_with_card(shop: Shop, fake: FakeStripe, balance: str = "20.00",
                            **setup: Any) -> dict[str, str]:
    n = await shop.customer_account(fake, **setup)
    if balance != "0":
        await shop.api.grant(n["account"], balance)
    return n


async def configure(shop: Shop, n: dict[str, str], threshold: str = "5.00",
                    recharge_to: str = "20.00", expect: int = 200,
                    **extra: Any) -> dict[str, Any]:
    body = {"threshold": threshold, "recharge_to": recharge_to, "currency": "usd", **extra}
    result: dict[str, Any] = await shop.api.call(
        "PUT", f"/v1/accounts/{n['account']}/auto-recharge/{n['credit_type']}", expect=expect,
        json=body)
    return result


async def run(shop: Shop, db: asyncpg.Connection, account: str) -> int:
    """One runner pass with only this account's recharges due: what other tests left waits."""
    await db.execute(
        """UPDATE auto_recharges SET retry_after = CASE
               WHEN account_id = (SELECT id FROM accounts WHERE code = $1)
               THEN now() - interval '1 second' ELSE now() + interval '1 hour' END
           WHERE status IN ('pending', 'processing')""", account)
    return await run_once(shop.ctx)


async def recharges(db: asyncpg.Connection, account: str) -> list[asyncpg.Record]:
    return await db.fetch(
        """SELECT r.* FROM auto_recharges r JOIN accounts a ON a.id = r.account_id
           WHERE a.code = $1 ORDER BY r.id""", account)


async def events(db: asyncpg.Connection, event_type: str, account: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT payload::text AS p FROM webhook_events WHERE type = $1 "
        "AND payload->'data'->>'account' = $2 ORDER BY created_at", event_type, account)
    return [json.loads(r["p"])["data"] for r in rows]


def charged_intents(fake: FakeStripe) -> list[dict[str, Any]]:
    """The PaymentIntents Stripe created (a replayed idempotent create is not a new one)."""
    return list(fake.intents.values())


def dec(value: str) -> Decimal:
    return Decimal(value)
