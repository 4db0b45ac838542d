"""Two app processes debiting one account through its threshold at the same moment: exactly one
recharge starts and exactly one charge reaches Stripe."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import asyncpg

from app.settings import Settings
from tests.conftest import Api, now_iso
from tests.procs import run_apps
from tests.recharge_helpers import account_with_card, configure, events, recharges, run
from tests.stripe_fake import fake_stripe, open_shop


async def test_concurrent_debits_from_two_processes_crossing_at_once_charge_once(
        settings: Settings, keys: dict[str, str], db: asyncpg.Connection) -> None:
    prefix = f"{settings.redis_prefix}r{uuid.uuid4().hex[:6]}"  # the shop shares their hot state
    with fake_stripe() as fake:
        async with open_shop(dataclasses.replace(settings, redis_prefix=prefix), keys) as shop, \
                run_apps(settings, 2, prefix=prefix) as apps:
            n = await account_with_card(shop, fake, balance="10.00")
            await configure(shop, n)  # 5.00 -> 20.00
            clients = [app.client() for app in apps]
            try:
                runtime = Api(clients[0], keys).runtime
                bodies = [{"uid": uuid.uuid4().hex, "account": n["account"], "product": n["api"],
                           "amount": "0.25", "timestamp": now_iso()} for _ in range(40)]
                responses = await asyncio.gather(*(
                    clients[i % 2].post("/v1/usage", headers=runtime, json=body)
                    for i, body in enumerate(bodies)))
            finally:
                for client in clients:
                    await client.aclose()
            assert [r.status_code for r in responses] == [200] * 40
            [row] = await recharges(db, n["account"])
            assert row["available"] == 5 and row["credits"] == 15
            await run(shop, db, n["account"])
            await run(shop, db, n["account"])
            assert len(fake.creates()) == 1 and len(fake.intents) == 1
            assert await shop.api.available(n["account"]) == "15.00"
            [succeeded] = await events(db, "auto_recharge.succeeded", n["account"])
            assert succeeded["balance"] == "15.00"
            assert apps.tracebacks() == ""
