"""`GET /metrics` (app/metrics.py): a real app process's figures in the Prometheus text format,
moving with what the process does."""

from __future__ import annotations

import asyncio
import re
import uuid
from decimal import Decimal

import httpx

from app.observe import BUCKETS
from app.settings import Settings
from tests.conftest import Api, now_iso
from tests.procs import call_as, run_apps
from tests.test_balance_stream import stream
from tests.test_rating_config import meter

LINE = re.compile(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"(?:,|$)')


def sample(name: str, **labels: str) -> str:
    """A sample's key in `scrape`'s answer: the name, then its labels sorted."""
    return name + "".join(f"|{k}={v}" for k, v in sorted(labels.items()))


async def scrape(client: httpx.AsyncClient, admin: str) -> dict[str, Decimal]:
    """Every sample of the exposition, keyed by `sample(name, **labels)`."""
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
        labels = dict(LABEL.findall(found[2] or ""))
        assert found[2] is None or LABEL.sub("", found[2]) == "", line
        key = sample(found[1], **labels)
        assert key not in values, f"sample twice: {line}"
        values[key] = Decimal(found[3])
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


def moved(before: dict[str, Decimal], after: dict[str, Decimal], prefix: str) -> dict[str, Decimal]:
    """How far each sample whose key starts with `prefix` moved between two scrapes."""
    return {k: v - before.get(k, Decimal(0)) for k, v in after.items()
            if k.startswith(prefix) and v != before.get(k, Decimal(0))}


async def test_requests_and_runtime_outcomes_are_counted(
        api: Api, settings: Settings, keys: dict[str, str]) -> None:
    n = await api.setup()
    meter_code = await meter(api)  # the account has no plan: its measurements are unrated
    account, admin, runtime = n["account"], keys["admin"], keys["runtime"]
    check, usage = "/v1/check", "/v1/usage"
    async with run_apps(settings, 1) as apps, apps[0].client() as client:
        await call_as(client, admin, "POST", f"/v1/accounts/{account}/grants",
                      json={"amount": "1.00"})
        before = await scrape(client, admin)
        for amount in ("0.50", "0.50", "5.00"):  # ok twice (the second from memory), then short
            await call_as(client, runtime, "POST", check,
                          json={"account": account, "product": n["api"], "amount": amount})
        await call_as(client, runtime, "POST", check, json={"account": "nobody", "product": "x"})
        await call_as(client, runtime, "POST", check, json={
            "account": account, "product": n["api"], "amount": "0.10", "consume": True,
            "idempotency_key": uuid.uuid4().hex})
        event = {"uid": uuid.uuid4().hex, "account": account, "product": n["api"],
                 "amount": "0.10", "timestamp": now_iso()}
        await call_as(client, runtime, "POST", usage, json=event)
        await call_as(client, runtime, "POST", usage, json=event)  # a duplicate
        rejected = await client.post(usage, headers={"Authorization": f"Bearer {runtime}"},
                                     json={**event, "uid": "x", "amount": "-1"})
        assert rejected.status_code == 422 and rejected.json()["field"] == "amount"
        await call_as(client, runtime, "POST", usage, json={"events": [
            {**event, "uid": uuid.uuid4().hex}, {**event, "uid": uuid.uuid4().hex},
            {**event, "uid": uuid.uuid4().hex, "product": "nothing"}]})
        measurement = {"uid": uuid.uuid4().hex, "account": account, "meter": meter_code,
                       "timestamp": now_iso(), "data": {"gb": 1, "files": 1, "seconds": 1}}
        await call_as(client, runtime, "POST", "/v1/measurements", json={"measurements": [
            measurement, measurement, {**measurement, "uid": uuid.uuid4().hex, "meter": "none"}]})
        missing = await client.get("/v1/accounts/nobody/balances",
                                   headers={"Authorization": f"Bearer {runtime}"})
        assert missing.status_code == 404
        after = await scrape(client, admin)

    def route(method: str, path: str, code: int) -> str:
        return sample("creditgate_http_requests_total", method=method, route=path, code=str(code))

    assert moved(before, after, "creditgate_http_requests_total") == {
        route("POST", check, 200): 5, route("POST", usage, 200): 3, route("POST", usage, 422): 1,
        route("POST", "/v1/measurements", 200): 1,
        route("GET", "/v1/accounts/{code}/balances", 404): 1,
        route("GET", "/metrics", 200): 1}  # the first scrape: counted once it was answered
    assert moved(before, after, "creditgate_checks_total") == {
        sample("creditgate_checks_total", reason="ok", consume="false"): 2,
        sample("creditgate_checks_total", reason="insufficient_balance", consume="false"): 1,
        sample("creditgate_checks_total", reason="unknown_account", consume="false"): 1,
        sample("creditgate_checks_total", reason="ok", consume="true"): 1}
    assert moved(before, after, "creditgate_usage_events_total") == {
        sample("creditgate_usage_events_total", status="accepted"): 3,
        sample("creditgate_usage_events_total", status="duplicate"): 1,
        sample("creditgate_usage_events_total", status="rejected"): 2}
    assert moved(before, after, "creditgate_measurements_total") == {
        sample("creditgate_measurements_total", status="unrated"): 1,
        sample("creditgate_measurements_total", status="duplicate"): 1,
        sample("creditgate_measurements_total", status="rejected"): 1}
    # the histogram of the check route: cumulative, every request in it, time spent
    hist = "creditgate_http_request_duration_seconds"
    labels = {"method": "POST", "route": check}
    counts = [after[sample(hist + "_bucket", **labels, le=le)] for le in (*BUCKETS, "+Inf")]
    assert counts == sorted(counts)
    assert counts[-1] == after[sample(hist + "_count", **labels)] == \
        sum(v for k, v in after.items() if k.startswith(sample("creditgate_http_requests_total"))
            and f"|route={check}" in k)
    assert 0 < after[sample(hist + "_sum", **labels)] < counts[-1] * 10
    assert not apps.tracebacks(), apps.tracebacks()


async def test_nothing_is_counted_when_request_metrics_are_off(
        api: Api, settings: Settings, keys: dict[str, str]) -> None:
    n = await api.setup()
    async with run_apps(settings, 1, env={"CREDITGATE_REQUEST_METRICS": "0"}) as apps, \
            apps[0].client() as client:
        await call_as(client, keys["runtime"], "POST", "/v1/check",
                      json={"account": n["account"], "product": n["api"]})
        values = await scrape(client, keys["admin"])
        values = await scrape(client, keys["admin"])
    assert values[sample("creditgate_postgres_up")] == 1
    assert not [k for k in values if k.startswith(("creditgate_http_", "creditgate_checks_"))]
