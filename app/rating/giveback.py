"""Give-backs: a running charge that went down is credited back mid-period (invariant 8).

The rating transaction writes a `rated_credits` row when `round(running charge after)` falls
below what was drawn (MIN, LATEST or MEAN going down, a volume or stair-step price falling to a
cheaper band), atomically with the state move. This module pays it, in two steps:

1. **Plan** (one short transaction under a per-account-and-period advisory lock): the
   give-back reverses what the debits of its account plan's charges of the period took
   (`repository.reversible`): first what they left owing (its own charge's debits' overage,
   then the other charges'), so no credit goes back while the period leaves the account
   owing; then the balances they drew (its own charge's first); newest first, each debit in
   the reverse of the order it drew. The split is stored as `rated_credit_parts`. A debit
   of the pool that is not in the ledger yet (still on its way through the usage path) is
   sent first (waiting for it to land). What the debits in the ledger do not cover waits for
   a later pass while any is still missing; with all there, it goes into a new balance in the
   account's favour (only debits from before the migration leave any).
2. **Apply** each part (leased, so two processes do not both work on one, and never under a
   lock): overage is reversed by an `overage` ledger entry with a positive amount (then the
   account's hot copy is rebuilt); a balance gets an `adjustment` under the deterministic
   op key `rc:<account>:<credit uid>:<seq>`. If that balance is no longer live (voided,
   expired, refunded), the part is granted as a new balance instead (same product scope and
   priority, no expiry, source `rating`) under an id reserved once for the part.

Every write is keyed (op key, reserved balance id), so a retry, a crash repair by the worker or
a second process repeating a step changes nothing. A give-back is settled once its parts cover
it and are all in the ledger; the worker (`settle_unsettled`) finishes any that are not.
"""

from __future__ import annotations

import logging
from datetime import date
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from app.errors import STORE_ERRORS, Problem
from app.ledger import repository as ledger_repo
from app.ledger.service import credit_back, grant_reserved
from app.money import to_scaled
from app.rating import repository as repo

if TYPE_CHECKING:
    from app.context import AppContext

log = logging.getLogger(__name__)
# what leaves a give-back to the worker instead of failing the request that caused it
GIVEN_UP: tuple[type[BaseException], ...] = (Problem, *STORE_ERRORS)
DEFAULT_PRIORITY = 100


def part_op(account_id: int, credit_uid: str, seq: int) -> str:
    return f"rc:{account_id}:{credit_uid}:{seq}"


async def settle(ctx: AppContext, charges: list[tuple[int, str, date]]) -> None:
    """Pay the give-backs of these charges now; what cannot be paid yet is left to the worker
    (the give-backs are already committed, so an error here loses nothing)."""
    for account_id, charge_key, period_start in charges:
        try:
            await settle_charge(ctx, account_id, charge_key, period_start)
        except GIVEN_UP as exc:
            log.warning("give-back of %s/%s/%s left to the worker: %s", account_id, charge_key,
                        period_start, exc)
        except Exception:  # its own failure (a bug): logged, left to the worker, others go on
            log.exception("give-back of %s/%s/%s left to the worker", account_id, charge_key,
                          period_start)


async def settle_unsettled(ctx: AppContext, older_than_s: float = 1.0,  # float-ok: seconds
                           limit: int = 200) -> int:
    """Worker: finish the give-backs a crash, a lease or a debit in flight left unpaid."""
    rows = await repo.unsettled_charges(ctx.pool, older_than_s, limit)
    await settle(ctx, [(r["account_id"], r["charge_key"], r["period_start"]) for r in rows])
    return len(rows)


async def settle_charge(ctx: AppContext, account_id: int, charge_key: str,
                        period_start: date) -> None:
    await _send_pending_debits(ctx, account_id, charge_key, period_start)
    async with ctx.pool.acquire() as conn, conn.transaction():
        await repo.lock_period_giveback(conn, account_id, period_start)
        credits = await repo.open_credits(conn, account_id, charge_key, period_start)
        if not credits:
            return
        left = await repo.reversible(conn, account_id, charge_key, period_start)
        complete = not await repo.unsent_period_debits(conn, account_id, charge_key,
                                                       period_start)
        await repo.insert_credit_parts(conn, plan(account_id, credits, left, complete))
        parts = await repo.claim_credit_parts(conn, account_id, charge_key, period_start)
    done = await ledger_repo.committed_ops(ctx.pool, [
        part_op(p["account_id"], p["credit_uid"], p["seq"]) for p in parts] + [
        f"g:{p['fallback_balance_id']}" for p in parts if p["fallback_balance_id"]])
    try:
        for part in parts:
            await _apply(ctx, part, done)
            await repo.part_applied(ctx.pool, part["account_id"], part["credit_uid"],
                                    part["seq"])
    except Exception:  # the next pass may take them at once, not when the lease runs out
        await repo.release_credit_parts(ctx.pool, account_id, [p["credit_uid"] for p in parts])
        raise
    await repo.settle_credits(ctx.pool, account_id, charge_key, period_start)


def plan(account_id: int, credits: list[asyncpg.Record], left: list[asyncpg.Record],
         complete: bool) -> list[tuple[Any, ...]]:
    """Split each give-back (oldest first) over what the pool's debits took and give-backs
    have not reversed yet (`left`, in the order to reverse it). With every debit of the pool
    in the ledger (`complete`), what they do not cover goes to the account's favour;
    otherwise it waits for a later pass."""
    rows = list(left)
    rooms = [Decimal(row["left"]) for row in rows]
    parts: list[tuple[Any, ...]] = []
    at = 0
    for credit in credits:
        need = Decimal(credit["amount"]) - Decimal(credit["planned"])
        seq = int(credit["next_seq"])
        while need > 0 and at < len(rows):
            row, take = rows[at], min(need, rooms[at])
            source = "overage" if row["balance_id"] is None else "balance"
            parts.append((account_id, credit["uid"], seq, source, row["debit_uid"],
                          row["owner_id"], row["balance_id"], take))
            seq += 1
            need -= take
            rooms[at] -= take
            if rooms[at] == 0:
                at += 1
        if need > 0 and complete:
            parts.append((account_id, credit["uid"], seq, "favour", None, None, None, need))
    return parts


async def _send_pending_debits(ctx: AppContext, account_id: int, charge_key: str,
                               period_start: date) -> None:
    """Make sure the debits a give-back may reverse are in the ledger: a debit still on its
    way (another process, or one a crash stopped) is sent again under its own uid (the usage
    path takes a uid once, and waits for the first use's commit)."""
    from app.rating.drawdown import resend  # (drawdown imports this module)

    await resend(ctx, await repo.unsent_period_debits(ctx.pool, account_id, charge_key,
                                                      period_start))


async def _apply(ctx: AppContext, part: asyncpg.Record, done: set[str]) -> None:
    """Put one planned part in the ledger (once: every write is keyed)."""
    op = part_op(part["account_id"], part["credit_uid"], part["seq"])
    fallback = part["fallback_balance_id"]
    if op in done or (fallback is not None and f"g:{fallback}" in done):
        return
    account = await ctx.catalog.account(part["account"])
    credit_type = await ctx.catalog.credit_type(part["credit_type"])
    assert account is not None and credit_type is not None
    amount = Decimal(part["amount"])
    description = f"give-back {part['credit_uid']}"
    if part["source"] == "overage":
        if await ledger_repo.insert_overage_credit(ctx.pool, op, account.id, credit_type.id, amount,
                                            part["credit_uid"], part["product_code"],
                                            description):
            await ctx.hot.invalidate(account.root_id)  # its overage is rebuilt from Postgres
        return
    minor = to_scaled(amount, credit_type.decimal_places)
    if part["source"] == "balance" and fallback is None:
        owner = await ctx.catalog.account(part["owner"])
        assert owner is not None
        if await credit_back(ctx, owner, credit_type, part["balance_id"], minor, op,
                             uid=part["credit_uid"], product=part["product_code"],
                             description=description):
            return
        # no longer live: unless an earlier try got in before it went, grant instead
        await ctx.journal.recover_root(owner.root_id)
        if await ledger_repo.committed_ops(ctx.pool, [op]):
            return
    balance_id = await repo.fallback_balance(ctx.pool, part["account_id"], part["credit_uid"],
                                             part["seq"])
    products = part["product_codes"] if part["source"] == "balance" \
        else [part["product_code"]]
    await grant_reserved(ctx, account, credit_type, balance_id, minor, products=products,
                         priority=DEFAULT_PRIORITY if part["priority"] is None
                         else part["priority"], description=description,
                         source="rating")
