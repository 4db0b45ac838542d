"""Deliveries to a real HTTP receiver: signed per Standard Webhooks, retried, logged, at least
once and deduplicable by `webhook-id`."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
import svix.webhooks

from app.db import create_pool
from app.settings import Settings
from app.webhooks.dispatcher import DispatchConfig, Dispatcher
from app.webhooks.outbox import OutboxEvent, event_id, publish
from tests import webhook_receiver
from tests.conftest import Api
from tests.procs import free_port
from tests.webhook_receiver import (
    Endpoints,
    Received,
    Receiver,
    Reply,
    attempt_rows,
    delivery_rows,
    eventually,
    make_due,
    statuses,
)

# the fixtures every webhook test uses
receiver = webhook_receiver.receiver
endpoints = webhook_receiver.endpoints


async def all_settled(db: asyncpg.Connection, endpoint_id: int, n: int,
                      status: str = "delivered") -> bool:
    found = await statuses(db, endpoint_id)
    return len(found) == n and set(found) == {status}


def account_events(receiver: Receiver, path: str, account: str) -> list[Received]:
    return [r for r in receiver.at(path) if json.loads(r.body)["data"].get("account") == account]


async def test_every_delivery_is_signed_and_verifies(
        api: Api, endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    hook = await endpoints.create(receiver, event_types=["credits.granted", "balance.low",
                                                         "balance.depleted"])
    n = await api.setup()
    acct = n["account"]
    await api.call("PUT", f"/v1/accounts/{acct}/thresholds/{n['credit_type']}", json={"low": "5.00"})
    await api.grant(acct, "10.00")
    await api.usage(acct, n["api"], "6.00")
    await api.usage(acct, n["api"], "4.00")

    async def three() -> bool:
        return len(account_events(receiver, hook["path"], acct)) == 3

    await eventually(three)
    # sent concurrently, so in any order: receivers order them by the ledger sequence
    got = sorted(account_events(receiver, hook["path"], acct),
                 key=lambda r: json.loads(r.body)["data"]["sequence"])
    assert [json.loads(r.body)["type"] for r in got] == \
        ["credits.granted", "balance.low", "balance.depleted"]
    stored = {r["id"]: r["payload"] for r in await db.fetch(
        "SELECT id, payload::text FROM webhook_events WHERE id = ANY($1::text[])",
        [r.webhook_id for r in got])}
    for request in got:
        # verified by the receiver with the standardwebhooks package, with the endpoint's secret
        assert request.verified_with == [hook["secret"]]
        assert request.body.decode() == stored[request.webhook_id]  # the payload as stored
        assert request.headers["content-type"] == "application/json"
        assert abs(int(request.headers["webhook-timestamp"]) - request.at) < 5
        payload = json.loads(request.body)
        assert set(payload) == {"type", "timestamp", "data"} and payload["data"]["account"] == acct
    # and once with svix's verifier (it takes the same headers)
    svix.webhooks.Webhook(hook["secret"]).verify(got[0].body, got[0].headers)
    low = json.loads(got[1].body)["data"]
    assert (low["threshold"], low["available"]) == ("5.00", "4.00")

    async def logged() -> bool:
        return await all_settled(db, hook["id"], 3)

    await eventually(logged)
    for attempt in await attempt_rows(db, hook["id"]):
        assert (attempt["status_code"], attempt["attempt"], attempt["error"]) == (200, 1, None)
        assert attempt["response_excerpt"] == '{"ok": true}' and attempt["latency_ms"] >= 0


async def test_during_rotation_both_secrets_sign(
        api: Api, endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    hook = await endpoints.create(receiver, event_types=["webhook.test"])
    old = hook["secret"]
    new = (await api.call("POST", f"/v1/webhook-endpoints/{hook['id']}/secret/rotate"))["secret"]
    receiver.secrets[hook["path"]] = [old, new]
    await endpoints.send_test(hook["id"])
    await eventually(lambda: _count(receiver, hook["path"], 1))
    [during] = receiver.at(hook["path"])
    assert during.verified_with == [old, new]
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    svix.webhooks.Webhook(old).verify(during.body, during.headers)
    svix.webhooks.Webhook(new).verify(during.body, during.headers)

    # after the overlap only the new secret signs
    await db.execute("UPDATE webhook_endpoints SET previous_secret_expires_at = now() "
                     "WHERE id = $1", hook["id"])
    await endpoints.send_test(hook["id"])
    await eventually(lambda: _count(receiver, hook["path"], 2))
    after = receiver.at(hook["path"])[1]
    assert after.verified_with == [new]
    assert len(after.headers["webhook-signature"].split(" ")) == 1


async def _count(receiver: Receiver, path: str, n: int) -> bool:
    return len(receiver.at(path)) >= n


async def test_receiver_down_then_up_delivers_each_event_once_per_endpoint(
        api: Api, endpoints: Endpoints, db: asyncpg.Connection) -> None:
    port = free_port()
    down = Receiver(port)  # not started: connections are refused
    hooks = [await endpoints.create(down, event_types=["credits.granted"]) for _ in range(2)]
    n = await api.setup()
    for _ in range(5):
        await api.grant(n["account"], "1.00")

    async def all_failed_once() -> bool:
        for hook in hooks:
            rows = await delivery_rows(db, hook["id"])
            if len(rows) != 5 or any(r["last_error"] is None or r["status"] != "pending"
                                     for r in rows):
                return False
        return True

    await eventually(all_failed_once)
    first = await attempt_rows(db, hooks[0]["id"])
    assert first[0]["status_code"] is None and "ConnectError" in first[0]["error"]

    up = Receiver(port)
    up.secrets = down.secrets
    await up.start()
    try:
        for hook in hooks:
            await make_due(db, hook["id"])

        async def delivered() -> bool:
            return all([await all_settled(db, hook["id"], 5) for hook in hooks])

        await eventually(delivered)
        for hook in hooks:
            rows = await delivery_rows(db, hook["id"])
            ids = {r["event_id"] for r in rows}
            assert len(ids) == 5
            got = up.at(hook["path"])
            assert {r.webhook_id for r in got} == ids and all(r.verified_with for r in got)
            successes = Counter(a["event_id"] for a in await attempt_rows(db, hook["id"])
                                if a["status_code"] == 200)
            assert successes == Counter({event: 1 for event in ids})
    finally:
        await up.stop()


async def test_a_lost_answer_is_sent_again_with_the_same_webhook_id(
        endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    seen: set[str] = set()

    def fail_first(got: Received) -> Reply:
        if got.webhook_id in seen:
            return Reply(200)
        seen.add(got.webhook_id)
        return Reply(500, body=b"oops")  # as if the answer to a processed request were lost

    hook = await endpoints.create(receiver, event_types=["webhook.test"])
    receiver.behaviours[hook["path"]] = fail_first
    sent = await endpoints.send_test(hook["id"])

    async def retried() -> bool:
        await make_due(db, hook["id"])
        return await all_settled(db, hook["id"], 1)

    await eventually(retried)
    first, second = receiver.at(hook["path"])
    assert first.webhook_id == second.webhook_id == sent and first.body == second.body
    assert [(a["attempt"], a["status_code"], a["response_excerpt"])
            for a in await attempt_rows(db, hook["id"])] == [(1, 500, "oops"),
                                                             (2, 200, '{"ok": true}')]


async def test_two_dispatchers_never_send_the_same_attempt_twice(
        settings: Settings, endpoints: Endpoints, receiver: Receiver,
        db: asyncpg.Connection) -> None:
    async def jittery(got: Received) -> Reply:
        await asyncio.sleep(random.uniform(0, 0.01))
        return Reply(200)

    hooks = [await endpoints.create(receiver, event_types=["payment.succeeded"]) for _ in range(2)]
    for hook in hooks:
        receiver.behaviours[hook["path"]] = jittery
    pool = await create_pool(settings.database_url, 6)
    config = DispatchConfig(concurrency=20, per_endpoint=10, poll_s=0.01, max_claim=7)
    dispatchers = [Dispatcher(pool, config) for _ in range(2)]
    for dispatcher in dispatchers:
        dispatcher.start()
    try:
        now = datetime.now(UTC)
        batch = uuid.uuid4().hex
        events = [OutboxEvent(event_id("test-two", batch, i), "payment.succeeded", None, None, now,
                              {"n": i}) for i in range(300)]
        for start in range(0, 300, 50):  # committed while the dispatchers run
            async with pool.acquire() as conn, conn.transaction():
                await publish(conn, events[start:start + 50])

        async def delivered() -> bool:
            return all([await all_settled(db, hook["id"], 300) for hook in hooks])

        await eventually(delivered, within=30)
    finally:
        for dispatcher in dispatchers:
            await dispatcher.stop()
        await pool.close()
    print("attempts per dispatcher", [d.attempts_made for d in dispatchers])
    assert all(d.attempts_made > 0 for d in dispatchers)
    for hook in hooks:
        sends = Counter(r.webhook_id for r in receiver.at(hook["path"]))
        assert set(sends) == {e.id for e in events} and set(sends.values()) == {1}
        attempts = Counter(a["delivery_id"] for a in await attempt_rows(db, hook["id"]))
        assert len(attempts) == 300 and set(attempts.values()) == {1}


async def test_concurrent_claims_are_disjoint(settings: Settings, endpoints: Endpoints,
                                              receiver: Receiver, db: asyncpg.Connection) -> None:
    from app.webhooks import repository as repo

    # a receiver that holds on: the app's own dispatcher may take a few, and keeps them
    hook = await endpoints.create(receiver, event_types=["webhook.test"])
    receiver.behaviours[hook["path"]] = lambda got: Reply(200, delay_s=30)
    ids = []
    async with db.transaction():  # queued, but not due yet
        for i in range(300):
            e = OutboxEvent(event_id("claims", uuid.uuid4(), i), "webhook.test", None, None,
                            datetime.now(UTC), {})
            ids.append(await repo.insert_event_for(db, e, hook["id"]))
        await db.execute("UPDATE webhook_deliveries SET next_attempt_at = now() + interval '1 day' "
                         "WHERE id = ANY($1::int8[])", ids)
    pool = await create_pool(settings.database_url, 8)
    try:
        # due all at once, then eight claimers race
        await db.execute("UPDATE webhook_deliveries SET next_attempt_at = now() "
                         "WHERE id = ANY($1::int8[])", ids)

        ours = set(ids)
        done = asyncio.Event()

        async def claimer() -> list[int]:
            mine: list[int] = []
            while not done.is_set():
                rows = await repo.claim(pool, 5, [], [], [], 5, timedelta(minutes=5))
                mine += [r["id"] for r in rows if r["id"] in ours]
                await asyncio.sleep(0)
            return mine

        async def all_claimed() -> bool:
            return not await db.fetchval(
                "SELECT count(*) FROM webhook_deliveries WHERE id = ANY($1::int8[]) "
                "AND attempts = 0", ids)

        racing = asyncio.gather(*(claimer() for _ in range(8)))
        try:
            await eventually(all_claimed, within=20)
        finally:
            done.set()
            claimed = [i for batch in await racing for i in batch]
    finally:
        await pool.close()
    assert len(claimed) == len(set(claimed)) > 0
    # every delivery was claimed exactly once: by one of the eight or by the app's dispatcher
    counts = {r["id"]: r["attempts"] for r in await db.fetch(
        "SELECT id, attempts FROM webhook_deliveries WHERE id = ANY($1::int8[])", ids)}
    assert set(counts.values()) == {1}


async def test_a_claim_left_by_a_dead_dispatcher_is_sent_after_its_lease(
        settings: Settings, endpoints: Endpoints, receiver: Receiver,
        db: asyncpg.Connection) -> None:
    from app.webhooks import repository as repo
    from app.webhooks.dispatcher import Job, Outcome, record_attempts, settled_rows
    from app.webhooks.service import make_test_event

    hook = await endpoints.create(receiver, event_types=["webhook.test"])
    event = make_test_event(hook["id"])
    async with db.transaction():  # queued and claimed at once, as by a dispatcher that then died
        delivery = await repo.insert_event_for(db, event, hook["id"])
        await db.execute("UPDATE webhook_deliveries SET attempts = 1, "
                         "next_attempt_at = now() + interval '60 seconds' WHERE id = $1", delivery)
    await asyncio.sleep(1.0)
    assert receiver.at(hook["path"]) == []  # nobody else sends a claimed delivery
    await db.execute("UPDATE webhook_deliveries SET next_attempt_at = now() WHERE id = $1",
                     delivery)  # the lease runs out

    async def delivered() -> bool:
        return await statuses(db, hook["id"]) == ["delivered"]

    await eventually(delivered)
    [got] = receiver.at(hook["path"])
    assert got.webhook_id == event.id
    # the dead claim's outcome, arriving late, is logged but changes nothing
    job = Job(delivery, 1, 0, hook["id"], event.id, "{}", hook["url"], True, [])
    late = [Outcome(job, "failed", datetime.now(UTC), 10, 500, "answered 500")]
    await record_attempts(db, late, settled_rows(late, DispatchConfig(), random.Random()),
                          DispatchConfig())
    [row] = await delivery_rows(db, hook["id"])
    assert (row["status"], row["attempts"], row["last_status"]) == ("delivered", 2, 200)
    assert [(a["attempt"], a["status_code"]) for a in await attempt_rows(db, hook["id"])] == \
        [(2, 200), (1, 500)]
