"""Grants, adjustments and voids of balances, and the ledger reads."""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from app.config.catalog import AccountRef, CreditTypeRef
from app.config.repository import existing_products
from app.errors import Conflict, NotFound, ValidationProblem, one_by_one
from app.hotstate.store import LOW_WATCH
from app.ledger import repository as repo
from app.ledger import rollups
from app.ledger.loader import balance_def, to_ms
from app.ledger.ops import ledger_op, now_ms
from app.ledger.schemas import (
    AdjustmentIn,
    BalanceAtOut,
    BalanceOut,
    CreditTypeTotal,
    GrantIn,
    LedgerEntryOut,
    LedgerPage,
    ThresholdIn,
    ThresholdList,
    ThresholdOut,
    VoidIn,
)
from app.money import MAX_PLACES, AmountError, exact_places, fmt, to_scaled
from app.schemas import BadCursor, cursor_id, decode_cursor_text, encode_cursor_text

if TYPE_CHECKING:
    from app.context import AppContext


async def account_ref(ctx: AppContext, code: str, field: str = "account") -> AccountRef:
    """The account of a code; a 404 naming `field` (the body's `account`, or a path's `code`)."""
    account = await ctx.catalog.account(code)
    if account is None:
        raise NotFound(f"no account {code!r}", field=field)
    return account


async def resolve_credit_type(ctx: AppContext, account: AccountRef, code: str | None,
                              field: str = "credit_type") -> CreditTypeRef:
    if code is None:
        if account.credit_type is None:
            raise ValidationProblem(
                f"account {account.code!r} has no default credit type: name one", field=field)
        return account.credit_type
    found = await ctx.catalog.credit_type(code)
    if found is None:
        raise ValidationProblem(f"unknown credit type {code!r}", field=field)
    return found


def scaled(amount: Decimal, credit_type: CreditTypeRef, field: str = "amount") -> int:
    try:
        return to_scaled(amount, credit_type.decimal_places)
    except AmountError as exc:
        raise ValidationProblem(f"{exc} for credit type {credit_type.code!r}", field=field) from exc


def balance_out(row: asyncpg.Record) -> BalanceOut:
    dp = row["decimal_places"]
    return BalanceOut(
        id=row["id"], account=row["account"], credit_type=row["credit_type"],
        granted=fmt(Decimal(row["granted"]), dp), remaining=fmt(Decimal(row["remaining"]), dp),
        products=row["product_codes"], priority=row["priority"], effective_at=row["effective_at"],
        expires_at=row["expires_at"], description=row["description"], source=row["source"],
        status=row["status"], created_at=row["created_at"])


def _op_payload(op: str, account: AccountRef, credit_type: CreditTypeRef, balance_id: int,
                description: str, **extra: Any) -> dict[str, Any]:
    return {"op": op, "a": account.id, "ct": credit_type.id, "cc": credit_type.code,
            "dp": credit_type.decimal_places, "b": balance_id, "desc": description, **extra}


async def grant(ctx: AppContext, code: str, body: GrantIn) -> BalanceOut:
    account = await account_ref(ctx, code)
    credit_type = await resolve_credit_type(ctx, account, body.credit_type)
    amount = scaled(body.amount, credit_type)
    if body.products:
        unknown = sorted(set(body.products) - await existing_products(ctx.pool, body.products))
        if unknown:
            raise ValidationProblem(f"unknown products: {', '.join(unknown)}", field="products")
    effective = body.effective_at or datetime.now(UTC)
    if body.expires_at is not None and body.expires_at <= effective:
        raise ValidationProblem("must be after effective_at", field="expires_at")
    products = sorted(set(body.products)) if body.products else None
    eff_ms = to_ms(effective)
    exp_ms = to_ms(body.expires_at) if body.expires_at else None
    balance_id = await repo.next_balance_id(ctx.pool)
    definition = balance_def(credit_type.code, body.priority, eff_ms, exp_ms, "active", products)
    payload = _op_payload(
        f"g:{balance_id}", account, credit_type, balance_id, body.description,
        bal={"products": products, "priority": body.priority, "eff": eff_ms, "exp": exp_ms,
             "description": body.description, "source": body.source})
    payload["def"] = definition
    await ledger_op(ctx, account, "grant", balance_id, payload, amount, definition)
    return await read_balance(ctx, balance_id)


async def read_balance(ctx: AppContext, balance_id: int) -> BalanceOut:
    row = await repo.balance(ctx.pool, balance_id)
    if row is None:
        raise NotFound(f"no balance {balance_id}", field="balance_id")
    return balance_out(row)


async def _live_balance(ctx: AppContext, balance_id: int) -> tuple[asyncpg.Record, AccountRef,
                                                                  CreditTypeRef]:
    row = await repo.balance(ctx.pool, balance_id)
    if row is None:
        raise NotFound(f"no balance {balance_id}", field="balance_id")
    if row["status"] in ("voided", "expired"):
        raise Conflict(f"balance {balance_id} is {row['status']}", field="balance_id")
    account = await account_ref(ctx, row["account"])
    return row, account, await ctx.catalog.credit_type_by_id(row["credit_type_id"])


async def adjust(ctx: AppContext, balance_id: int, body: AdjustmentIn) -> BalanceOut:
    _, account, credit_type = await _live_balance(ctx, balance_id)
    amount = scaled(body.amount, credit_type)
    if amount == 0:
        raise ValidationProblem("must not be zero", field="amount")
    payload = _op_payload(f"j:{uuid.uuid4().hex}", account, credit_type, balance_id,
                          body.description)
    await ledger_op(ctx, account, "adjustment", balance_id, payload, amount)
    return await read_balance(ctx, balance_id)


async def void(ctx: AppContext, balance_id: int, body: VoidIn) -> BalanceOut:
    _, account, credit_type = await _live_balance(ctx, balance_id)
    payload = _op_payload(f"v:{balance_id}", account, credit_type, balance_id, body.description)
    await ledger_op(ctx, account, "void", balance_id, payload)
    return await read_balance(ctx, balance_id)


async def expire_due(ctx: AppContext, limit: int = 500) -> int:
    """Write an `expire` entry for every balance whose expiry has passed (worker)."""
    rows = await repo.due_expiries(ctx.pool, datetime.now(UTC), limit)
    await one_by_one([row["id"] for row in rows], lambda balance_id: expire_balance(ctx, balance_id),
                     "expiring balance")
    return len(rows)


async def expire_balance(ctx: AppContext, balance_id: int) -> None:
    """Expire what remains of a balance (op `x:<id>`: once, whoever comes first); nothing
    when it is no longer live."""
    try:
        _, account, credit_type = await _live_balance(ctx, balance_id)
    except (NotFound, Conflict):
        return
    payload = _op_payload(f"x:{balance_id}", account, credit_type, balance_id, "expired")
    with contextlib.suppress(Conflict):
        await ledger_op(ctx, account, "expire", balance_id, payload)


def entry_out(row: asyncpg.Record, running: Decimal) -> LedgerEntryOut:
    dp = row["decimal_places"]
    return LedgerEntryOut(
        id=row["id"], kind=row["kind"], balance_id=row["balance_id"], credit_type=row["credit_type"],
        amount=fmt(Decimal(row["amount"]), dp), running_balance=fmt(running, dp),
        usage_uid=row["usage_uid"], product=row["product_code"], description=row["description"],
        created_at=row["created_at"])


# A ledger cursor carries the running balances at the end of its page ("<last id>;<credit type
# id>=<sum>,..."), so a page costs its own rows however deep into the history it is; a cursor
# of the older shape ("<last id>") has them summed once from the ledger.

def _ledger_cursor(last_id: int, running: dict[int, Decimal]) -> str:
    return encode_cursor_text(
        f"{last_id};" + ",".join(f"{ct}={total}" for ct, total in sorted(running.items())))


def _read_ledger_cursor(cursor: str | None) -> tuple[int, dict[int, Decimal] | None]:
    if not cursor:
        return 0, {}
    last, carried, sums = decode_cursor_text(cursor).partition(";")
    try:
        running = {cursor_id(ct): Decimal(total) for ct, total in
                   (pair.split("=") for pair in sums.split(",") if pair)}
        # a running sum is one this API wrote: finite, and within what arithmetic can add to
        if not all(total.is_finite() and (not total or total.adjusted() < 40)
                   and exact_places(total) <= MAX_PLACES for total in running.values()):
            raise ValueError("not a running sum")
        return cursor_id(last), running if carried else None
    except (ValueError, ArithmeticError) as exc:
        raise BadCursor() from exc


async def ledger(ctx: AppContext, code: str, credit_type: str | None, cursor: str | None,
                 limit: int) -> LedgerPage:
    account = await account_ref(ctx, code)
    type_id = None
    if credit_type is not None:
        type_id = (await resolve_credit_type(ctx, account, credit_type, "query.credit_type")).id
    after_id, running = _read_ledger_cursor(cursor)
    if running is None:
        running = await repo.ledger_before(ctx.pool, account.id, type_id, after_id)
    rows = await repo.ledger_page(ctx.pool, account.id, type_id, after_id, limit)
    before = dict(running)
    data = []
    for row in rows:
        total = before.get(row["credit_type_id"], Decimal(0)) + Decimal(row["in_page"])
        running[row["credit_type_id"]] = total
        data.append(entry_out(row, total))
    return LedgerPage(data=data, next_cursor=_ledger_cursor(rows[-1]["id"], running)
                      if len(rows) == limit else None)


async def balance_at(ctx: AppContext, code: str, at: datetime) -> BalanceAtOut:
    account = await account_ref(ctx, code)
    async with ctx.pool.acquire() as conn:
        rows = await rollups.balance_at(conn, account.id, at)
    return BalanceAtOut(account=code, at=at, totals=[
        CreditTypeTotal(credit_type=r["credit_type"],
                        balance=fmt(Decimal(r["balance"]), r["decimal_places"]),
                        overage=fmt(Decimal(r["overage"]), r["decimal_places"])) for r in rows])



async def set_threshold(ctx: AppContext, code: str, credit_type_code: str,
                        body: ThresholdIn) -> ThresholdOut:
    account = await account_ref(ctx, code)
    credit_type = await resolve_credit_type(ctx, account, credit_type_code, "credit_type")
    low = scaled(body.low, credit_type, "low") if body.low is not None else None
    await repo.set_threshold(ctx.pool, account.id, credit_type.id, body.low)
    await ctx.hot.set_watch(account.root_id, account.id, LOW_WATCH, credit_type.code, low, "lt",
                            now_ms())
    return ThresholdOut(account=code, credit_type=credit_type.code,
                        low=fmt(body.low, credit_type.decimal_places) if body.low else None)


async def thresholds(ctx: AppContext, code: str) -> ThresholdList:
    account = await account_ref(ctx, code)
    rows = await repo.thresholds(ctx.pool, [account.id])
    return ThresholdList(data=[ThresholdOut(account=code, credit_type=r["credit_type"],
                                            low=fmt(Decimal(r["low"]), r["decimal_places"]))
                               for r in rows])


# Purchased credit: a balance that exists before it is paid, drawable only once activated.

async def create_pending(ctx: AppContext, account: AccountRef, credit_type: CreditTypeRef, *,
                         products: list[str] | None, expires_at: datetime | None,
                         description: str, source: str = "purchase", priority: int = 100) -> int:
    """A balance row in status `pending`: no ledger entry, not in the hot state, not available."""
    balance_id = await repo.next_balance_id(ctx.pool)
    await repo.insert_pending_balance(ctx.pool, balance_id, account.id, credit_type.id, products,
                                      priority, datetime.now(UTC), expires_at, description, source)
    return balance_id


async def activate(ctx: AppContext, balance_id: int, amount: Decimal) -> bool:
    """Grant a pending balance its credits (once, whoever calls first); True if this call did."""
    row = await repo.balance(ctx.pool, balance_id)
    if row is None:
        raise NotFound(f"no balance {balance_id}", field="balance_id")
    account = await account_ref(ctx, row["account"])
    credit_type = await ctx.catalog.credit_type_by_id(row["credit_type_id"])
    if await repo.committed_ops(ctx.pool, [f"g:{balance_id}"]):
        return False
    eff_ms = to_ms(row["effective_at"])
    exp_ms = to_ms(row["expires_at"]) if row["expires_at"] else None
    definition = balance_def(credit_type.code, row["priority"], eff_ms, exp_ms, "active",
                             row["product_codes"])
    payload = _op_payload(
        f"g:{balance_id}", account, credit_type, balance_id, row["description"], activate=True,
        bal={"products": row["product_codes"], "priority": row["priority"], "eff": eff_ms,
             "exp": exp_ms, "description": row["description"], "source": row["source"]})
    payload["def"] = definition
    try:
        _, outcome = await ledger_op(ctx, account, "grant", balance_id, payload,
                                     scaled(amount, credit_type), definition)
    except Conflict:  # another caller activated it first: make sure that one is committed
        await ctx.journal.recover_root(account.root_id)
        if await repo.committed_ops(ctx.pool, [f"g:{balance_id}"]):
            return False
        raise
    return outcome == "accepted"


async def cancel_pending(ctx: AppContext, balance_id: int) -> bool:
    """Void a balance that was never paid; False when it is no longer pending."""
    return await repo.void_pending_balance(ctx.pool, balance_id)


async def refund(ctx: AppContext, balance_id: int, owed: int, description: str) -> bool:
    """A refunded purchase: void what remains of its balance; what of `owed` (what was granted
    less what partial refunds took back, minor units) that does not cover becomes overage.
    False when the balance is no longer live (already voided or refunded)."""
    return await _take_back(ctx, "refund", balance_id, owed, f"r:{balance_id}", description)


async def claw_back(ctx: AppContext, balance_id: int, amount: int, op: str, description: str,
                    **extra: Any) -> bool:
    """A partial refund's share of a purchased balance (minor units), keyed `op`: taken from
    what remains of it, the rest owed as overage. False when the balance is no longer live."""
    return await _take_back(ctx, "clawback", balance_id, amount, op, description, **extra)


async def _take_back(ctx: AppContext, kind: str, balance_id: int, amount: int, op: str,
                     description: str, **extra: Any) -> bool:
    try:
        _, account, credit_type = await _live_balance(ctx, balance_id)
        payload = _op_payload(op, account, credit_type, balance_id, description, **extra)
        await ledger_op(ctx, account, kind, balance_id, payload, amount)
    except Conflict:
        return False
    return True


async def pay_overage(ctx: AppContext, balance_id: int, op: str, description: str,
                      **extra: Any) -> bool:
    """Pay what the balance's account owes in its credit type out of the balance, as much as
    it holds, once per `op` (a purchase that pays overage; its caller holds the purchase's
    lock). False when nothing new was done: paid before, or the balance is no longer live."""
    try:
        _, account, credit_type = await _live_balance(ctx, balance_id)
    except Conflict:
        return False
    await ctx.journal.recover_root(account.root_id)  # a payment cut short is committed first
    if await repo.committed_ops(ctx.pool, [op]):
        return False
    payload = _op_payload(op, account, credit_type, balance_id, description, **extra)
    try:
        await ledger_op(ctx, account, "pay", balance_id, payload)
    except Conflict:
        return False
    return True


# Rating give-backs: credit returned under operation keys the caller chose, so a retry (or a
# second process repairing the same give-back) changes nothing once the first one committed.

async def credit_back(ctx: AppContext, account: AccountRef, credit_type: CreditTypeRef,
                      balance_id: int, amount: int, op: str, *, uid: str | None,
                      product: str | None, description: str, kind: str = "adjustment",
                      **extra: Any) -> bool:
    """Give `amount` (minor units) back to a balance as an entry of `kind` (adjustment, release,
    rollover) keyed `op`, traced to `uid` and `product` when given. False when the balance is
    no longer live (voided or expired)."""
    payload = _op_payload(op, account, credit_type, balance_id, description, uid=uid,
                          prod=product, **extra)
    try:
        await ledger_op(ctx, account, kind, balance_id, payload, amount)
    except Conflict:
        return False
    return True


async def grant_reserved(ctx: AppContext, account: AccountRef, credit_type: CreditTypeRef,
                         balance_id: int, amount: int, *, products: list[str] | None,
                         priority: int, description: str, source: str,
                         effective: datetime | None = None,
                         expires: datetime | None = None) -> None:
    """Grant a balance under an id the caller reserved (`next_balance_id`), effective now (or
    `effective`) and never expiring (or at `expires`); once only, however often it is called."""
    op = f"g:{balance_id}"
    if await repo.committed_ops(ctx.pool, [op]):
        return
    eff_ms = to_ms(effective) if effective is not None else now_ms()
    exp_ms = to_ms(expires) if expires is not None else None
    scope = sorted(set(products)) if products else None
    definition = balance_def(credit_type.code, priority, eff_ms, exp_ms, "active", scope)
    payload = _op_payload(op, account, credit_type, balance_id, description, bal={
        "products": scope, "priority": priority, "eff": eff_ms, "exp": exp_ms,
        "description": description, "source": source})
    payload["def"] = definition
    try:
        await ledger_op(ctx, account, "grant", balance_id, payload, amount, definition)
    except Conflict:  # granted meanwhile by another caller: make sure that one is committed
        await ctx.journal.recover_root(account.root_id)
        if not await repo.committed_ops(ctx.pool, [op]):
            raise


async def roll_over(ctx: AppContext, account: AccountRef, credit_type: CreditTypeRef,
                    balance_id: int, amount: int, from_balance: int) -> bool:
    """Add to a balance (minor units) what another left unused, as a `rollover` entry keyed
    `o:<from balance>`: once only. False when the balance is no longer live."""
    op = f"o:{from_balance}"
    if await repo.committed_ops(ctx.pool, [op]):
        return True
    return await credit_back(ctx, account, credit_type, balance_id, amount, op, uid=None,
                             product=None, description=f"rolled over from balance "
                             f"{from_balance}", kind="rollover", **{"from": from_balance})
