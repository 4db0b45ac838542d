"""Property: for any sequence of grants, debits, adjustments, voids and hot-state losses, the
real-time copy in Redis, the ledger in Postgres and a plain model of DESIGN's drawdown agree."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.hotstate.keys import Keys
from app.settings import Settings
from tests.conftest import Api

CENTS = Decimal("0.01")


@dataclass
class ModelBalance:
    id: int
    remaining: Decimal
    priority: int
    products: list[str] | None
    live: bool = True


def drawdown(balances: list[ModelBalance], product: str, amount: Decimal) -> Decimal:
    """DESIGN invariant 7 written plainly; returns the overage."""
    eligible = sorted((b for b in balances if b.live and (b.products is None or product in b.products)),
                      key=lambda b: (b.priority, b.id))
    for b in eligible:
        take = min(b.remaining, amount)
        b.remaining -= take
        amount -= take
    return amount


op = st.one_of(
    st.tuples(st.just("grant"), st.integers(1, 2_000), st.integers(0, 3),
              st.sampled_from(["*", "api", "storage"])),
    st.tuples(st.just("debit"), st.integers(1, 1_500), st.sampled_from(["api", "storage"])),
    st.tuples(st.just("adjust"), st.integers(0, 20), st.integers(-500, 500)),
    st.tuples(st.just("void"), st.integers(0, 20)),
    st.tuples(st.just("forget")),  # Redis loses the root: it must be rebuilt from Postgres
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(op, min_size=1, max_size=14))
async def test_redis_postgres_and_model_agree(ops: list[tuple[Any, ...]], api: Api,
                                              db: asyncpg.Connection, redis: aioredis.Redis,
                                              settings: Settings) -> None:
    n = await api.setup()
    account = n["account"]
    model: list[ModelBalance] = []
    overage = Decimal(0)
    for step in ops:
        kind = step[0]
        if kind == "grant":
            products = None if step[3] == "*" else [n[step[3]]]
            body = await api.grant(account, str(step[1] * CENTS), priority=step[2],
                                   **({"products": products} if products else {}))
            model.append(ModelBalance(body["id"], step[1] * CENTS, step[2], products))
        elif kind == "debit":
            result = await api.usage(account, n[step[2]], str(step[1] * CENTS))
            overage += drawdown(model, n[step[2]], step[1] * CENTS)
            assert Decimal(result["overage"]) + sum(b.remaining for b in model if b.live) >= 0
        elif kind == "adjust" and model:
            target = model[step[1] % len(model)]
            delta = step[2] * CENTS
            expect = 200 if target.live and delta != 0 and target.remaining + delta >= 0 else None
            response = await api.client.post(f"/v1/balances/{target.id}/adjustments",
                                             json={"amount": str(delta)}, headers=api.admin)
            if expect:
                assert response.status_code == 200, response.text
                target.remaining += delta
            else:
                assert response.status_code in (409, 422), response.text
        elif kind == "void" and model:
            target = model[step[1] % len(model)]
            response = await api.client.post(f"/v1/balances/{target.id}/void", json={},
                                              headers=api.admin)
            assert response.status_code == (200 if target.live else 409), response.text
            target.live, target.remaining = False, Decimal(0)
        elif kind == "forget":
            root = await db.fetchval("SELECT root_id FROM accounts WHERE code = $1", account)
            await redis.delete(Keys(settings.redis_prefix).root(root))

    live = await api.live(account)
    hot = {b["id"]: Decimal(b["remaining"]) for b in live["balances"]}
    ledger = {r["balance_id"]: r["sum"] for r in await db.fetch(
        """SELECT e.balance_id, sum(e.amount) FROM ledger_entries e JOIN balances b ON b.id = e.balance_id
           JOIN accounts a ON a.id = b.account_id WHERE a.code = $1 GROUP BY e.balance_id""", account)}
    for b in model:
        assert ledger[b.id] == b.remaining, (b, ledger[b.id])
        if b.live:
            assert hot[b.id] == b.remaining
    assert set(hot) == {b.id for b in model if b.live}
    total_overage = live["totals"][0]["overage"] if live["totals"] else "0"
    assert Decimal(total_overage) == overage
    pg_overage = await db.fetchval(
        """SELECT COALESCE(-sum(e.amount), 0) FROM ledger_entries e JOIN accounts a ON a.id = e.account_id
           WHERE a.code = $1 AND e.kind = 'overage'""", account)
    assert pg_overage == overage
