"""A journal entry Postgres refuses (its request was answered with an error, the hot copy keeps
its effect, the sweeper fails on it every pass) is named by `creditgate journal stuck` with
Postgres's error, counted in /metrics, and taken out by `creditgate journal drop`: the root is
rebuilt from Postgres without it, and the event's uid may be sent again."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from app.settings import Settings
from tests.conftest import Api
from tests.journal_helpers import new_root, written
from tests.procs import cli


async def _metric(client: httpx.AsyncClient, api: Api, name: str) -> int:
    text = (await client.get("/metrics", headers=api.admin)).text
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


async def test_a_refused_entry_is_named_and_dropped_and_its_uid_can_come_again(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    root = await new_root(api, app, db)
    journal = root.ctx.journal
    refused = await root.refused(10)
    pending = await root.decided(5)  # committable, still in the journal
    assert Decimal(await api.available(root.code)) == Decimal("99.85")

    found = [s for s in await journal.stuck(0) if s.record.root_id == root.id]
    assert [s.record.stream_id for s in found] == [refused.stream_id]
    assert "out of range" in found[0].error
    # what could be committed was, on the way
    assert await written(db, pending, refused) == {pending.payload["uid"]: (1, -5),
                                                   refused.payload["uid"]: (0, 0)}

    assert await journal.drop(root.id, refused.stream_id) == ("dropped", refused)
    assert await root.ctx.hot.journal_entries(root.id, "+") == []
    # rebuilt from Postgres: the refused 0.10 is back, the committed 0.05 is not
    assert Decimal(await api.available(root.code)) == Decimal("99.95")
    assert [s for s in await journal.stuck(0) if s.record.root_id == root.id] == []
    # its uid was never committed: sent again, it is a new event, not a duplicate
    again = await api.usage(root.code, root.product, "0.10", uid=refused.payload["uid"])
    assert again["status"] == "accepted"
    assert await written(db, refused) == {refused.payload["uid"]: (1, -10)}
    assert Decimal(await api.available(root.code)) == Decimal("99.85")
    with pytest.raises(LookupError):
        await journal.drop(root.id, refused.stream_id)


async def test_drop_commits_an_entry_postgres_takes_instead(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    root = await new_root(api, app, db)
    pending = await root.decided(7)
    assert await root.ctx.journal.drop(root.id, pending.stream_id) == ("committed", pending)
    assert await written(db, pending) == {pending.payload["uid"]: (1, -7)}
    assert await root.ctx.hot.journal_entries(root.id, "+") == []
    assert Decimal(await api.available(root.code)) == Decimal("99.93")


async def test_each_sweep_that_meets_a_refused_entry_is_counted(
        api: Api, app: Any, db: asyncpg.Connection, client: httpx.AsyncClient) -> None:
    root = await new_root(api, app, db)
    journal = root.ctx.journal
    refused = await root.refused(10)
    try:
        before = await _metric(client, api, "creditgate_journal_sweep_failures_total")
        await journal._sweep_roots([root.id], "+")
        await journal._sweep_roots([root.id], "+")
        after = await _metric(client, api, "creditgate_journal_sweep_failures_total")
        assert after - before >= 2  # (the session's own sweeper may have met it as well)
    finally:
        await journal.drop(root.id, refused.stream_id)
    swept = await _metric(client, api, "creditgate_journal_sweep_failures_total")
    await journal._sweep_roots([root.id], "+")
    assert await _metric(client, api, "creditgate_journal_sweep_failures_total") == swept


async def test_the_commands_name_drop_and_refuse_as_an_operator_sees_them(
        api: Api, app: Any, db: asyncpg.Connection, settings: Settings) -> None:
    root = await new_root(api, app, db)
    refused = await root.refused(10)
    await asyncio.sleep(1.1)  # --older-than 1: an entry of a second ago or more
    listed = await cli(settings, "journal", "stuck", "--older-than", "1")
    assert listed.returncode == 3, listed.stderr
    lines = listed.stdout.splitlines()
    at = next(i for i, line in enumerate(lines)
              if line.startswith(f"root {root.id}  entry {refused.stream_id}  usage"))
    assert refused.payload["uid"] in lines[at]
    assert lines[at + 1].startswith("  refused: ") and "out of range" in lines[at + 1]

    dropped = await cli(settings, "journal", "drop", str(root.id), refused.stream_id)
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.startswith("dropped; ")
    assert Decimal(await api.available(root.code)) == Decimal("100.00")
    listed = await cli(settings, "journal", "stuck", "--older-than", "1")
    assert f"root {root.id} " not in listed.stdout

    gone = await cli(settings, "journal", "drop", str(root.id), refused.stream_id)
    assert gone.returncode == 1
    assert f"root {root.id} has no journal entry {refused.stream_id}" in gone.stderr
    malformed = await cli(settings, "journal", "drop", str(root.id), "latest")
    assert malformed.returncode == 2 and "entry_id" in malformed.stderr
