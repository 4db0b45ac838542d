"""The delivery log API: filters, pages, attempts; replays of one event or of every failure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from tests import webhook_receiver
from tests.conftest import Api
from tests.webhook_receiver import (
    Endpoints,
    Receiver,
    Reply,
    eventually,
    exhaust_retries,
    statuses,
)

# the fixtures every webhook test uses
receiver = webhook_receiver.receiver
endpoints = webhook_receiver.endpoints

LOG = "/v1/webhook-deliveries"


async def settled(db: asyncpg.Connection, endpoint_id: int, n: int) -> None:
    async def probe() -> bool:
        found = await statuses(db, endpoint_id)
        return len(found) == n and "pending" not in found

    await eventually(probe)


async def test_the_log_filters_pages_and_shows_attempts(
        api: Api, endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    good = await endpoints.create(receiver, event_types=["webhook.test", "credits.granted"])
    bad = await endpoints.create(receiver, event_types=["webhook.test"])
    receiver.behaviours[bad["path"]] = lambda got: Reply(400, body=b"no thanks")
    events = [await endpoints.send_test(good["id"]) for _ in range(3)]
    failed_event = await endpoints.send_test(bad["id"])
    await settled(db, good["id"], 3)
    await eventually(lambda: _attempted(db, bad["id"], 1))
    await exhaust_retries(db, bad["id"])
    await settled(db, bad["id"], 1)

    mine = await api.call("GET", LOG, params={"endpoint_id": good["id"]})
    assert [d["event_id"] for d in mine["data"]] == events[::-1]  # newest first
    first = mine["data"][-1]
    assert (first["status"], first["event_type"], first["attempt_count"]) == \
        ("delivered", "webhook.test", 1)
    [attempt] = first["attempts"]
    assert (attempt["status_code"], attempt["attempt"], attempt["response_excerpt"]) == \
        (200, 1, '{"ok": true}')
    assert first["delivered_at"] is not None and first["next_attempt_at"] is None

    pages: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"endpoint_id": good["id"], "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = await api.call("GET", LOG, params=params)
        pages += page["data"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [d["event_id"] for d in pages] == events[::-1]

    by_event = await api.call("GET", LOG, params={"event_id": events[1]})
    assert [d["endpoint_id"] for d in by_event["data"]] == [good["id"]]
    failed = await api.call("GET", LOG, params={"status": "failed", "endpoint_id": bad["id"]})
    [row] = failed["data"]
    assert (row["event_id"], row["last_status"], row["last_error"]) == \
        (failed_event, 400, "answered 400")
    assert row["attempts"][0]["response_excerpt"] == "no thanks"
    typed = await api.call("GET", LOG, params={"event_type": "credits.granted",
                                               "endpoint_id": good["id"]})
    assert typed["data"] == []
    one = await api.call("GET", f"{LOG}/{row['id']}")
    assert one == row
    event = await api.call("GET", f"/v1/webhook-events/{failed_event}")
    assert event["type"] == "webhook.test" and event["payload"]["data"]["endpoint_id"] == bad["id"]


async def test_replay_one_event_to_every_endpoint_or_to_one(
        api: Api, endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    hooks = [await endpoints.create(receiver, event_types=["credits.granted"]) for _ in range(2)]
    n = await api.setup()
    await api.grant(n["account"], "3.00")
    for hook in hooks:
        await settled(db, hook["id"], 1)
    event_id = (await webhook_receiver.delivery_rows(db, hooks[0]["id"]))[0]["event_id"]

    replayed = await api.call("POST", f"/v1/webhook-events/{event_id}/replay", json={})
    assert sorted(d["endpoint_id"] for d in replayed["deliveries"]) == \
        sorted(h["id"] for h in hooks)
    assert {d["status"] for d in replayed["deliveries"]} == {"pending"}
    for hook in hooks:
        await eventually(lambda hook=hook: _received(receiver, hook["path"], event_id, 2))
        await settled(db, hook["id"], 1)

    # to an endpoint created after the event: a new delivery for it alone
    late = await endpoints.create(receiver, event_types=["balance.low"])
    replayed = await api.call("POST", f"/v1/webhook-events/{event_id}/replay",
                              json={"endpoint_id": late["id"]})
    assert [d["endpoint_id"] for d in replayed["deliveries"]] == [late["id"]]
    await eventually(lambda: _received(receiver, late["path"], event_id, 1))
    got = receiver.at(late["path"])[0]
    assert got.verified_with == [late["secret"]]
    assert got.body == receiver.at(hooks[0]["path"])[0].body  # the same payload, byte for byte

    await api.call("PATCH", f"/v1/webhook-endpoints/{late['id']}", json={"enabled": False})
    response = await api.client.post(f"/v1/webhook-events/{event_id}/replay",
                                     json={"endpoint_id": late["id"]}, headers=api.admin)
    assert response.status_code == 409 and response.json()["field"] == "endpoint_id"
    response = await api.client.post(f"/v1/webhook-events/{event_id}/replay",
                                     json={"endpoint_id": 999999999}, headers=api.admin)
    assert response.status_code == 422 and response.json()["field"] == "endpoint_id"


async def _received(receiver: Receiver, path: str, event_id: str, n: int) -> bool:
    return sum(r.webhook_id == event_id for r in receiver.at(path)) >= n


async def test_replay_every_failure_since_a_time(
        api: Api, endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    hook = await endpoints.create(receiver, event_types=["webhook.test"])
    receiver.behaviours[hook["path"]] = lambda got: Reply(503)
    old = await endpoints.send_test(hook["id"])
    new = [await endpoints.send_test(hook["id"]) for _ in range(2)]
    await eventually(lambda: _attempted(db, hook["id"], 3))
    await db.execute("UPDATE webhook_events SET created_at = now() - interval '2 days' WHERE id = $1",
                     old)
    await exhaust_retries(db, hook["id"])
    await settled(db, hook["id"], 3)
    assert set(await statuses(db, hook["id"])) == {"failed"}

    receiver.behaviours[hook["path"]] = lambda got: Reply(200)
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    # every endpoint's failures (other tests' too, if any): at least our two
    assert (await api.call("POST", f"{LOG}/replay-failed", json={"since": since}))["replayed"] >= 2

    async def two_delivered() -> bool:
        return sorted(await statuses(db, hook["id"])) == ["delivered", "delivered", "failed"]

    await eventually(two_delivered)
    delivered = await api.call("GET", LOG, params={"endpoint_id": hook["id"], "status": "delivered"})
    assert sorted(d["event_id"] for d in delivered["data"]) == sorted(new)
    # a replayed delivery starts the schedule over but keeps its history
    assert [a["status_code"] for a in delivered["data"][0]["attempts"]] == [503, 503, 200]


async def _attempted(db: asyncpg.Connection, endpoint_id: int, n: int) -> bool:
    return len(await webhook_receiver.attempt_rows(db, endpoint_id)) >= n


async def test_events_past_the_retention_go_with_their_log_unless_a_delivery_is_pending(
        api: Api, app: Any, endpoints: Endpoints, receiver: Receiver,
        db: asyncpg.Connection) -> None:
    from dataclasses import replace

    from app.webhooks.service import purge_old

    good = await endpoints.create(receiver, event_types=["webhook.test"])
    bad = await endpoints.create(receiver, event_types=["webhook.test"])
    receiver.behaviours[bad["path"]] = lambda got: Reply(500)
    delivered, pending, recent = [await endpoints.send_test(good["id"]) for _ in range(3)]
    failed = await endpoints.send_test(bad["id"])
    await settled(db, good["id"], 3)
    await eventually(lambda: _attempted(db, bad["id"], 1))
    await exhaust_retries(db, bad["id"])
    await settled(db, bad["id"], 1)
    # one delivery is retrying again (as after replay-failed), due tomorrow
    await db.execute("""UPDATE webhook_deliveries SET status = 'pending',
                        next_attempt_at = now() + interval '1 day' WHERE event_id = $1""", pending)
    old = [delivered, pending, failed]
    ctx = app.state.ctx
    await db.execute("""UPDATE webhook_events SET created_at = now() - make_interval(days => $2)
                        - interval '1 minute' WHERE id = ANY($1)""",
                     old, ctx.settings.webhook_retention_d)

    async def kept(table: str, column: str) -> set[str]:
        rows = await db.fetch(f"SELECT DISTINCT {column} AS id FROM {table} WHERE {column} = ANY($1)",
                              [*old, recent])
        return {r["id"] for r in rows}

    assert await purge_old(ctx.pool, replace(ctx.settings, webhook_retention_d=0)) == 0
    assert await kept("webhook_events", "id") == {*old, recent}
    # (the app's own workers purge too, and may have been first: the rows tell)
    await purge_old(ctx.pool, ctx.settings)
    assert await kept("webhook_events", "id") == {pending, recent}
    assert await kept("webhook_deliveries", "event_id") == {pending, recent}
    attempts = await db.fetch(
        """SELECT DISTINCT d.event_id FROM webhook_attempts a
           JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.endpoint_id = ANY($1)""",
        [good["id"], bad["id"]])
    assert {r["event_id"] for r in attempts} == {pending, recent}
    mine = await api.call("GET", LOG, params={"endpoint_id": good["id"]})
    assert [d["event_id"] for d in mine["data"]] == [recent, pending]
