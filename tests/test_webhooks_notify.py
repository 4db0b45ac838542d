"""Dispatchers hear of queued deliveries from Postgres (NOTIFY at the commit that queued them)
instead of polling for them; the idle poll only finds due retries, and stands in while the
notification connection is down."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import asyncpg

from app.db import create_pool
from app.settings import Settings
from app.webhooks.dispatcher import DispatchConfig, Dispatcher
from app.webhooks.outbox import CHANNEL, Nudger, OutboxEvent, event_id, publish
from tests import webhook_receiver
from tests.conftest import Api
from tests.webhook_receiver import Endpoints, Receiver, eventually

receiver = webhook_receiver.receiver
endpoints = webhook_receiver.endpoints


async def test_publishing_notifies_only_when_a_delivery_is_queued(
        settings: Settings, endpoints: Endpoints, receiver: Receiver,
        db: asyncpg.Connection) -> None:
    kind = "payment.failed"
    await endpoints.create(receiver, event_types=[kind])
    heard: list[tuple[int, str]] = []  # (the notifying backend, payload): other tests' too

    def hear(_conn: object, pid: int, _channel: str, payload: str) -> None:
        heard.append((pid, payload))

    await db.add_listener(CHANNEL, hear)
    pool = await create_pool(settings.database_url, 2)
    try:
        def event(type_: str) -> OutboxEvent:
            return OutboxEvent(event_id("notify", uuid.uuid4().hex), type_, None, None,
                               datetime.now(UTC), {})

        async with pool.acquire() as conn:
            pid = conn.get_server_pid()

            def ours() -> list[str]:
                return [payload for sender, payload in heard if sender == pid]

            first = event(kind)
            async with conn.transaction():
                await publish(conn, [first])
                await asyncio.sleep(0.3)
                assert ours() == []  # not before the commit
            await eventually(lambda: len(ours()) == 1)
            async with conn.transaction():
                # an event published before queues nothing: no notification
                await publish(conn, [first])
            rolled_back = conn.transaction()
            await rolled_back.start()
            await publish(conn, [event(kind)])
            await rolled_back.rollback()  # and one rolled back never notifies
            await conn.execute("SELECT pg_notify($1, 'marker')", CHANNEL)
            await eventually(lambda: "marker" in ours())
            assert ours() == ["", "marker"]
    finally:
        await db.remove_listener(CHANNEL, hear)
        await pool.close()


async def test_a_notification_wakes_an_idle_dispatcher_and_a_lost_connection_comes_back(
        settings: Settings, db: asyncpg.Connection) -> None:
    pool = await create_pool(settings.database_url, 2)
    # an idle poll of an hour, and a channel of its own (the session's app notifies on the
    # usual one): what it hears is this test's notifications only
    channel = f"test_{uuid.uuid4().hex[:8]}"
    dispatcher = Dispatcher(pool, DispatchConfig(poll_s=3600), listen_dsn=settings.database_url,
                            channel=channel)
    dispatcher.start()
    try:
        await eventually(lambda: dispatcher._listening and dispatcher.claims_made >= 1)
        claims = dispatcher.claims_made
        await db.execute("SELECT pg_notify($1, '')", channel)
        await eventually(lambda: dispatcher.notifications == 1)
        await eventually(lambda: dispatcher.claims_made > claims)  # and it claimed

        # its connection killed: it polls meanwhile, listens again, and hears again
        await db.execute(
            """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE query = $1 AND pid <> pg_backend_pid()""", f'LISTEN "{channel}"')
        await eventually(lambda: not dispatcher._listening)
        await eventually(lambda: dispatcher._listening, within=15)
        await asyncio.sleep(0.3)
        assert dispatcher.notifications == 1  # nothing sent meanwhile: nothing heard
        claims = dispatcher.claims_made
        await db.execute("SELECT pg_notify($1, '')", channel)
        await eventually(lambda: dispatcher.notifications == 2)
        await eventually(lambda: dispatcher.claims_made > claims)
    finally:
        await dispatcher.stop()
        await pool.close()


async def test_the_journal_notifies_after_committing_an_event(
        api: Api, endpoints: Endpoints, receiver: Receiver, db: asyncpg.Connection) -> None:
    """Usage that depletes a balance raises its event in the journal's flush, which notifies
    from a task after the commit (never inside the flush's transaction)."""
    hook = await endpoints.create(receiver, event_types=["balance.depleted"])
    heard: list[int] = []

    def hear(_conn: object, pid: int, _channel: str, _payload: str) -> None:
        heard.append(pid)

    await db.add_listener(CHANNEL, hear)
    try:
        n = await api.setup()
        await api.grant(n["account"], "1.00")
        await asyncio.sleep(0.2)
        before = len(heard)
        await api.usage(n["account"], n["api"], "1.00")
        await eventually(lambda: len(heard) > before)
        await eventually(lambda: any(json.loads(r.body)["data"].get("account") == n["account"]
                                     for r in receiver.at(hook["path"])))
    finally:
        await db.remove_listener(CHANNEL, hear)


async def test_commits_landing_while_a_nudge_waits_share_it(
        settings: Settings, db: asyncpg.Connection) -> None:
    pool = await create_pool(settings.database_url, 2)
    async with pool.acquire() as first, pool.acquire() as second:  # every connection it has
        pids = {first.get_server_pid(), second.get_server_pid()}
    heard: list[int] = []

    def hear(_conn: object, sender: int, _channel: str, _payload: str) -> None:
        if sender in pids:
            heard.append(sender)

    await db.add_listener(CHANNEL, hear)
    tasks: list[asyncio.Task[None]] = []
    try:
        nudger = Nudger(pool)
        for _ in range(10):  # ten flushes commit before the first nudge is sent: one nudge
            nudger.after_commit(lambda work: tasks.append(asyncio.create_task(work)))
        await asyncio.gather(*tasks)
        await eventually(lambda: len(heard) == 1)
        nudger.after_commit(lambda work: tasks.append(asyncio.create_task(work)))  # one more
        await asyncio.gather(*tasks)
        await eventually(lambda: len(heard) == 2)
        assert len(tasks) == 2
    finally:
        await db.remove_listener(CHANNEL, hear)
        await pool.close()
