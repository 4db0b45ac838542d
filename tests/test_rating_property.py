"""Invariant 8 under concurrency: two app processes rate random measurement sequences, sent
one by one and in batches, and the sum of real-time drawdowns (debits less give-backs) equals
the pricing function applied to the final aggregate, for aggregations that only grow (SUM, MAX)
and ones that go up and down (LATEST, MEAN)."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from decimal import localcontext
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.rating.pricing import PRECISION, Band, price, to_minor
from app.settings import Settings
from tests.procs import call_as, run_apps
from tests.test_rating_drawdown import month_start

BANDS = [Band(D(10), D("0.333")), Band(D(50), D("0.25")), Band(None, D("0.125"))]
SPEC = [{"up_to": "10", "price": "0.333"}, {"up_to": "50", "price": "0.25"},
        {"up_to": None, "price": "0.125"}]
# (function, pricing type): two that only grow and two that also go down
PRICED = (("SUM", "tiered"), ("MAX", "volume"), ("LATEST", "volume"), ("MEAN", "stair_step"))
values = st.lists(st.decimals(min_value=0, max_value=20, places=3), min_size=1, max_size=25)


async def _setup(client: httpx.AsyncClient, admin: str) -> dict[str, str]:
    s = uuid.uuid4().hex[:8]
    names = {"ct": f"usd-{s}", "product": f"store-{s}", "meter": f"m-{s}", "plan": f"p-{s}"}
    await call_as(client, admin, "POST", "/v1/credit-types", json={
        "code": names["ct"], "name": "usd", "kind": "fiat", "decimal_places": 2})
    await call_as(client, admin, "POST", "/v1/products", json={"code": names["product"], "name": "s"})
    await call_as(client, admin, "POST", "/v1/meters", json={
        "code": names["meter"], "name": "m", "data_fields": [{"code": "gb", "category": "measure"}]})
    await call_as(client, admin, "POST", "/v1/plan-templates", json={
        "code": f"t-{s}", "name": "t", "product": names["product"], "bill_frequency": "monthly",
        "currency": names["ct"]})
    await call_as(client, admin, "POST", "/v1/plans", json={"code": names["plan"], "name": "p",
                                                          "template": f"t-{s}"})
    for function, kind in PRICED:
        await call_as(client, admin, "POST", "/v1/aggregations", json={
            "code": f"{function}-{s}", "name": "a", "meter": names["meter"], "target_field": "gb",
            "function": function})
        await call_as(client, admin, "POST", "/v1/pricings", json={
            "plan": names["plan"], "aggregation": f"{function}-{s}", "start_date": month_start(),
            "type": kind, "bands": SPEC})
    return names


async def on_the_plan(client: httpx.AsyncClient, admin: str, names: dict[str, str]) -> str:
    """A new account with 100,000 credits, attached to the plan of `_setup`."""
    account = f"acct-{uuid.uuid4().hex[:8]}"
    await call_as(client, admin, "POST", "/v1/accounts", json={
        "code": account, "name": "a", "credit_type": names["ct"]})
    await call_as(client, admin, "POST", f"/v1/accounts/{account}/grants",
                  json={"amount": "100000"})
    await call_as(client, admin, "POST", f"/v1/accounts/{account}/plans",
                  json={"plan": names["plan"], "start_date": month_start()})
    return account


def measurements(account: str, names: dict[str, str], amounts: list[D],
                 prefix: str = "u") -> list[dict[str, Any]]:
    """One measurement per amount, each a millisecond after the last (LATEST = the last)."""
    start = datetime.now(UTC) - timedelta(seconds=2)
    return [{"uid": f"{prefix}{i}", "account": account, "meter": names["meter"],
             "timestamp": (start + timedelta(milliseconds=i)).isoformat(),
             "data": {"gb": f"{v}"}} for i, v in enumerate(amounts)]


def expected_drawn(amounts: list[D]) -> D:
    """What the four pricings of `_setup` charge for the final aggregates of `amounts`."""
    with localcontext() as context:  # the mean to PRECISION digits, as the service takes it
        context.prec = PRECISION
        mean = sum(amounts, D(0)) / len(amounts)
    finals = {"SUM": sum(amounts, D(0)), "MAX": max(amounts), "LATEST": amounts[-1],
              "MEAN": mean}
    return D(sum(to_minor(price(kind, BANDS, finals[function]), 2)
                 for function, kind in PRICED)).scaleb(-2)


async def drawn_from(client: httpx.AsyncClient, runtime: str, account: str) -> D:
    view = await call_as(client, runtime, "GET", f"/v1/accounts/{account}/balances")
    return D(100000) - D(view["totals"][0]["available"])


async def _example(urls: list[str], keys: dict[str, str], names: dict[str, str],
                   amounts: list[D], seed: int) -> None:
    clients = [httpx.AsyncClient(base_url=u, timeout=30) for u in urls]
    try:
        admin, runtime = keys["admin"], keys["runtime"]
        account = await on_the_plan(clients[0], admin, names)
        items = measurements(account, names, amounts)
        rng = random.Random(seed)
        rng.shuffle(items)
        items += rng.sample(items, min(3, len(items)))  # retries: duplicates change nothing

        # sent one by one or in batches of up to 5 (a batch, and the requests rated in one
        # group, draw one debit per charge: the net of their shares)
        chunks, at = [], 0
        while at < len(items):
            size = rng.randint(1, 5)
            chunks.append(items[at:at + size])
            at += size

        async def send(i: int, chunk: list[dict[str, Any]]) -> None:
            body = chunk[0] if len(chunk) == 1 and rng.random() < 0.5 else {"measurements": chunk}
            await call_as(clients[i % 2], runtime, "POST", "/v1/measurements", json=body)
        await asyncio.gather(*(send(i, chunk) for i, chunk in enumerate(chunks)))
        expected = expected_drawn(amounts)
        drawn = None
        for _ in range(50):  # a give-back left to the worker (interval 0.5 s) comes promptly
            drawn = await drawn_from(clients[1], runtime, account)
            if drawn == expected:
                break
            await asyncio.sleep(0.2)
        assert drawn == expected, (drawn, expected, amounts)
    finally:
        for client in clients:
            await client.aclose()


async def test_drawdowns_add_up_to_the_price_of_the_final_aggregate(
        settings: Settings, keys: dict[str, str]) -> None:
    async with run_apps(settings, 2) as apps:
        urls = [a.url for a in apps]
        async with httpx.AsyncClient(base_url=urls[0], timeout=30) as client:
            names = await _setup(client, keys["admin"])

        @settings_(max_examples=8, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))
        @given(values, st.integers(0, 2**32))
        def prop(amounts: list[D], seed: int) -> None:
            asyncio.run(_example(urls, keys, names, amounts, seed))

        await asyncio.to_thread(prop)
        assert not apps.tracebacks(), apps.tracebacks()


settings_ = settings
