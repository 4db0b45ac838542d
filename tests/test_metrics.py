"""`GET /metrics` (app/metrics.py): a real app process's figures in the Prometheus text format,
moving with what the process does."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal

import httpx

from app.settings import Settings
from tests.conftest import Api
from tests.procs import call_as, run_apps
from tests.test_balance_stream import stream

LINE = re.compile(r"^([a-z_]+) (\S+)$")


async def scrape(client: httpx.AsyncClient, admin: str) -> dict[str, Decimal]:
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    values: dict[str, Decimal] = {}
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
            continue
        found = LINE.match(line)
        assert found, line
        values[found[1]] = Decimal(found[2])
    return values


async def test_the_figures_move_with_what_the_process_does(
        api: Api, settings: Settings, keys: dict[str, str]) -> None:
    n = await api.setup()
    admin, runtime = keys["admin"], keys["runtime"]
    async with run_apps(settings, 1) as apps, apps[0].client() as client:
        await call_as(client, admin, "POST", f"/v1/accounts/{n['account']}/grants",
                      json={"amount": "5.00"})
        before = await scrape(client, admin)
        assert before["creditgate_postgres_up"] == 1 and before["creditgate_redis_up"] == 1
        assert before["creditgate_balance_streams_open"] == 0
        assert before["creditgate_check_cache_armed"] == 1
        for name in ("creditgate_webhook_deliveries_pending", "creditgate_usage_events_unsummed",
                     "creditgate_auto_recharges_in_flight", "creditgate_purchases_unsettled",
                     "creditgate_webhook_claim_queries_total", "creditgate_process_cpu_seconds_total"):
            assert before[name] >= 0, name
        assert before["creditgate_process_resident_memory_bytes"] > 10_000_000
        for _ in range(3):  # the first goes to Redis, the next two are answered from memory
            await call_as(client, runtime, "POST", "/v1/check",
                          json={"account": n["account"], "product": n["api"]})
        async with stream(apps[0], n["account"], runtime) as events:
            await events.balances()
            during = await scrape(client, admin)
        assert during["creditgate_balance_streams_open"] == 1
        assert during["creditgate_check_cache_hits_total"] >= \
            before["creditgate_check_cache_hits_total"] + 2
        assert during["creditgate_check_cache_entries"] >= 1
        for _ in range(50):  # the server notices the closed stream when its client goes
            after = await scrape(client, admin)
            if after["creditgate_balance_streams_open"] == 0:
                break
            await asyncio.sleep(0.1)
        assert after["creditgate_balance_streams_open"] == 0
        assert after["creditgate_process_cpu_seconds_total"] > \
            before["creditgate_process_cpu_seconds_total"]
        # an operations figure, for admin keys only
        r = await client.get("/metrics", headers={"Authorization": f"Bearer {runtime}"})
        assert r.status_code == 403 and r.json()["field"] == "Authorization"
    assert not apps.tracebacks(), apps.tracebacks()
