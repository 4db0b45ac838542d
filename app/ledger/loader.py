"""Rebuilds a billing root's hot state from Postgres plus its unflushed journal.

Runs whenever a script finds the root cold: after FLUSHALL, a Redis restart, or an explicit
invalidation. The journal is read before the Postgres snapshot and checked against that same
snapshot, so an entry is counted exactly once whether or not it has been flushed; the install
is refused if any operation ran in between, and then the load starts over.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from app.errors import Unavailable
from app.hotstate.store import DAY_MS, HotState, mark_window_start
from app.ledger import repository as repo
from app.ledger.journal import OWING_KINDS, JournalRecord
from app.ledger.repository import ms_to_dt
from app.money import to_scaled

ATTEMPTS = 8
STATUS_CODE = {"active": "a", "pending": "p", "voided": "v", "expired": "x"}


def to_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)  # float-ok: a timestamp, not an amount


def balance_def(credit_type: str, priority: int, effective_ms: int, expires_ms: int | None,
                status: str, products: list[str] | None) -> str:
    scope = ",".join(products) if products else "*"
    return f"{credit_type}|{priority}|{effective_ms}|{expires_ms or 0}|{STATUS_CODE[status]}|{scope}"


def _with_status(definition: str, code: str) -> str:
    parts = definition.split("|")
    parts[4] = code
    return "|".join(parts)


@dataclass(frozen=True)
class Drift:
    """One way a root's hot copy differs from Postgres (plus its unflushed journal): `what`
    is `account`, `status`, `parent`, `balance <id>` (remaining), `definition <id>` or
    `overage`; the two values as Redis and Postgres hold them ("" for none; amounts in the
    credit type's minor units)."""

    account_id: int
    what: str
    redis: str
    postgres: str
    credit_type: str = ""  # the amount's (balance and overage drifts)


def _drawable(remaining: dict[str, str], defs: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Balance id -> (remaining, definition) of the balances that are not voided or expired:
    Redis keeps those until the next rebuild, Postgres's live set leaves them out."""
    return {bid: (remaining.get(bid, ""), d) for bid, d in defs.items()
            if d.split("|")[4] not in ("v", "x")} | \
        {bid: (rem, "") for bid, rem in remaining.items() if bid not in defs}


def drift(installed: dict[int, dict[str, dict[str, str]]], state: dict[str, Any]) -> list[Drift]:
    """Compare the hashes of a root's accounts in Redis (HotState.dump) with the state a
    rebuild would install (Loader._state)."""
    found: list[Drift] = []
    for account in state["accounts"]:
        aid, hot = int(account["id"]), installed.get(int(account["id"]), {})
        status = hot.get("a", {})
        if not status:
            found.append(Drift(aid, "account", "", "present"))
            continue
        for field, what in (("st", "status"), ("par", "parent")):
            if status.get(field, "") != account[field]:
                found.append(Drift(aid, what, status.get(field, ""), account[field]))
        want = _drawable(account["b"], account["d"])
        have = _drawable(hot.get("b", {}), hot.get("d", {}))
        for bid in sorted(want.keys() | have.keys(), key=int):
            (rem, d), (want_rem, want_d) = have.get(bid, ("", "")), want.get(bid, ("", ""))
            credit_type = (want_d or d).split("|")[0]
            if rem != want_rem:
                found.append(Drift(aid, f"balance {bid}", rem, want_rem, credit_type))
            if d != want_d:
                found.append(Drift(aid, f"definition {bid}", d, want_d))
        owed = {ct: v for ct, v in hot.get("o", {}).items() if int(v)}
        want_owed = {ct: v for ct, v in account["o"].items() if int(v)}
        for ct in sorted(owed.keys() | want_owed.keys()):
            if owed.get(ct, "0") != want_owed.get(ct, "0"):
                found.append(Drift(aid, "overage", owed.get(ct, "0"), want_owed.get(ct, "0"), ct))
    return found


class Loader:
    def __init__(self, pool: asyncpg.Pool, hot: HotState) -> None:
        self.pool = pool
        self.hot = hot
        self._inflight: dict[int, asyncio.Future[None]] = {}

    async def ensure(self, root_id: int) -> None:
        """Load a root once, however many requests found it cold at the same time."""
        running = self._inflight.get(root_id)
        if running is not None:
            return await asyncio.shield(running)
        future = asyncio.get_running_loop().create_future()
        self._inflight[root_id] = future
        try:
            await self._load(root_id)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            del self._inflight[root_id]
            if future.done() and not future.cancelled():
                future.exception()  # mark retrieved

    async def _load(self, root_id: int) -> None:
        for _ in range(ATTEMPTS):
            loaded, ver, entries = await self.hot.snapshot(root_id)
            if loaded:
                return
            records = [JournalRecord.from_stream(root_id, eid, f) for eid, f in entries]
            state = await self._state(root_id, records)
            await self._restore_marks(root_id, [int(a["id"]) for a in state["accounts"]])
            outcome = await self.hot.install(root_id, ver, secrets.token_hex(6),
                                             time.time_ns() // 1_000_000, json.dumps(state))
            if outcome in ("ok", "exists"):
                return
            await asyncio.sleep(0.005)
        raise Unavailable("hot state could not be rebuilt; retry")

    async def verify(self, root_id: int) -> list[Drift] | None:
        """How a loaded root's hot copy differs from what a rebuild would install now
        (Postgres plus the unflushed journal); None when the root is cold (nothing to compare:
        the next request rebuilds it). Read as a rebuild reads (the journal first, then one
        Postgres snapshot, each entry counted once whether flushed or not) and compared only
        when no operation ran in between (the op counter did not move); Unavailable when the
        root never held still for ATTEMPTS tries."""
        async with self.pool.acquire() as conn:
            account_ids = [int(a["id"]) for a in await repo.root_accounts(conn, root_id)]
        for _ in range(ATTEMPTS):
            dump = await self.hot.dump(root_id, account_ids)
            if not dump.loaded:
                return None
            records = [JournalRecord.from_stream(root_id, eid, f) for eid, f in dump.entries]
            state = await self._state(root_id, records)
            if await self.hot.ops_counter(root_id) == dump.ver:
                return drift(dump.accounts, state)
            await asyncio.sleep(0.005)
        raise Unavailable("the root kept changing while it was read; verify it again")

    async def _restore_marks(self, root_id: int, account_ids: list[int]) -> None:
        """After Redis lost a root's uid marks (FLUSHALL, restart), bring back those of the mark
        window from Postgres, so a replayed uid is refused before it touches any balance."""
        now = time.time_ns() // 1_000_000
        lost = await self.hot.accounts_without_marks(root_id, account_ids, now)
        if not lost:
            return
        since = mark_window_start(now)
        rows = await repo.recent_uids(self.pool, lost, ms_to_dt(since))
        await self.hot.restore_marks(root_id, [
            (r["account_id"], to_ms(r["recorded_at"]) // DAY_MS, r["uid"]) for r in rows])

    async def _state(self, root_id: int, records: list[JournalRecord]) -> dict[str, Any]:
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                   readonly=True):
            accounts = await repo.root_accounts(conn, root_id)
            ids = [a["id"] for a in accounts]
            balances = await repo.live_balances(conn, ids)
            overages = await repo.overages(conn, ids)
            watches = await repo.watches(conn, ids)
            done = await repo.committed_ops(conn, [r.op_key for r in records]) if records else set()
        state: dict[int, dict[str, Any]] = {
            a["id"]: {"id": str(a["id"]), "st": a["status"], "par": str(a["parent_id"] or ""),
                      "b": {}, "d": {}, "o": {}, "w": []} for a in accounts
        }
        for b in balances:
            acct = state[b["account_id"]]
            acct["b"][str(b["id"])] = str(to_scaled(Decimal(b["remaining"]), b["decimal_places"]))
            acct["d"][str(b["id"])] = balance_def(
                b["credit_type"], b["priority"], to_ms(b["effective_at"]),
                to_ms(b["expires_at"]) if b["expires_at"] else None, b["status"], b["product_codes"])
        for o in overages:
            state[o["account_id"]]["o"][o["credit_type"]] = str(
                to_scaled(Decimal(o["overage"]), o["decimal_places"]))
        for w in watches:
            state[w["account_id"]]["w"].append([
                w["name"], w["credit_type"],
                str(to_scaled(Decimal(w["threshold"]), w["decimal_places"])), w["op"]])
        for record in records:
            if record.op_key not in done:
                _apply(state, record)
        return {"accounts": list(state.values())}


def _bump(table: dict[str, str], key: str, delta: int) -> None:
    table[key] = str(int(table.get(key, "0")) + delta)


def _apply(state: dict[int, dict[str, Any]], record: JournalRecord) -> None:
    """Replay one unflushed journal record onto state read from Postgres."""
    p = record.payload
    account = state[int(p["a"])]
    if record.kind == "usage":
        for alloc in filter(None, record.allocations.split(",")):
            balance, owner, taken = alloc.split(":")
            _bump(state[int(owner)]["b"], balance, -int(taken))
        if record.overage:
            _bump(account["o"], p["cc"], record.overage)
        return
    balance = str(p["b"])
    if record.kind == "grant":
        account["d"][balance] = p["def"]
    _bump(account["b"], balance, record.applied)
    if record.kind in ("void", "expire", "refund"):
        account["d"][balance] = _with_status(account["d"][balance], "x" if record.kind == "expire" else "v")
    if record.kind in OWING_KINDS and record.overage:
        _bump(account["o"], p["cc"], record.overage)
