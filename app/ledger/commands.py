"""The operator's hands on the hot state: `creditgate journal stuck` and `creditgate journal
drop` for journal entries Postgres will not take, `creditgate hotstate verify` for a hot copy
that differs from Postgres.

A stuck entry is a change Redis decided and Postgres refuses (a bug, a value out of a column's
range): its request was answered with an error, but the hot copy keeps its effect, the sweeper
tries it again every pass (logging it and counting it in `creditgate_journal_sweep_failures_total`)
and every admin write that first flushes the root's journal fails. `stuck` names those entries
with Postgres's error; `drop` takes one out and rebuilds its root from Postgres.

`verify` compares each loaded root's hot copy (status, parent, remaining amounts, balance
definitions, overage of its accounts) with what a rebuild would install now, and with
`--repair` drops the roots that differ so that the next request rebuilds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

import asyncpg
import redis.asyncio as aioredis

from app.db import create_pool
from app.errors import Unavailable
from app.hotstate.keys import Keys, root_of
from app.hotstate.resp import FastRedis
from app.hotstate.store import HotState
from app.ledger.journal import Journal, JournalRecord
from app.ledger.loader import Drift, Loader
from app.ledger.repository import ms_to_dt
from app.ledger.verifier import seen_again, seen_in
from app.money import scaled_text
from app.settings import Seconds, Settings


@contextlib.asynccontextmanager
async def _stores(settings: Settings) -> AsyncIterator[tuple[asyncpg.Pool, HotState]]:
    """A pool and a hot state of this command's own."""
    pool = await create_pool(settings.database_url, 2)
    redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    fast = FastRedis(settings.redis_url)
    try:
        yield pool, HotState(redis, fast, Keys(settings.redis_prefix))
    finally:
        await fast.aclose()
        await redis.aclose()
        await pool.close()


@contextlib.asynccontextmanager
async def _journal(settings: Settings) -> AsyncIterator[Journal]:
    """A journal of this command's own (no flush loop: it flushes only when told)."""
    async with _stores(settings) as (pool, hot):
        journal = Journal(pool, hot)
        try:
            yield journal
        finally:
            await journal.stop()  # (the webhook nudges a flush may have spawned)


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


async def verify(settings: Settings, account: str | None, repair: bool,
                 out: Callable[[str], None], settle_s: Seconds = 0.5) -> int:
    """Compare the loaded roots' hot copies (or `account`'s root's) with Postgres and print
    each difference; with `repair`, forget the roots that differ. A difference is reported
    only when a second comparison `settle_s` later finds it again: a write between its
    Postgres commit and its Redis update (an account's status, say) shows for an instant.
    Returns how many roots differ."""
    async with _stores(settings) as (pool, hot):
        loader = Loader(pool, hot)
        places = {r["code"]: r["decimal_places"]
                  for r in await pool.fetch("SELECT code, decimal_places FROM credit_types")}
        if account is None:
            roots = sorted({root_of(str(key)) async for key in hot.redis.scan_iter(
                match=hot.keys.root_pattern, count=1000)})
        else:
            root = await pool.fetchval("SELECT root_id FROM accounts WHERE code = $1", account)
            if root is None:
                raise LookupError(f"no account {account!r}")
            roots = [int(root)]
        checked, drifting = 0, 0
        for root_id in roots:
            try:
                found = await loader.verify(root_id)
                if found:
                    await asyncio.sleep(settle_s)
                    found = seen_again(seen_in(found), await loader.verify(root_id))
            except Unavailable:
                out(f"root {root_id}: it kept changing while it was read; not verified")
                continue
            if found is None:
                continue  # cold: the next request rebuilds it from Postgres anyway
            checked += 1
            if not found:
                continue
            drifting += 1
            codes = {r["id"]: r["code"] for r in await pool.fetch(
                "SELECT id, code FROM accounts WHERE root_id = $1", root_id)}
            for d in found:
                out(f"root {root_id}  account {d.account_id} ({codes.get(d.account_id, '?')})  "
                    f"{d.what}: {_shown(d.redis, d, places)} in Redis, "
                    f"{_shown(d.postgres, d, places)} in Postgres")
            if repair:
                await hot.invalidate(root_id)
                out(f"root {root_id}: dropped from Redis; the next request rebuilds it")
        out(f"{checked} loaded roots verified, {drifting} differ from Postgres"
            + (" (repaired)" if repair and drifting else ""))
    return drifting


def _shown(value: str, d: Drift, places: dict[str, int]) -> str:
    if not value:
        return "none"
    if d.credit_type in places:
        return f"{scaled_text(int(value), places[d.credit_type])} {d.credit_type}"
    return value
