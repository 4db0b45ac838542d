"""Usage reversals: a debit reported by mistake given back, in full or in part.

A product backend may count a use twice (a retry with a new uid), or report usage for a request
that then failed; a consuming `check` debits before the work is done. `POST
/v1/accounts/{code}/usage-events/{uid}/reverse` gives such an event's debit back, once per
event: the first reversal fixes the amount (a repeat with the same amount answers it again,
another amount is 409).

The give-back undoes the event's own entries in the reverse of the order it drew them: first
the overage it created (an `overage` entry with a positive amount; the account's hot copy is
then rebuilt), then the balances it drew, last drawn first, each an `adjustment` keyed
`ur:<account>:<uid>:<seq of the entry it reverses>`. So the split is a function of the event
and the amount, a retry or a second process repeats the same keyed writes (each lands once),
and a reversal never returns more to a balance than the event took from it. A part whose
balance expired or was voided since lapses: that credit would be gone anyway (as with holds).

The `usage_reversals` row (migration 024) is written before any give-back and marked
`reversed` after the last; the workers finish one a crash left `reversing`. Rated debits
(`r…`, `s…`, `c…`, `b…` uids) are corrected by the rating engine, and holds by their release,
so their uids are refused here.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

import asyncpg

from app.config.catalog import AccountRef, CreditTypeRef
from app.entitlements import reversals_repository as repo
from app.entitlements.holds import STUCK_S
from app.entitlements.schemas import RESERVED_UID, Part, ReversalIn, ReversalOut, UsageEventOut
from app.errors import Conflict, NotFound, ValidationProblem, one_by_one
from app.ledger import repository as ledger_repo
from app.ledger.service import account_ref, credit_back, scaled
from app.money import fmt, from_scaled, scaled_text, to_scaled

if TYPE_CHECKING:
    from app.context import AppContext


def _op(account_id: int, uid: str, seq: int) -> str:
    return f"ur:{account_id}:{uid}:{seq}"


def _plan(entries: list[asyncpg.Record], amount: int, places: int) -> list[tuple[int, asyncpg.Record]]:
    """(minor units to give back, the entry it reverses): overage first, then the balances
    last drawn first, until `amount` is covered."""
    parts = []
    for entry in reversed(entries):
        if amount <= 0:
            break
        give = min(amount, to_scaled(-Decimal(entry["amount"]), places))
        parts.append((give, entry))
        amount -= give
    return parts


async def _event(ctx: AppContext, account: AccountRef, uid: str) -> tuple[asyncpg.Record,
                                                                          CreditTypeRef]:
    if RESERVED_UID.match(uid):
        raise ValidationProblem("a rated debit is corrected by its measurement's re-rating and "
                                "a hold by its release, not reversed", field="uid")
    event = await ledger_repo.usage_event(ctx.pool, account.id, uid)
    if event is None:
        raise NotFound(f"no usage event {uid!r} of account {account.code!r}", field="uid")
    return event, await ctx.catalog.credit_type_by_id(event["credit_type_id"])


async def reverse(ctx: AppContext, code: str, uid: str, body: ReversalIn) -> tuple[ReversalOut,
                                                                                  bool]:
    """Reverse a usage event; (the reversal, whether this call made it)."""
    account = await account_ref(ctx, code, field="code")
    event, credit_type = await _event(ctx, account, uid)
    used = Decimal(event["amount"])
    amount = used if body.amount is None else body.amount
    scaled(amount, credit_type)  # (its decimal places)
    if amount > used:
        raise ValidationProblem(f"more than the event's {fmt(used, credit_type.decimal_places)}",
                                field="amount")
    row, made = await repo.claim(ctx.pool, account.id, uid, amount, body.reason)
    if not made and Decimal(row["amount"]) != amount:
        raise Conflict(f"usage event {uid!r} was already reversed "
                       f"({fmt(Decimal(row['amount']), credit_type.decimal_places)})", field="uid")
    entries = await ledger_repo.usage_entries(ctx.pool, account.id, uid)
    if row["status"] == "reversing":  # ours, or one a crash or a concurrent caller left under way
        await finish(ctx, account, row, event, credit_type, entries)
        row = await repo.reversal(ctx.pool, account.id, uid) or row
    return await _out(ctx, account, row, credit_type, entries, duplicate=not made), made


async def _parts(ctx: AppContext, account: AccountRef, row: asyncpg.Record, places: int,
                 entries: list[asyncpg.Record]) -> list[tuple[str, int, asyncpg.Record, bool]]:
    """The reversal's parts: (op key, minor units, the entry it undoes, in the ledger yet)."""
    plan = _plan(entries, to_scaled(Decimal(row["amount"]), places), places)
    ops = [_op(account.id, row["uid"], entry["seq"]) for _, entry in plan]
    done = await ledger_repo.committed_ops(ctx.pool, ops)
    return [(op, give, entry, op in done) for op, (give, entry) in zip(ops, plan, strict=True)]


async def finish(ctx: AppContext, account: AccountRef, row: asyncpg.Record,
                 event: asyncpg.Record, credit_type: CreditTypeRef,
                 entries: list[asyncpg.Record]) -> None:
    """Give back what the reversal plans (each write keyed: once), then mark it reversed."""
    uid, places = row["uid"], credit_type.decimal_places
    description = f"reversal of usage {uid}" + (f": {row['reason']}" if row["reason"] else "")
    for op, give, entry, done in await _parts(ctx, account, row, places, entries):
        if done:
            continue
        if entry["balance_id"] is None:
            if await ledger_repo.insert_overage_credit(
                    ctx.pool, op, account.id, credit_type.id, from_scaled(give, places), uid,
                    event["product_code"], description):
                await ctx.hot.invalidate(account.root_id)  # its overage is rebuilt from Postgres
            continue
        owner = await ctx.catalog.account(entry["owner"])
        assert owner is not None
        # False: the balance expired or was voided since, so this part lapses
        await credit_back(ctx, owner, credit_type, entry["balance_id"], give, op, uid=uid,
                          product=event["product_code"], description=description)
    await repo.finished(ctx.pool, account.id, uid)


async def _out(ctx: AppContext, account: AccountRef, row: asyncpg.Record,
               credit_type: CreditTypeRef, entries: list[asyncpg.Record], *,
               duplicate: bool = False) -> ReversalOut:
    places = credit_type.decimal_places
    returned: list[Part] = []
    lapsed: list[Part] = []
    overage = 0
    for _, give, entry, applied in await _parts(ctx, account, row, places, entries):
        if entry["balance_id"] is None:
            overage += give if applied else 0
        elif applied or row["status"] == "reversed":
            part = Part(balance_id=entry["balance_id"], amount=scaled_text(give, places))
            (returned if applied else lapsed).append(part)
    return ReversalOut(uid=row["uid"], account=account.code,
                       amount=fmt(Decimal(row["amount"]), places), reason=row["reason"],
                       status=row["status"], returned=returned,
                       overage_reversed=scaled_text(overage, places),
                       lapsed=lapsed, created_at=row["created_at"], duplicate=duplicate)


async def read_event(ctx: AppContext, code: str, uid: str) -> UsageEventOut:
    """A usage event as recorded, the balances it drew, and its reversal if any."""
    account = await account_ref(ctx, code, field="code")
    event, credit_type = await _event(ctx, account, uid)
    places = credit_type.decimal_places
    entries = await ledger_repo.usage_entries(ctx.pool, account.id, uid)
    row = await repo.reversal(ctx.pool, account.id, uid)
    return UsageEventOut(
        uid=uid, account=code, product=event["product_code"], credit_type=credit_type.code,
        amount=fmt(Decimal(event["amount"]), places),
        overage=fmt(Decimal(event["overage"]), places), timestamp=event["event_time"],
        recorded_at=event["recorded_at"],
        drawn=[Part(balance_id=e["balance_id"], amount=fmt(-Decimal(e["amount"]), places))
               for e in entries if e["balance_id"] is not None],
        reversal=None if row is None else await _out(ctx, account, row, credit_type, entries))


async def settle(ctx: AppContext, limit: int = 200) -> int:
    """Worker: finish the reversals a crash left half-done."""
    rows = await repo.stuck(ctx.pool, STUCK_S, limit)
    await one_by_one(rows, lambda row: _settle_one(ctx, row), "finishing reversal")
    return len(rows)


async def _settle_one(ctx: AppContext, row: asyncpg.Record) -> None:
    account = await ctx.catalog.account(row["account"])
    assert account is not None
    event = await ledger_repo.usage_event(ctx.pool, account.id, row["uid"])
    assert event is not None
    await finish(ctx, account, row, event,
                 await ctx.catalog.credit_type_by_id(event["credit_type_id"]),
                 await ledger_repo.usage_entries(ctx.pool, account.id, row["uid"]))
