"""Journal records made by hand: a new root with 100.00, usage decided in Redis and not yet
committed, and what Postgres holds of it (tests of the journal's flush, sweep and operator
commands)."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

import asyncpg

from app.hotstate.store import DecideArgs
from app.ledger.journal import JournalRecord
from tests.conftest import Api

FAR_MS = 10**17  # an event time some three million years out: no timestamp column holds it


async def written(db: asyncpg.Connection, *records: JournalRecord) -> dict[str, tuple[int, int]]:
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

    async def refused(self, cents: int) -> JournalRecord:
        """A usage event decided in Redis (the hot copy drew it, its uid is marked) whose
        journal entry Postgres refuses: its timestamp rewritten past what a timestamp column
        holds (the entry comes back under a new id: a stream's entries cannot be edited)."""
        real = await self.decided(cents)
        hot, key = self.ctx.hot, self.ctx.hot.keys.journal(self.id)
        fields = dict(await hot.journal_entries(self.id, real.stream_id, real.stream_id))
        fields = fields[real.stream_id]
        payload = {**json.loads(fields["p"]), "ts": FAR_MS}
        await hot.redis.xdel(key, real.stream_id)
        fields = {**fields, "p": json.dumps(payload)}
        return JournalRecord.from_stream(self.id, str(await hot.redis.xadd(key, fields)), fields)


async def new_root(api: Api, app: Any, db: asyncpg.Connection) -> Root:
    names = await api.setup()
    await api.grant(names["account"], "100.00")
    return Root(app.state.ctx, names["account"], names["api"], names["credit_type"],
                await db.fetchval("SELECT id FROM accounts WHERE code = $1", names["account"]),
                await db.fetchval("SELECT id FROM credit_types WHERE code = $1",
                                  names["credit_type"]))
