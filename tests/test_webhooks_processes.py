"""Webhooks across real processes: events of a change survive `kill -9` of the app right after
the commit, `balance.low` fires once per crossing with two app processes debiting at once,
and the `creditgate webhooks` commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator

import asyncpg
import httpx

from app.settings import REPO_ROOT, Settings
from tests import webhook_receiver
from tests.conftest import Api
from tests.procs import run_apps
from tests.webhook_receiver import Endpoints, Received, Receiver, eventually

# the fixtures every webhook test uses
receiver = webhook_receiver.receiver
endpoints = webhook_receiver.endpoints


def of_account(receiver: Receiver, path: str, account: str, kind: str) -> list[Received]:
    return [r for r in receiver.at(path) if json.loads(r.body)["type"] == kind
            and json.loads(r.body)["data"].get("account") == account]


async def test_events_committed_right_before_a_kill_are_delivered(
        settings: Settings, keys: dict[str, str], endpoints: Endpoints, receiver: Receiver,
        db: asyncpg.Connection) -> None:
    hook = await endpoints.create(receiver, event_types=["credits.granted"])
    # the app process sends no webhooks itself: what it committed is delivered by another
    async with run_apps(settings, 1, env={"CREDITGATE_WEBHOOKS_DISPATCH": "0"},
                        prefix=settings.redis_prefix) as apps:
        async with apps[0].client() as client:
            api = Api(client, keys)
            n = await api.setup()
            granted = [await api.grant(n["account"], f"{i}.00") for i in (1, 2)]
            apps[0].kill()  # kill -9 right after the acknowledgement
    assert apps[0].killed

    async def both() -> bool:
        return len(of_account(receiver, hook["path"], n["account"], "credits.granted")) == 2

    await eventually(both)
    got = of_account(receiver, hook["path"], n["account"], "credits.granted")
    assert sorted(json.loads(r.body)["data"]["balance_id"] for r in got) == \
        sorted(g["id"] for g in granted)
    assert all(r.verified_with == [hook["secret"]] for r in got)


async def test_balance_low_fires_once_per_crossing_with_two_processes_debiting(
        settings: Settings, keys: dict[str, str], endpoints: Endpoints, receiver: Receiver,
        db: asyncpg.Connection) -> None:
    hook = await endpoints.create(receiver, event_types=["balance.low"])
    async with run_apps(settings, 2, prefix=settings.redis_prefix) as apps:
        async with apps[0].client() as c0, apps[1].client() as c1:
            a, b = Api(c0, keys), Api(c1, keys)
            n = await a.setup()
            acct, product = n["account"], n["api"]
            await b.call("PUT", f"/v1/accounts/{acct}/thresholds/{n['credit_type']}",
                         json={"low": "50.00"})
            await a.grant(acct, "100.00")

            async def debit(count: int) -> None:
                await asyncio.gather(*((a, b)[i % 2].usage(acct, product, "1.00")
                                       for i in range(count)))

            await debit(80)  # 100 -> 20: crosses 50 once
            await b.grant(acct, "40.00")  # 60: above the threshold again, re-armed
            await debit(30)  # 60 -> 30: the second crossing
            assert await a.available(acct) == "30.00"
        assert not apps.tracebacks()

    stored = await db.fetch(
        """SELECT e.id, e.payload FROM webhook_events e JOIN accounts a ON a.id = e.account_id
           WHERE a.code = $1 AND e.type = 'balance.low' ORDER BY e.sequence""", acct)
    assert len(stored) == 2

    async def both() -> bool:
        return len({r.webhook_id for r in of_account(receiver, hook["path"], acct,
                                                     "balance.low")}) == 2

    await eventually(both)
    got = of_account(receiver, hook["path"], acct, "balance.low")
    assert {r.webhook_id for r in got} == {r["id"] for r in stored}
    lows = [json.loads(r["payload"])["data"] for r in stored]
    assert [d["threshold"] for d in lows] == ["50.00", "50.00"]
    assert all(float(d["available"]) < 50 for d in lows)  # float-ok: comparing a test figure
    assert lows[0]["sequence"] < lows[1]["sequence"]


async def cli(settings: Settings, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "DATABASE_URL": settings.database_url,
           "CREDITGATE_MIGRATIONS_DIR": str(settings.migrations_dir), "PYTHONUNBUFFERED": "1"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from app.cli import main; raise SystemExit(main())", *args,
        cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


@contextlib.asynccontextmanager
async def watching(settings: Settings, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await cli(settings, "webhooks", "watch", "--interval", "0.1", *args)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def read_until(proc: asyncio.subprocess.Process, needle: str, within: float = 10) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(within):
        while not lines or needle not in lines[-1]:
            raw = await proc.stdout.readline()
            assert raw, f"the command ended; it printed {lines}"
            lines.append(raw.decode().rstrip())
    return lines


async def test_cli_send_test_and_watch(settings: Settings, endpoints: Endpoints,
                                       receiver: Receiver) -> None:
    hook = await endpoints.create(receiver, event_types=["credits.granted"])
    async with watching(settings, "--endpoint", str(hook["id"])) as watch:
        await read_until(watch, "watching deliveries to endpoint")
        sender = await cli(settings, "webhooks", "send-test", str(hook["id"]))
        out, err = await sender.communicate()
        assert sender.returncode == 0, err.decode()
        assert out.decode().startswith("queued evt_") and "(webhook.test)" in out.decode()
        event_id = out.decode().split()[1]
        lines = await read_until(watch, "HTTP 200")
    assert any("queued" in line and event_id in line for line in lines)
    assert f"{event_id}  webhook.test  endpoint {hook['id']}  HTTP 200" in lines[-1]
    assert lines[-1].endswith("-> delivered")
    [got] = receiver.at(hook["path"])  # to this endpoint only, whatever its event types
    assert got.webhook_id == event_id and got.verified_with == [hook["secret"]]

    missing = await cli(settings, "webhooks", "send-test", "999999999")
    _, err = await missing.communicate()
    assert missing.returncode == 1 and "no webhook endpoint 999999999" in err.decode()


async def test_the_app_serves_the_delivery_log_over_real_http(
        settings: Settings, keys: dict[str, str], endpoints: Endpoints, receiver: Receiver) -> None:
    hook = await endpoints.create(receiver, event_types=["webhook.test"])
    async with run_apps(settings, 1, prefix=settings.redis_prefix) as apps:
        async with httpx.AsyncClient(base_url=apps[0].url, headers={
                "Authorization": f"Bearer {keys['admin']}"}) as client:
            sent = (await client.post(f"/v1/webhook-endpoints/{hook['id']}/test")).json()

            async def delivered() -> bool:
                log = (await client.get("/v1/webhook-deliveries",
                                        params={"event_id": sent["event_id"]})).json()
                return bool(log["data"]) and log["data"][0]["status"] == "delivered"

            await eventually(delivered)
