"""Threshold auto-recharge: "when my balance falls to X, recharge me back to Y".

A recharge starts from a crossing of the hot path's `recharge` watch (app/recharge/triggers.py),
from saving an enabled config while the balance is already low, or from the sweep that finds a
low balance nothing crossed (expiry, a rebuild). Each buys `recharge_to - available` as it was
when it started, so one charge closes the whole gap; at most one is in flight per account and
credit type. The runner pays it through the purchase flow (off-session, credits drawable once
paid) with a Stripe idempotency key named after the recharge:

    pending ──claim──> processing ──paid──> succeeded           (auto_recharge.succeeded)
                           │ └──guard (disabled, daily limit, minimum charge)──> failed
                           └──payment failed──> failed, config disabled (failed + disabled)

Stripe unreachable: it stays processing and the runner asks again after a backoff with the
same key; a runner that died mid-way leaves its claim to expire the same way.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

from app.config import repository as config_repo
from app.config.catalog import AccountRef, CreditTypeRef
from app.entitlements.service import live_balances
from app.errors import NotFound, Problem, Unavailable, ValidationProblem
from app.hotstate.store import RECHARGE_WATCH
from app.ledger import service as ledger
from app.ledger.ops import now_ms
from app.money import fmt
from app.purchases import repository as purchases_repo
from app.purchases import service as purchases
from app.purchases.currencies import CURRENCIES, MAX_MINOR, currency
from app.recharge import repository as repo
from app.recharge.schemas import AutoRechargeIn, AutoRechargeList, AutoRechargeOut, RechargeOut
from app.webhooks.outbox import OutboxEvent, event_id, publish

if TYPE_CHECKING:
    from app.context import AppContext

log = logging.getLogger(__name__)
SWEEP_BUCKET_S = 600  # the sweep starts at most one recharge per config in this window
SWEEP_PAGE = 200
TRIGGERS = {"x": "crossing", "enable": "enable", "sweep": "sweep"}


# configs

def config_out(row: asyncpg.Record) -> AutoRechargeOut:
    dp, exponent = row["decimal_places"], CURRENCIES[row["currency"]].exponent
    return AutoRechargeOut(
        account=row["account"], credit_type=row["credit_type"], enabled=row["enabled"],
        threshold=fmt(Decimal(row["threshold"]), dp), recharge_to=fmt(Decimal(row["recharge_to"]), dp),
        price_per_credit=f"{Decimal(row['price_per_credit']).normalize():f}",
        currency=row["currency"], expires_in_days=row["expires_in_days"],
        products=row["product_codes"], payment_method_id=row["payment_method_id"],
        max_per_day=row["max_per_day"], min_charge=fmt(Decimal(row["min_charge"]), exponent),
        pays_overage=row["pays_overage"], disabled_reason=row["disabled_reason"],
        updated_at=row["updated_at"])


def _price_per_credit(body: AutoRechargeIn, credit_type: CreditTypeRef) -> Decimal:
    if body.price_per_credit is not None:
        return body.price_per_credit
    if credit_type.kind == "fiat":
        return Decimal(1)
    raise ValidationProblem(f"credit type {credit_type.code!r} is not fiat: give its price",
                            field="price_per_credit")


def _exact(amount: Decimal, exponent: int, field: str) -> None:
    scaled = amount.scaleb(exponent)
    if scaled != scaled.to_integral_value():
        raise ValidationProblem(f"has more than {exponent} decimal places", field=field)


async def save_config(ctx: AppContext, code: str, credit_type_code: str,
                      body: AutoRechargeIn) -> AutoRechargeOut:
    """Create or replace the config, set (or remove) the hot-path watch, and start a recharge
    at once when it is enabled and the balance is already at or below the threshold."""
    account = await ledger.account_ref(ctx, code)
    credit_type = await ledger.resolve_credit_type(ctx, account, credit_type_code)
    threshold = ledger.scaled(body.threshold, credit_type, "threshold")
    ledger.scaled(body.recharge_to, credit_type, "recharge_to")
    if body.recharge_to <= body.threshold:
        raise ValidationProblem("must be above the threshold", field="recharge_to")
    price_per_credit = _price_per_credit(body, credit_type)
    money = currency(body.currency)
    _exact(body.min_charge, money.exponent, "min_charge")
    if body.products:
        unknown = sorted(set(body.products) - await config_repo.existing_products(ctx.pool, body.products))
        if unknown:
            raise ValidationProblem(f"unknown products: {', '.join(unknown)}", field="products")
    if body.enabled:  # no customer or no card: refused now, not at the first charge
        await purchases.saved_payment_method(ctx, account, body.payment_method_id)
    await repo.save_config(
        ctx.pool, account.id, credit_type.id, enabled=body.enabled, threshold=body.threshold,
        recharge_to=body.recharge_to, price_per_credit=price_per_credit, currency=money.code,
        expires_in_days=body.expires_in_days,
        products=sorted(set(body.products)) if body.products else None,
        payment_method_id=body.payment_method_id, max_per_day=body.max_per_day,
        min_charge=body.min_charge, pays_overage=body.pays_overage)
    await ctx.hot.set_watch(account.root_id, account.id, RECHARGE_WATCH, credit_type.code,
                            threshold if body.enabled else None, "le", now_ms())
    row = await repo.config(ctx.pool, account.id, credit_type.id)
    assert row is not None
    if body.enabled:
        stamp = row["updated_at"].isoformat()
        await start_if_low(ctx, account, credit_type, Decimal(row["threshold"]),
                           f"enable:{account.id}:{credit_type.id}:{stamp}")
    return config_out(row)


async def read_config(ctx: AppContext, code: str, credit_type_code: str) -> AutoRechargeOut:
    account = await ledger.account_ref(ctx, code)
    credit_type = await ledger.resolve_credit_type(ctx, account, credit_type_code)
    row = await repo.config(ctx.pool, account.id, credit_type.id)
    if row is None:
        raise NotFound(f"account {code!r} has no auto-recharge for {credit_type.code!r}",
                       field="credit_type")
    return config_out(row)


async def list_configs(ctx: AppContext, code: str) -> AutoRechargeList:
    account = await ledger.account_ref(ctx, code)
    return AutoRechargeList(data=[config_out(r) for r in await repo.configs(ctx.pool, account.id)])


def recharge_out(row: asyncpg.Record) -> RechargeOut:
    dp = row["decimal_places"]
    return RechargeOut(
        id=row["id"], account=row["account"], credit_type=row["credit_type"], status=row["status"],
        trigger=TRIGGERS.get(row["trigger_key"].split(":")[0], "other"),
        available=fmt(Decimal(row["available"]), dp), credits=fmt(Decimal(row["credits"]), dp),
        owed=None if row["owed"] is None else fmt(Decimal(row["owed"]), dp),
        purchase_id=row["purchase_id"], reason=row["reason"], created_at=row["created_at"],
        updated_at=row["updated_at"])


async def account_recharges(ctx: AppContext, code: str, after_id: int,
                            limit: int) -> list[asyncpg.Record]:
    account = await ledger.account_ref(ctx, code)
    return await repo.account_recharges(ctx.pool, account.id, after_id, limit)


# starting a recharge without a crossing

async def available(ctx: AppContext, code: str, credit_type: str) -> Decimal:
    """The account's own drawable balance of a credit type, from the hot state (what the
    `recharge` watch compares with its threshold)."""
    return (await _totals(ctx, code, credit_type))[0]


async def _totals(ctx: AppContext, code: str, credit_type: str) -> tuple[Decimal, Decimal]:
    """The account's own drawable balance of a credit type and what it owes in it (its
    overage), from the hot state."""
    view = await live_balances(ctx, code)
    for total in view.totals:
        if total.credit_type == credit_type:
            return Decimal(total.available), Decimal(total.overage)
    return Decimal(0), Decimal(0)


async def start_if_low(ctx: AppContext, account: AccountRef, credit_type: CreditTypeRef,
                       threshold: Decimal, trigger_key: str,
                       unchanged_since: datetime | None = None) -> int | None:
    """Start a recharge when the balance is at or below the threshold and none is in flight."""
    balance = await available(ctx, account.code, credit_type.code)
    if balance > threshold:
        return None
    return await repo.start(ctx.pool, account.id, credit_type.id, trigger_key, balance,
                            unchanged_since)


async def sweep(ctx: AppContext, after: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """Start the recharges no crossing started: enabled configs whose balance is at or below
    the threshold with nothing in flight. Pages through the configs; returns where to go on."""
    rows = await repo.sweep_candidates(ctx.pool, after, SWEEP_PAGE)
    bucket = int(time.time()) // SWEEP_BUCKET_S
    for row in rows:
        # a recharge that settled after this instant may have changed the balance we read
        since = await repo.db_now(ctx.pool)
        account = await ledger.account_ref(ctx, row["account"])
        credit_type = await ctx.catalog.credit_type_by_id(row["credit_type_id"])
        key = f"sweep:{account.id}:{credit_type.id}:{bucket}"
        if await start_if_low(ctx, account, credit_type, Decimal(row["threshold"]), key, since):
            log.info("auto-recharge of %s %s started by the sweep", account.code, credit_type.code)
    if len(rows) < SWEEP_PAGE:
        return (0, 0)
    return (rows[-1]["account_id"], rows[-1]["credit_type_id"])


# running a recharge

def charge_price(row: asyncpg.Record) -> Decimal:
    """credits x price per credit, rounded half-up to the currency's minor unit: the one place
    a recharge's price is rounded."""
    exponent = CURRENCIES[row["currency"]].exponent
    return (Decimal(row["credits"]) * Decimal(row["price_per_credit"])).quantize(
        Decimal(1).scaleb(-exponent), rounding=ROUND_HALF_UP)


async def _guard(ctx: AppContext, row: asyncpg.Record) -> tuple[str, str] | None:
    """Why this recharge must not be charged (reason, message), or None."""
    if not row["enabled"]:
        return "disabled", "auto-recharge was disabled before this recharge was charged"
    charged = await repo.charges_today(ctx.pool, row["account_id"], row["credit_type_id"], row["id"])
    if charged >= row["max_per_day"]:
        return "daily_limit", (f"{charged} recharges were charged today (UTC); max_per_day is "
                               f"{row['max_per_day']}")
    money = CURRENCIES[row["currency"]]
    price, minimum = charge_price(row), max(Decimal(row["min_charge"]), money.minimum)
    if price < minimum:
        return "below_min_charge", (f"the charge of {money.render(price)} {money.code.upper()} "
                                    f"is below the minimum of {money.render(minimum)}")
    if price.scaleb(money.exponent) > MAX_MINOR:
        return "above_max_charge", f"the charge of {money.render(price)} is above Stripe's maximum"
    return None


async def process(ctx: AppContext, row: asyncpg.Record) -> None:
    """Move one claimed recharge on: guard, pay, settle. Safe to repeat and to run twice."""
    if row["status"] not in ("pending", "processing"):
        return
    if await purchases_repo.purchase_by_recharge(ctx.pool, row["id"]) is None:
        if row["pays_overage"] and row["owed"] is None:  # fixed before the first charge
            owed = (await _totals(ctx, row["account"], row["credit_type"]))[1]
            row = await repo.fix_owed(ctx.pool, row["id"], max(owed, Decimal(0)))
        refused = await _guard(ctx, row)
        if refused is not None:
            await _fail(ctx, row, *refused, disable=None)
            return
    account = await ledger.account_ref(ctx, row["account"])
    credit_type = await ctx.catalog.credit_type_by_id(row["credit_type_id"])
    expires = row["expires_in_days"]
    request = purchases.RechargePurchase(
        recharge_id=row["id"], account=account, credit_type=credit_type,
        credits=Decimal(row["credits"]), price=charge_price(row), currency=row["currency"],
        expires_at=datetime.now(UTC) + timedelta(days=expires) if expires else None,
        products=row["product_codes"], payment_method=row["payment_method_id"],
        pays_overage=row["owed"] is not None and Decimal(row["owed"]) > 0)
    try:
        progress = await purchases.purchase_for_recharge(ctx, request)
    except Unavailable as exc:  # Stripe unreachable: asked again after the backoff, same key
        log.warning("auto-recharge %s: %s", row["id"], exc.detail)
        return
    except Problem as exc:  # no customer, no card: nothing can be charged until someone acts
        await _fail(ctx, row, exc.code, exc.detail, disable=f"{exc.code}: {exc.detail}")
        return
    await repo.link_purchase(ctx.pool, row["id"], progress.row["id"])
    await settle(ctx, row, progress.row)


async def settle(ctx: AppContext, row: asyncpg.Record, purchase: asyncpg.Record) -> None:
    status = purchase["status"]
    if status in ("paid", "refunded"):
        await _succeed(ctx, row, purchase)
    elif status == "failed":
        code = purchase["failure_code"] or "payment_failed"
        detail = ", ".join(filter(None, [code, purchase["decline_code"]]))
        message = purchase["failure_message"] or "the payment failed"
        # a charge Stripe never got (unreachable for a day) is no reason to stop recharging
        disable = None if code == "stripe_unreachable" else f"payment_failed ({detail}): {message}"
        await _fail(ctx, row, "payment_failed", message, disable=disable, purchase=purchase)
    # else: still unsettled in Stripe (processing, needs action, unreachable): asked again later


def _event(row: asyncpg.Record, kind: str, **data: Any) -> OutboxEvent:
    dp = row["decimal_places"]
    return OutboxEvent(
        event_id("auto_recharge", row["id"], kind), kind, row["account_id"], None,
        datetime.now(UTC),
        {"account": row["account"], "credit_type": row["credit_type"], "recharge_id": row["id"],
         "trigger": TRIGGERS.get(row["trigger_key"].split(":")[0], "other"),
         "credits": fmt(Decimal(row["credits"]), dp),
         "available_at_start": fmt(Decimal(row["available"]), dp),
         **({} if row["owed"] is None else {"owed": fmt(Decimal(row["owed"]), dp)}), **data})


async def _succeed(ctx: AppContext, row: asyncpg.Record, purchase: asyncpg.Record) -> None:
    money = CURRENCIES[purchase["currency"]]
    balance = await available(ctx, row["account"], row["credit_type"])
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await repo.finish(conn, row["id"], "succeeded", None):
            await publish(conn, [_event(
                row, "auto_recharge.succeeded", purchase_id=purchase["id"],
                price=money.render(Decimal(purchase["price"])), currency=money.code,
                payment_intent=purchase["payment_intent_id"],
                balance=fmt(balance, row["decimal_places"]))])


async def _fail(ctx: AppContext, row: asyncpg.Record, reason: str, message: str, *,
                disable: str | None, purchase: asyncpg.Record | None = None) -> None:
    """Fail the recharge with its reason; with `disable`, also turn auto-recharge off."""
    extra: dict[str, Any] = {}
    if purchase is not None:
        extra = {"purchase_id": purchase["id"], "code": purchase["failure_code"],
                 "decline_code": purchase["decline_code"]}
    disabled = False
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await repo.finish(conn, row["id"], "failed", reason):
            return
        events = [_event(row, "auto_recharge.failed", reason=reason, message=message, **extra)]
        if disable is not None and await repo.disable_config(conn, row["account_id"],
                                                             row["credit_type_id"], disable):
            disabled = True
            events.append(_event(row, "auto_recharge.disabled", reason=disable))
        await publish(conn, events)
    if disabled:
        account = await ledger.account_ref(ctx, row["account"])
        await ctx.hot.set_watch(account.root_id, account.id, RECHARGE_WATCH, row["credit_type"],
                                None, "le", now_ms())
