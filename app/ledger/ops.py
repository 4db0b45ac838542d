"""Run a hot-state script, rebuilding the root first when Redis has forgotten it."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from app.errors import Conflict, Unavailable, ValidationProblem
from app.hotstate.store import DecideArgs, Decision, LedgerOpArgs, LedgerOpResult
from app.ledger.journal import JournalRecord

if TYPE_CHECKING:
    from app.config.catalog import AccountRef
    from app.context import AppContext

ATTEMPTS = 4


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def decide(ctx: AppContext, root_id: int, events: list[DecideArgs],
                 tracked: tuple[str, ...] = ()) -> tuple[int, list[Decision]]:
    """Decide events of one root; returns the decision time (ms) with the decisions."""
    for _ in range(ATTEMPTS):
        at = now_ms()
        decisions = await ctx.hot.decide(root_id, at, events, tracked)
        if decisions is not None:
            return at, decisions
        await ctx.loader.ensure(root_id)
    raise Unavailable("hot state keeps going cold; retry")


async def ledger_op(
    ctx: AppContext, account: AccountRef, kind: str, balance_id: int, payload: dict[str, Any],
    amount: int = 0, definition: str = "",
) -> tuple[LedgerOpResult, str]:
    """Apply one balance operation in Redis and wait for its commit in Postgres."""
    at = now_ms()
    args = LedgerOpArgs(kind, account.id, account.chain_arg, balance_id, amount, definition, at,
                        json.dumps(payload))
    for attempt in range(ATTEMPTS):
        result = await ctx.hot.ledger_op(account.root_id, at, args)
        if result.status == "cold" or (result.status == "missing" and attempt == 0):
            # a missing balance may just be a stale hot copy: rebuild once before believing it
            if result.status == "missing":
                await ctx.hot.invalidate(account.root_id)
            await ctx.loader.ensure(account.root_id)
            continue
        if result.status == "missing":
            raise Conflict(f"balance {balance_id} is voided or expired", field="balance_id")
        if result.status == "insufficient":
            raise ValidationProblem(
                "would take the balance below zero", field="amount")
        record = JournalRecord(account.root_id, result.stream_id, kind, payload, at, result.gen,
                               overage=result.owed, applied=result.applied,
                               flag_changes=result.flag_changes,
                               crossings=result.crossings)
        [outcome] = await ctx.journal.commit([record])
        return result, outcome
    raise Unavailable("hot state keeps going cold; retry")
