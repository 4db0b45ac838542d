"""`creditgate journal stuck` and `creditgate journal drop`: the operator's hands on journal
entries Postgres will not take.

Such an entry is a change Redis decided and Postgres refuses (a bug, a value out of a column's
range): its request was answered with an error, but the hot copy keeps its effect, the sweeper
tries it again every pass (logging it and counting it in `creditgate_journal_sweep_failures_total`)
and every admin write that first flushes the root's journal fails. `stuck` names those entries
with Postgres's error; `drop` takes one out and rebuilds its root from Postgres.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis

from app.db import create_pool
from app.hotstate.keys import Keys
from app.hotstate.resp import FastRedis
from app.hotstate.store import HotState
from app.ledger.journal import Journal, JournalRecord
from app.ledger.repository import ms_to_dt
from app.settings import Settings


@contextlib.asynccontextmanager
async def _journal(settings: Settings) -> AsyncIterator[Journal]:
    """A journal of this command's own (no flush loop: it flushes only when told)."""
    pool = await create_pool(settings.database_url, 2)
    redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    fast = FastRedis(settings.redis_url)
    journal = Journal(pool, HotState(redis, fast, Keys(settings.redis_prefix)))
    try:
        yield journal
    finally:
        await journal.stop()  # (the webhook nudges a flush may have spawned)
        await fast.aclose()
        await redis.aclose()
        await pool.close()


def _when(ms: int) -> str:
    try:
        return ms_to_dt(ms).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError):  # the entry may be stuck for this very reason
        return f"{ms} ms"


def describe(record: JournalRecord) -> str:
    """One line naming an entry: root, entry id, kind, when Redis decided it, what it is."""
    recorded = _when(record.recorded_ms)
    return (f"root {record.root_id}  entry {record.stream_id}  {record.kind}  {record.op_key}  "
            f"decided {recorded}  {json.dumps(record.payload, separators=(',', ':'))}")


async def stuck(settings: Settings, older_than_ms: int, out: Callable[[str], None]) -> int:
    """Print each stuck entry and Postgres's error; how many there are."""
    async with _journal(settings) as journal:
        found = await journal.stuck(older_than_ms)
    for entry in found:
        out(describe(entry.record))
        out(f"  refused: {entry.error}")
    if not found:
        out("no stuck journal entries")
    return len(found)


async def drop(settings: Settings, root_id: int, entry_id: str) -> str:
    """Drop one entry (unless it commits now); a line saying which happened."""
    async with _journal(settings) as journal:
        outcome, record = await journal.drop(root_id, entry_id)
    if outcome == "committed":
        return f"committed, not dropped (Postgres took it this time): {describe(record)}"
    return f"dropped; the root's hot state is rebuilt from Postgres: {describe(record)}"
