"""A journal flush writes each usage event once, however often its records come back: the
plain insert of the usual flush falls back to the keyed one when any row is in already. The
orphan sweep deletes a journal stream it finds empty, and the next one's ids go on after its
last."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from app.hotstate.store import DecideArgs
from app.ledger.journal import JournalRecord
from tests.conftest import Api
from tests.webhook_receiver import eventually


async def _written(db: asyncpg.Connection, *records: JournalRecord) -> dict[str, tuple[int, int]]:
    """uid -> (usage_events rows, sum of its ledger entries in cents)."""
    uids = [r.payload["uid"] for r in records]
    events = {r["uid"]: r["n"] for r in await db.fetch(
        "SELECT uid, count(*) AS n FROM usage_events WHERE uid = ANY($1) GROUP BY uid", uids)}
    entries = {r["usage_uid"]: int(r["total"] * 100) for r in await db.fetch(
        "SELECT usage_uid, sum(amount) AS total FROM ledger_entries WHERE usage_uid = ANY($1) "
        "GROUP BY usage_uid", uids)}
    return {uid: (events.get(uid, 0), entries.get(uid, 0)) for uid in uids}


@dataclasses.dataclass
class Root:
    """A new account with 100.00 granted, as the journal sees it."""

    ctx: Any
    code: str
    product: str
    ct: str
    id: int
    ct_id: int

    async def decided(self, cents: int) -> JournalRecord:
        """A usage event decided in Redis and not committed yet (what a flush is handed)."""
        uid = f"flush-{uuid.uuid4().hex[:10]}"
        at = time.time_ns() // 1_000_000
        payload = json.dumps({"a": self.id, "ct": self.ct_id, "cc": self.ct, "dp": 2, "uid": uid,
                              "prod": self.product, "amt": str(cents), "ts": at})
        decisions = await self.ctx.hot.decide(self.id, at, [DecideArgs(
            self.id, str(self.id), uid, self.product, self.ct, cents, at, "u", payload)])
        assert decisions is not None and decisions[0].status == "ok"
        d = decisions[0]
        return JournalRecord(self.id, d.stream_id, "usage", json.loads(payload), at, d.gen,
                             d.allocations, d.overage, flag_changes=d.flag_change)


async def _root(api: Api, app: Any, db: asyncpg.Connection) -> Root:
    names = await api.setup()
    await api.grant(names["account"], "100.00")
    return Root(app.state.ctx, names["account"], names["api"], names["credit_type"],
                await db.fetchval("SELECT id FROM accounts WHERE code = $1", names["account"]),
                await db.fetchval("SELECT id FROM credit_types WHERE code = $1",
                                  names["credit_type"]))


async def test_a_repeated_flush_a_mixed_one_and_a_doubled_key_each_write_once(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    root = await _root(api, app, db)
    ctx = root.ctx

    first = await root.decided(150)
    assert await ctx.journal.flush([first]) == ["accepted"]
    assert await _written(db, first) == {first.payload["uid"]: (1, -150)}
    # the sweeper flushes the same entry again: its own, so accepted, and nothing is added
    assert await ctx.journal.flush([first]) == ["accepted"]
    assert await _written(db, first) == {first.payload["uid"]: (1, -150)}

    # a flush holding an old record and a new one: the new one is still written
    second = await root.decided(275)
    assert await ctx.journal.flush([first, second]) == ["accepted", "accepted"]
    assert await _written(db, first, second) == {first.payload["uid"]: (1, -150),
                                                 second.payload["uid"]: (1, -275)}

    # one uid applied twice by a Redis that forgot it: the first is kept, the other is not
    third = await root.decided(100)
    again = dataclasses.replace(third, stream_id="1-1")
    assert await ctx.journal.flush([third, again]) == ["accepted", "duplicate"]
    assert await _written(db, third) == {third.payload["uid"]: (1, -100)}
    assert Decimal(await api.available(root.code)) == Decimal("94.75")


async def test_the_sweep_deletes_an_empty_journal_and_its_successor_goes_on_after_its_ids(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    root = await _root(api, app, db)
    ctx, account_id = root.ctx, root.id
    journal, last = ctx.hot.keys.journal(account_id), ctx.hot.keys.tag(account_id) + ":jl"
    for _ in range(3):
        await api.usage(root.code, root.product, "1.00")

    async def acknowledged() -> bool:  # (the ack follows the commit, in a task of its own)
        return await ctx.hot.redis.xlen(journal) == 0

    await eventually(acknowledged, 5)
    # the orphan sweep finds the journal empty and deletes it: later sweeps do not read it
    # (what it returns counts orphans of the whole session's keyspace: other tests' too)
    await ctx.journal.sweep(ctx.settings.journal_orphan_ms)
    assert not await ctx.hot.redis.exists(journal)
    kept = await ctx.hot.redis.get(last)
    assert kept is not None and kept.count("-") == 1

    # within the same millisecond as the last id (here: one from the future), the next entry
    # still gets a larger id: a root's webhooks are ordered by it
    await ctx.hot.redis.set(last, "99999999999999-7")
    record = await root.decided(100)
    assert record.stream_id == "99999999999999-8"
    assert await ctx.journal.flush([record]) == ["accepted"]
    assert await _written(db, record) == {record.payload["uid"]: (1, -100)}
