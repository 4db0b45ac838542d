"""Receivers that fail: retries on the schedule or as Retry-After says, 410 and five failing
days disable the endpoint (and say so), and no receiver stalls the others."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import asyncpg
import httpx
import pytest

from app.webhooks.dispatcher import (
    DispatchConfig,
    Job,
    Outcome,
    attempt,
    parse_retry_after,
    retry_in,
)
from tests import webhook_receiver
from tests.conftest import Api
from tests.webhook_receiver import (
    Endpoints,
    Receiver,
    Reply,
    attempt_rows,
    delivery_rows,
    eventually,
    exhaust_retries,
    make_due,
    statuses,
)

# the fixtures every webhook test uses
receiver = webhook_receiver.receiver
endpoints = webhook_receiver.endpoints


async def endpoint(db: asyncpg.Connection, endpoint_id: int) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1", endpoint_id)
    assert row is not None
    return row


async def attempted(db: asyncpg.Connection, endpoint_id: int, n: int = 1) -> None:
    async def probe() -> bool:
        rows = await delivery_rows(db, endpoint_id)
        settled = len(await attempt_rows(db, endpoint_id))
        return settled >= n and all(r["attempts"] == 0 or r["last_error"] is not None
                                    or r["status"] != "pending" for r in rows)

    await eventually(probe)


def disabled_events(receiver: Receiver, path: str, endpoint_id: int) -> list[dict[str, object]]:
    found = [json.loads(r.body) for r in receiver.at(path)]
    return [e for e in found if e["type"] == "webhook_endpoint.disabled"
            and e["data"]["endpoint_id"] == endpoint_id]


async def test_410_disables_the_endpoint_at_once_and_says_so(
        api: Api, endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    watcher = await endpoints.create(receiver, event_types=["webhook_endpoint.disabled"])
    gone = await endpoints.create(receiver, event_types=["webhook.test"])
    receiver.behaviours[gone["path"]] = lambda got: Reply(410, body=b"gone")
    for _ in range(3):
        await endpoints.send_test(gone["id"])

    async def reported() -> bool:
        return len(disabled_events(receiver, watcher["path"], gone["id"])) == 1

    await eventually(reported)
    row = await endpoint(db, gone["id"])
    assert (row["enabled"], row["disabled_reason"]) == (False, "the receiver answered 410 Gone")
    assert "pending" not in await statuses(db, gone["id"])
    [event] = disabled_events(receiver, watcher["path"], gone["id"])
    assert event["data"]["reason"] == "gone"  # type: ignore[index]
    assert (await api.client.post(f"/v1/webhook-endpoints/{gone['id']}/test",
                                  headers=api.admin)).status_code == 409


async def test_failing_for_five_days_disables_the_endpoint_and_says_so(
        endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    watcher = await endpoints.create(receiver, event_types=["webhook_endpoint.disabled"])
    failing = await endpoints.create(receiver, event_types=["webhook.test"])
    receiver.behaviours[failing["path"]] = lambda got: Reply(500)
    await endpoints.send_test(failing["id"])
    await attempted(db, failing["id"])
    await eventually(lambda: _streak(db, failing["id"]))  # recorded just after the attempt
    assert (await endpoint(db, failing["id"]))["enabled"]
    # four days in: still enabled after another failure
    await db.execute("UPDATE webhook_endpoints SET failing_since = now() - interval '4 days' "
                     "WHERE id = $1", failing["id"])
    await make_due(db, failing["id"])
    await attempted(db, failing["id"], 2)
    assert (await endpoint(db, failing["id"]))["enabled"]
    # five days and a minute: the next failure disables it
    await db.execute("UPDATE webhook_endpoints SET failing_since = now() - interval '5 days 1 minute' "
                     "WHERE id = $1", failing["id"])
    await make_due(db, failing["id"])

    async def reported() -> bool:
        return len(disabled_events(receiver, watcher["path"], failing["id"])) == 1

    await eventually(reported)
    row = await endpoint(db, failing["id"])
    assert (row["enabled"], row["disabled_reason"]) == (False, "every attempt failed for 5 days")
    assert await statuses(db, failing["id"]) == ["cancelled"]
    [event] = disabled_events(receiver, watcher["path"], failing["id"])
    assert event["data"]["reason"] == "failing"  # type: ignore[index]


async def test_a_success_ends_the_failing_streak(endpoints: Endpoints, receiver: Receiver,
                                                 db: asyncpg.Connection) -> None:
    answers = iter([500, 200])
    hook = await endpoints.create(receiver, event_types=["webhook.test"])
    receiver.behaviours[hook["path"]] = lambda got: Reply(next(answers))
    await endpoints.send_test(hook["id"])
    await attempted(db, hook["id"])
    await eventually(lambda: _streak(db, hook["id"]))
    await make_due(db, hook["id"])

    async def delivered() -> bool:
        return await statuses(db, hook["id"]) == ["delivered"]

    await eventually(delivered)
    await eventually(lambda: _no_streak(db, hook["id"]))


async def _no_streak(db: asyncpg.Connection, endpoint_id: int) -> bool:
    return (await endpoint(db, endpoint_id))["failing_since"] is None


async def _streak(db: asyncpg.Connection, endpoint_id: int) -> bool:
    return (await endpoint(db, endpoint_id))["failing_since"] is not None


async def next_attempt_in(db: asyncpg.Connection, endpoint_id: int) -> float:
    [row] = await delivery_rows(db, endpoint_id)
    assert row["status"] == "pending"
    now = await db.fetchval("SELECT now()")
    return float((row["next_attempt_at"] - now).total_seconds())


@pytest.mark.parametrize(("header", "expect_s"), [
    ("3600", 3600), ("120", 120),
    ("<HTTP-date in 2 hours>", 7200),  # written when the test runs, not when it is collected
    ("999999999", 36000),  # capped at 10 hours
])
async def test_retry_after_is_honoured(endpoints: Endpoints, receiver: Receiver,
                                       db: asyncpg.Connection, header: str, expect_s: int) -> None:
    if header.startswith("<"):
        header = format_datetime(datetime.now(UTC) + timedelta(hours=2), usegmt=True)
    hook = await endpoints.create(receiver, event_types=["webhook.test"])
    receiver.behaviours[hook["path"]] = lambda got: Reply(503, {"Retry-After": header})
    await endpoints.send_test(hook["id"])
    await attempted(db, hook["id"])
    assert abs(await next_attempt_in(db, hook["id"]) - expect_s) < 15
    [row] = await attempt_rows(db, hook["id"])
    assert row["status_code"] == 503


async def test_without_retry_after_the_first_retry_waits_about_5_s(
        endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    hook = await endpoints.create(receiver, event_types=["webhook.test"])
    receiver.behaviours[hook["path"]] = lambda got: Reply(429)
    await endpoints.send_test(hook["id"])
    await attempted(db, hook["id"])
    assert 3.5 <= await next_attempt_in(db, hook["id"]) <= 5.5  # 5 s +-10%, minus elapsed


async def test_after_the_last_retry_the_delivery_fails_and_replay_starts_over(
        api: Api, endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    hook = await endpoints.create(receiver, event_types=["webhook.test"])
    receiver.behaviours[hook["path"]] = lambda got: Reply(500)
    event = await endpoints.send_test(hook["id"])
    await attempted(db, hook["id"])
    await exhaust_retries(db, hook["id"])

    async def failed() -> bool:
        return await statuses(db, hook["id"]) == ["failed"]

    await eventually(failed)
    [row] = await delivery_rows(db, hook["id"])
    assert (row["attempts"], row["last_status"], row["last_error"]) == (2, 500, "answered 500")

    receiver.behaviours[hook["path"]] = lambda got: Reply(204, body=b"")
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    replayed = await api.call("POST", "/v1/webhook-deliveries/replay-failed",
                              json={"since": since, "endpoint_id": hook["id"]})
    assert replayed == {"replayed": 1}

    async def delivered() -> bool:
        return await statuses(db, hook["id"]) == ["delivered"]

    await eventually(delivered)
    log = await api.call("GET", "/v1/webhook-deliveries", params={"event_id": event})
    assert [a["status_code"] for a in log["data"][0]["attempts"]] == [500, 500, 204]


async def test_no_receiver_stalls_the_others(
        api: Api, endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    behaviours = {
        "slow": lambda got: Reply(200, delay_s=60),
        "garbage": lambda got: Reply(raw=b"\x00\xff\xfeNOT HTTP AT ALL\r\n\r\n" * 100),
        "redirect": lambda got: Reply(302, {"Location": receiver.url("/redirected")}),
        "huge": lambda got: Reply(200, endless=0.0),
        "trickle": lambda got: Reply(500, endless=0.4),
        "huge_error": lambda got: Reply(500, body=b"E" * 5_000_000),
    }
    hooks = {}
    for name, behaviour in behaviours.items():
        hooks[name] = await endpoints.create(receiver, f"/{name}", event_types=["webhook.test"])
        receiver.behaviours[f"/{name}"] = behaviour
    for _ in range(30):  # more than the slow endpoint may have in flight
        await endpoints.send_test(hooks["slow"]["id"])
    for name in behaviours:
        if name != "slow":
            await endpoints.send_test(hooks[name]["id"])
    ok = await endpoints.create(receiver, "/ok", event_types=["webhook.test"])
    started = time.monotonic()
    await endpoints.send_test(ok["id"])
    await eventually(lambda: _received(receiver, "/ok"), within=3)
    assert time.monotonic() - started < 1.5

    async def settled(name: str) -> asyncpg.Record:
        async def probe() -> bool:
            return bool(await attempt_rows(db, hooks[name]["id"]))

        await eventually(probe, within=5)
        return (await attempt_rows(db, hooks[name]["id"]))[0]

    garbage = await settled("garbage")
    assert garbage["status_code"] is None and "RemoteProtocolError" in garbage["error"]
    redirect = await settled("redirect")
    assert (redirect["status_code"], redirect["error"]) == (302, "redirects are not followed")
    assert receiver.at("/redirected") == []
    huge = await settled("huge")
    assert huge["status_code"] == 200 and len(huge["response_excerpt"]) == 1024
    assert huge["latency_ms"] < 2_000 and await statuses(db, hooks["huge"]["id"]) == ["delivered"]
    trickle = await settled("trickle")
    assert trickle["status_code"] == 500 and trickle["latency_ms"] < 3_000
    huge_error = await settled("huge_error")
    assert huge_error["response_excerpt"] == "E" * 1024
    # the per-endpoint cap: the slow receiver holds 10 requests, the others still had slots
    assert 0 < len(receiver.at("/slow")) <= 10


async def _received(receiver: Receiver, path: str) -> bool:
    return bool(receiver.at(path))


def _job(url: str, nth: int = 1) -> Job:
    return Job(1, nth, 0, 1, "evt_x", '{"type": "webhook.test"}', url, True,
               ["whsec_" + "A" * 44])


async def test_an_attempt_ends_at_its_deadline(receiver: Receiver) -> None:
    receiver.behaviours["/slow"] = lambda got: Reply(200, delay_s=30)
    receiver.behaviours["/slow-body"] = lambda got: Reply(200, endless=5)
    config = DispatchConfig(timeout_s=0.5, excerpt_wait_s=0.3)
    async with httpx.AsyncHTTPTransport() as client:
        started = time.monotonic()
        slow = await attempt(client, _job(receiver.url("/slow")), config)
        assert (slow.kind, slow.status_code) == ("failed", None)
        assert slow.error == "no complete answer within 0.5 s" and 450 <= slow.latency_ms < 1_500
        body = await attempt(client, _job(receiver.url("/slow-body")), config)
        assert (body.kind, body.status_code, len(body.excerpt or "")) == ("delivered", 200, 1024)
        assert time.monotonic() - started < 3


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after("Thu, 01 Jan 2026 00:10:00 GMT", now) == 600
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now) == 0  # in the past
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None
    assert parse_retry_after("-5", now) is None


def test_retry_schedule_with_jitter() -> None:
    config = DispatchConfig()
    rng = random.Random(1)

    def wait(nth: int, retry_after: float | None = None) -> float | None:
        outcome = Outcome(_job("http://x", nth), "failed", datetime.now(UTC),
                          retry_after_s=retry_after)
        return retry_in(outcome, config, rng)

    expected = [5, 300, 1800, 7200, 18000, 36000, 36000]
    for nth, base in enumerate(expected, start=1):
        delay = wait(nth)
        assert delay is not None and base * 0.9 <= delay <= base * 1.1
    assert wait(8) is None  # 8 attempts in all, then failed
    assert wait(8, retry_after=10) is None
    assert wait(1, retry_after=0) == 1 and wait(1, retry_after=10**9) == 36000
    assert len({wait(1) for _ in range(20)}) > 1  # jittered
