"""Holds: credit set aside before a use whose cost is known only after it, then captured
(what it cost) or released.

A hold is a check-and-consume of its amount under the usage uid `h0:<uid>`: decided in one
Lua call, only when the account's eligible credit covers it (so concurrent holds never
overspend), its entries of kind `hold` (one per balance drawn, in drawdown order) committed
before the answer. Capturing keeps the first `captured` of those allocations and gives the rest
back; releasing (or expiry, by the workers) gives everything back: `release` entries to the
same balances, keyed `hr:<account>:<uid>:<seq>`, so a retry or a second process gives nothing
twice. A part whose balance expired or was voided meanwhile lapses (it stays consumed, as the
balance's other credit did).

The `holds` row (migration 022) is written by the journal flush in the transaction of the
hold's entries, so a hold exists exactly when its debit does, whatever crashes (an orphaned
journal entry brings its row when the sweeper flushes it); a refused hold writes nothing. The
row is the state machine: capture and release first move `held` to `capturing`/`releasing`
(one caller wins), then give back, then reach the final status; the workers finish any left
half-way, and release (`expired`) the held ones past their expiry.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

import asyncpg

from app.config.catalog import AccountRef, CreditTypeRef
from app.entitlements import holds_repository as repo
from app.entitlements.schemas import HOLD_UID_PATTERN, HoldIn, HoldOut
from app.entitlements.service import consume
from app.errors import Conflict, NotFound, ValidationProblem, one_by_one
from app.ledger import repository as ledger_repo
from app.ledger.ops import now_ms
from app.ledger.service import account_ref, credit_back, resolve_credit_type, scaled
from app.money import fmt, to_scaled

if TYPE_CHECKING:
    from app.context import AppContext

PREFIX = "h0:"
_UID = re.compile(HOLD_UID_PATTERN)
STUCK_S = 30  # a half-ended hold this old is the workers' to finish


def _out(row: asyncpg.Record, account: str, credit_type: CreditTypeRef, *,
         available: str | None = None, duplicate: bool = False) -> HoldOut:
    dp = credit_type.decimal_places
    return HoldOut(uid=row["uid"], account=account, allowed=True, reason="ok",
                   available=available, product=row["product_code"],
                   credit_type=credit_type.code, amount=fmt(Decimal(row["amount"]), dp),
                   captured=None if row["captured"] is None
                   else fmt(Decimal(row["captured"]), dp),
                   status=row["status"], expires_at=row["expires_at"], duplicate=duplicate)


async def place(ctx: AppContext, code: str, body: HoldIn) -> tuple[HoldOut, bool]:
    """Hold `body.amount`; (answer, whether this call made the hold)."""
    account = await account_ref(ctx, code, field="code")
    if not ctx.catalog.known_product(body.product) and \
            not await ctx.catalog.product_exists(body.product):
        raise ValidationProblem(f"unknown product {body.product!r}", field="product")
    credit_type = await resolve_credit_type(ctx, account, body.credit_type)
    amount = scaled(body.amount, credit_type)
    at = now_ms()
    expires_ms = at + body.expires_in_s * 1000
    decided = await consume(ctx, account, credit_type, body.product, amount, PREFIX + body.uid,
                            at, hold_expires_ms=expires_ms)
    if not decided.duplicate:
        # refused (nothing held, nothing kept), or held now (its row committed with its
        # debit: answered without reading it back)
        return HoldOut(uid=body.uid, account=code, allowed=decided.allowed,
                       reason=decided.reason, available=decided.available,
                       product=body.product, credit_type=credit_type.code,
                       amount=fmt(body.amount, credit_type.decimal_places),
                       status="held" if decided.allowed else "refused",
                       expires_at=datetime.fromtimestamp(expires_ms / 1000, UTC)  # float-ok: a time
                       if decided.allowed else None), decided.allowed
    # a repeated uid: the first hold's row (committed with its debit)
    row = await repo.hold(ctx.pool, account.id, body.uid)
    assert row is not None
    credit_type = await ctx.catalog.credit_type_by_id(row["credit_type_id"])
    return _out(row, code, credit_type, duplicate=True), False


async def read(ctx: AppContext, code: str, uid: str) -> HoldOut:
    account = await account_ref(ctx, code, field="code")
    row = await _row(ctx, account, uid)
    return _out(row, code, await ctx.catalog.credit_type_by_id(row["credit_type_id"]))


async def _row(ctx: AppContext, account: AccountRef, uid: str) -> asyncpg.Record:
    row = await repo.hold(ctx.pool, account.id, uid) if _UID.match(uid) else None
    if row is None:
        raise NotFound(f"no hold {uid!r} of account {account.code!r}", field="uid")
    return row


async def end(ctx: AppContext, code: str, uid: str, captured: Decimal | None) -> HoldOut:
    """Capture `captured` of a hold (None: release it all)."""
    account = await account_ref(ctx, code, field="code")
    row = await _row(ctx, account, uid)
    credit_type = await ctx.catalog.credit_type_by_id(row["credit_type_id"])
    if captured is not None:
        scaled(captured, credit_type)  # (its decimal places)
        held = Decimal(row["amount"])
        if captured > held:
            raise ValidationProblem(f"more than the {fmt(held, credit_type.decimal_places)} held",
                                    field="amount")
    final = "captured" if captured is not None else "released"
    claimed = await repo.claim_end(ctx.pool, account.id, uid, final, captured)
    if claimed is None:
        row = await _row(ctx, account, uid)
        same = row["final_status"] == final and (
            captured is None or Decimal(row["captured"] or 0) == captured)
        if not same:
            raise Conflict(f"hold {uid!r} is {row['status']}"
                           + (f" ({fmt(Decimal(row['captured']), credit_type.decimal_places)} "
                              "captured)" if row["captured"] is not None else ""), field="uid")
        if row["status"] == final:  # a retry of what was done: the same answer
            return _out(row, code, credit_type, duplicate=True)
        claimed = row  # a retry of one still under way (or that a crash stopped): finish it
    await finish(ctx, account, claimed)
    return _out(await _row(ctx, account, uid), code, credit_type)


async def finish(ctx: AppContext, account: AccountRef, row: asyncpg.Record) -> None:
    """Give back what a capturing or releasing hold does not keep, then its final status."""
    credit_type = await ctx.catalog.credit_type_by_id(row["credit_type_id"])
    places = credit_type.decimal_places
    keep = to_scaled(Decimal(row["captured"] or 0), places)
    uid = row["uid"]
    ops = {f"hr:{account.id}:{uid}:{part['seq']}": part
           for part in await ledger_repo.usage_entries(ctx.pool, account.id, PREFIX + uid)}
    done = await ledger_repo.committed_ops(ctx.pool, list(ops))
    for op, part in ops.items():  # in drawdown order: the first allocations are kept
        took = to_scaled(-Decimal(part["amount"]), places)
        kept = min(took, keep)
        keep -= kept
        if took - kept > 0 and op not in done:
            owner = await ctx.catalog.account(part["owner"])
            assert owner is not None
            # False: the balance expired or was voided meanwhile, so this part lapses
            await credit_back(ctx, owner, credit_type, part["balance_id"], took - kept, op,
                              uid=PREFIX + uid, product=row["product_code"],
                              description=f"hold {uid} {row['final_status']}", kind="release")
    await repo.finished(ctx.pool, account.id, uid)


async def settle(ctx: AppContext, limit: int = 200) -> int:
    """Worker: release the holds past their expiry and finish those a crash left half-ended."""
    rows = await repo.open_holds(ctx.pool, STUCK_S, limit)
    await one_by_one(rows, lambda row: _settle_one(ctx, row), "settling hold")
    return len(rows)


async def _settle_one(ctx: AppContext, row: asyncpg.Record) -> None:
    account = await ctx.catalog.account(row["account"])
    assert account is not None
    if row["status"] == "held":
        claimed = await repo.claim_end(ctx.pool, account.id, row["uid"], "expired", None)
        if claimed is None:
            return  # captured or released meanwhile
        row = claimed
    await finish(ctx, account, row)
