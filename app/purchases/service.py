"""Credit purchases through Stripe: pay first, then grant.

A purchase owns a *pending* balance (not drawable) from the start. Whatever reports the
payment first (our create call, Stripe's webhook, the reconciler) moves it on, always through
the same functions, so order and repetition do not matter:

    pending ──(Stripe: succeeded)──> granting ──(grant entry committed)──> paid ──> refunded
       └──(declined, canceled, expired)──> failed (the pending balance is voided)

Only a pending purchase can fail and only a granting one becomes paid (compare-and-set on the
row), so a late `payment_failed` never voids granted credit, and the grant itself is
`ledger.activate`, which grants a balance once whoever calls it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from app.config import repository as config_repo
from app.config.catalog import AccountRef, CreditTypeRef
from app.config.service import account_row
from app.db import exclusive
from app.errors import Conflict, NotFound, Problem, Unavailable, ValidationProblem
from app.ledger import repository as ledger_repo
from app.ledger import service as ledger
from app.money import fmt, scaled_text, to_scaled
from app.purchases import repository as repo
from app.purchases.currencies import CURRENCIES, currency
from app.purchases.schemas import (
    Failure,
    NextAction,
    PurchaseIn,
    PurchaseOut,
    StripeCustomerIn,
    StripeCustomerOut,
    StripeRefs,
    WebhookReceipt,
    after,
)
from app.purchases.stripe_gateway import (
    PURCHASE_KEY,
    BadSignature,
    Charge,
    ChargeRequest,
    CheckoutRequest,
    Declined,
    Intent,
    Rejected,
    Session,
    StripeGateway,
    StripeProblem,
    Unreachable,
    charge_from,
    intent_from,
    session_from,
)
from app.webhooks.outbox import OutboxEvent, event_id, publish

if TYPE_CHECKING:
    from app.context import AppContext

log = logging.getLogger(__name__)
T = TypeVar("T")

# The creating request settles a purchase itself; the reconciler looks only after this.
FIRST_CHECK = timedelta(seconds=30)
# Stripe keeps an idempotency key 24 h: until then a create is re-sent with the same key,
# after that it is only searched for (re-sending could charge twice).
RESEND_WINDOW = timedelta(hours=23)
# A payment waiting this long for the customer (requires_action) is cancelled.
ACTION_TIMEOUT = timedelta(hours=24)
# An event the webhook could not finish is retried by the reconciler after this.
EVENT_RETRY = timedelta(seconds=60)
UNSETTLED = ("pending", "granting")
PURCHASE_LOCK = 0x72656664  # advisory lock class of a purchase's take-backs and overage payment


class StripeNotConfigured(Problem):
    status = 409
    code = "stripe_not_configured"
    title = "This deployment takes no Stripe payments"


class StripeUnavailable(Unavailable):
    code = "stripe_unavailable"
    title = "Stripe cannot be reached"


class NoStripeCustomer(ValidationProblem):
    code = "no_stripe_customer"
    title = "The account has no Stripe customer"


class NoPaymentMethod(ValidationProblem):
    code = "no_default_payment_method"
    title = "The Stripe customer has no default payment method"


class InvalidSignature(Problem):
    status = 400
    code = "invalid_signature"
    title = "Stripe-Signature does not verify"


class PaymentFailed(Problem):
    status = 402
    code = "payment_failed"
    title = "Payment failed"

    def __init__(self, purchase: PurchaseOut) -> None:
        failure = purchase.failure or Failure(code=None, decline_code=None, message=None)
        reason = failure.decline_code or failure.code or "payment_failed"
        super().__init__(f"the payment failed ({reason}); no credits were granted",
                         field="payment_method")
        self.purchase = purchase

    def body(self) -> dict[str, Any]:
        return super().body() | {"purchase": self.purchase.model_dump(mode="json")}


@dataclass(frozen=True)
class Progress:
    """A purchase as it stands, with the PaymentIntent Stripe just returned (if any)."""

    row: asyncpg.Record
    intent: Intent | None = None


def gateway(ctx: AppContext) -> StripeGateway:
    if ctx.stripe is None:
        raise StripeNotConfigured("set STRIPE_API_KEY (and STRIPE_WEBHOOK_SECRET) to take payments")
    return ctx.stripe


# reads

def purchase_out(row: asyncpg.Record, intent: Intent | None = None) -> PurchaseOut:
    exponent = CURRENCIES[row["currency"]].exponent
    action = None
    if row["next_action"] and row["status"] == "pending":
        live = intent if intent is not None and intent.next_action == row["next_action"] else None
        action = NextAction(type=row["next_action"], redirect_url=live.redirect_url if live else None,
                            client_secret=live.client_secret if live else None)
    failure = None
    if row["failure_code"]:
        failure = Failure(code=row["failure_code"], decline_code=row["decline_code"],
                          message=row["failure_message"])
    return PurchaseOut(
        id=row["id"], account=row["account"], status=row["status"],
        credits=fmt(Decimal(row["credits"]), row["decimal_places"]), credit_type=row["credit_type"],
        price=fmt(Decimal(row["price"]), exponent), currency=row["currency"], method=row["method"],
        balance_id=row["balance_id"], expires_at=row["expires_at"], products=row["product_codes"],
        description=row["description"],
        stripe=StripeRefs(customer=row["stripe_customer_id"], payment_intent=row["payment_intent_id"],
                          checkout_session=row["checkout_session_id"], status=row["stripe_status"]),
        checkout_url=row["checkout_url"] if row["status"] == "pending" else None,
        next_action=action, failure=failure,
        amount_refunded=CURRENCIES[row["currency"]].render_minor(row["amount_refunded"]),
        pays_overage=row["pays_overage"],
        overage_paid=None if row["overage_paid"] is None else
        fmt(Decimal(row["overage_paid"]), row["decimal_places"]),
        created_at=row["created_at"], updated_at=row["updated_at"], paid_at=row["paid_at"])


async def account_purchases(ctx: AppContext, code: str, after_id: int,
                            limit: int) -> list[asyncpg.Record]:
    account = await ledger.account_ref(ctx, code)
    return await repo.account_purchases(ctx.pool, account.id, after_id, limit)


async def read_purchase(ctx: AppContext, code: str, purchase_id: int) -> PurchaseOut:
    row = await repo.purchase(ctx.pool, purchase_id)
    if row is None or row["account"] != code:
        raise NotFound(f"account {code!r} has no purchase {purchase_id}", field="purchase_id")
    return purchase_out(row)


# customers

async def _customer_out(ctx: AppContext, code: str, link: asyncpg.Record) -> StripeCustomerOut:
    try:
        customer = await gateway(ctx).customer(link["customer_id"])
    except Unreachable as exc:
        raise StripeUnavailable(exc.message) from exc
    except Rejected:
        customer = None
    return StripeCustomerOut(account=code, customer_id=link["customer_id"],
                             created_here=link["created_here"],
                             default_payment_method=customer.default_payment_method if customer else None)


async def stripe_customer(ctx: AppContext, code: str) -> StripeCustomerOut:
    account = await account_row(ctx, code)
    link = await repo.customer_link(ctx.pool, account["id"])
    if link is None:
        raise NotFound(f"account {code!r} has no Stripe customer", field="code")
    return await _customer_out(ctx, code, link)


async def link_customer(ctx: AppContext, code: str, body: StripeCustomerIn) -> StripeCustomerOut:
    """Attach an existing Stripe customer, or create one (name, email, our account code)."""
    account = await account_row(ctx, code)
    link = await repo.customer_link(ctx.pool, account["id"])
    if link is not None:
        if body.customer_id and body.customer_id != link["customer_id"]:
            raise Conflict(f"account {code!r} is linked to {link['customer_id']} already",
                           field="customer_id")
        return await _customer_out(ctx, code, link)
    gw = gateway(ctx)
    try:
        if body.customer_id:
            customer = await gw.customer(body.customer_id)
            if customer.deleted:
                raise Rejected("the customer was deleted")
        else:
            customer = await gw.create_customer(body.name or account["name"],
                                                body.email or account["email"], code,
                                                f"account-{account['id']}-customer")
    except Rejected as exc:
        raise ValidationProblem(f"Stripe refused: {exc.message}", field="customer_id") from exc
    except Unreachable as exc:
        raise StripeUnavailable(exc.message) from exc
    try:
        await repo.link_customer(ctx.pool, account["id"], customer.id, not body.customer_id)
    except asyncpg.UniqueViolationError as exc:
        owner = await repo.account_of_customer(ctx.pool, customer.id)
        raise Conflict(f"{customer.id} is linked to account {owner!r}", field="customer_id") from exc
    link = await repo.customer_link(ctx.pool, account["id"])
    assert link is not None
    return StripeCustomerOut(account=code, customer_id=link["customer_id"],
                             created_here=link["created_here"],
                             default_payment_method=customer.default_payment_method
                             if link["customer_id"] == customer.id else None)


# creating a purchase

async def create_purchase(ctx: AppContext, code: str, body: PurchaseIn, api_key_id: int,
                          request_key: str) -> Progress:
    """Validate, create the purchase and its pending balance, and charge (or open Checkout).
    The same API request (key and Idempotency-Key) continues its purchase instead."""
    existing = await repo.purchase_by_request(ctx.pool, api_key_id, request_key)
    if existing is not None:
        return await advance(ctx, existing)
    account = await ledger.account_ref(ctx, code)
    credit_type = await ledger.resolve_credit_type(ctx, account, body.credit_type)
    ledger.scaled(body.credits, credit_type, "credits")
    price = currency(body.currency)
    amount = price.minor_units(body.price)
    expires_at = _expiry(body)
    if body.products:
        unknown = sorted(set(body.products) - await config_repo.existing_products(ctx.pool, body.products))
        if unknown:
            raise ValidationProblem(f"unknown products: {', '.join(unknown)}", field="products")
    if body.method == "checkout" and not body.success_url:
        raise ValidationProblem("checkout needs the page Stripe returns the customer to",
                                field="success_url")
    link = await repo.customer_link(ctx.pool, account.id)
    if link is None:
        raise NoStripeCustomer(
            f"account {code!r} has no Stripe customer: POST /v1/accounts/{code}/stripe-customer",
            field="account")
    payment_method = None
    if body.method == "saved_card":
        payment_method = await _default_payment_method(ctx, code, link["customer_id"])
    description = body.description or f"{fmt(body.credits, credit_type.decimal_places)} " \
                                      f"{credit_type.code} credits"
    products = sorted(set(body.products)) if body.products else None
    balance_id = await ledger.create_pending(ctx, account, credit_type, products=products,
                                             expires_at=expires_at, description=description)
    purchase_id = await repo.insert_purchase(
        ctx.pool, account_id=account.id, balance_id=balance_id, credit_type_id=credit_type.id,
        credits=body.credits, price=body.price, currency=price.code, amount_minor=amount,
        method=body.method, customer_id=link["customer_id"], payment_method_id=payment_method,
        success_url=body.success_url, cancel_url=body.cancel_url, description=description,
        api_key_id=api_key_id, request_key=request_key, first_check=FIRST_CHECK,
        pays_overage=body.pays_overage)
    if purchase_id is None:  # the same request, running twice at once: continue the other's
        await ledger.cancel_pending(ctx, balance_id)
        existing = await repo.purchase_by_request(ctx.pool, api_key_id, request_key)
        assert existing is not None
        return await advance(ctx, existing)
    return await advance(ctx, await _reload(ctx, purchase_id))


def _expiry(body: PurchaseIn) -> datetime:
    now = datetime.now(UTC)
    if body.expires_in is not None and body.expires_at is not None:
        raise ValidationProblem("give expires_in or expires_at, not both", field="expires_at")
    if body.expires_in is not None:
        return after(now, body.expires_in)
    if body.expires_at is None:
        raise ValidationProblem("purchased credits need an expiry: expires_in or expires_at",
                                field="expires_in")
    if body.expires_at <= now:
        raise ValidationProblem("must be in the future", field="expires_at")
    return body.expires_at


async def _default_payment_method(ctx: AppContext, code: str, customer_id: str) -> str:
    try:
        customer = await gateway(ctx).customer(customer_id)
    except Unreachable as exc:
        raise StripeUnavailable(f"cannot read the customer's payment method: {exc.message}") from exc
    except Rejected as exc:
        raise NoStripeCustomer(f"Stripe customer {customer_id} of account {code!r} cannot be "
                               f"read: {exc.message}", field="account") from exc
    if customer.deleted:
        raise NoStripeCustomer(f"Stripe customer {customer_id} of account {code!r} was deleted",
                               field="account")
    if customer.default_payment_method is None:
        raise NoPaymentMethod(
            f"Stripe customer {customer_id} has no default payment method "
            "(invoice_settings.default_payment_method): buy with method=checkout", field="account")
    return customer.default_payment_method


# paying an auto-recharge (app/recharge/)

@dataclass(frozen=True)
class RechargePurchase:
    recharge_id: int
    account: AccountRef
    credit_type: CreditTypeRef
    credits: Decimal
    price: Decimal
    currency: str
    expires_at: datetime | None
    products: list[str] | None
    payment_method: str | None  # None: the customer's default
    pays_overage: bool = False  # once paid, the credits pay what the account owes first


async def saved_payment_method(ctx: AppContext, account: AccountRef,
                               chosen: str | None) -> tuple[str, str]:
    """The account's Stripe customer and the payment method an off-session charge uses."""
    link = await repo.customer_link(ctx.pool, account.id)
    if link is None:
        raise NoStripeCustomer(f"account {account.code!r} has no Stripe customer: "
                               f"POST /v1/accounts/{account.code}/stripe-customer", field="account")
    if chosen:
        return link["customer_id"], chosen
    return link["customer_id"], await _default_payment_method(ctx, account.code, link["customer_id"])


async def purchase_for_recharge(ctx: AppContext, request: RechargePurchase) -> Progress:
    """The one purchase paying an auto-recharge (off-session, saved card): created on the first
    call, moved on like any other purchase on every later one."""
    existing = await repo.purchase_by_recharge(ctx.pool, request.recharge_id)
    if existing is not None:
        return await advance(ctx, existing)
    price = currency(request.currency)
    amount = price.minor_units(request.price)
    customer_id, payment_method = await saved_payment_method(ctx, request.account,
                                                             request.payment_method)
    description = (f"auto-recharge: {fmt(request.credits, request.credit_type.decimal_places)} "
                   f"{request.credit_type.code} credits")
    balance_id = await ledger.create_pending(ctx, request.account, request.credit_type,
                                             products=request.products,
                                             expires_at=request.expires_at,
                                             description=description, source="auto_recharge")
    purchase_id = await repo.insert_recharge_purchase(
        ctx.pool, recharge_id=request.recharge_id, account_id=request.account.id,
        balance_id=balance_id, credit_type_id=request.credit_type.id, credits=request.credits,
        price=request.price, currency=price.code, amount_minor=amount, customer_id=customer_id,
        payment_method_id=payment_method, description=description, first_check=FIRST_CHECK,
        pays_overage=request.pays_overage)
    if purchase_id is None:  # another runner created it first: continue that one
        await ledger.cancel_pending(ctx, balance_id)
        existing = await repo.purchase_by_recharge(ctx.pool, request.recharge_id)
        assert existing is not None
        return await advance(ctx, existing)
    return await advance(ctx, await _reload(ctx, purchase_id))


# moving a purchase on (request, webhook and reconciler alike)

async def _reload(ctx: AppContext, purchase_id: int) -> asyncpg.Record:
    row = await repo.purchase(ctx.pool, purchase_id)
    assert row is not None
    return row


def _age(row: asyncpg.Record) -> timedelta:
    created: datetime = row["created_at"]
    return datetime.now(UTC) - created


async def advance(ctx: AppContext, row: asyncpg.Record) -> Progress:
    """Ask Stripe where an unsettled purchase stands and settle it if Stripe has."""
    if row["status"] not in UNSETTLED:
        return Progress(row)
    if row["status"] == "granting":  # Stripe said paid; our grant did not finish
        return Progress(await _grant(ctx, row, None))
    gw = gateway(ctx)
    try:
        if row["method"] == "checkout":
            return Progress(await _advance_checkout(ctx, gw, row))
        intent = await _current_intent(gw, row)
    except Declined as exc:
        if exc.intent is not None:
            await repo.record_intent(ctx.pool, row["id"], exc.intent.id, exc.intent.status, None)
        return Progress(await _fail(ctx, row, exc.code or "card_declined", exc.decline_code,
                                    exc.message))
    except Rejected as exc:
        return Progress(await _fail(ctx, row, exc.code or "stripe_rejected", None, exc.message))
    except Unreachable as exc:
        log.warning("purchase %s: Stripe unreachable: %s", row["id"], exc.message)
        await repo.note_error(ctx.pool, row["id"], exc.message)
        return Progress(await _reload(ctx, row["id"]))
    if intent is None:
        return Progress(await _fail(ctx, row, "stripe_unreachable", None,
                                    "the payment could not be created in Stripe in time"))
    try:
        return Progress(await apply_intent(ctx, row, intent), intent)
    except Unreachable as exc:  # cancelling a failed intent: the next pass tries again
        await repo.note_error(ctx.pool, row["id"], exc.message)
        return Progress(await _reload(ctx, row["id"]), intent)


async def _known(read: Awaitable[T], what: str) -> T:
    """Read an object we created. Stripe refusing to show it (wrong key, wrong account) says
    nothing about the payment: keep waiting and let an operator look, never fail on it."""
    try:
        return await read
    except Rejected as exc:
        raise Unreachable(f"Stripe refused to show {what}: {exc.message}") from exc


async def _current_intent(gw: StripeGateway, row: asyncpg.Record) -> Intent | None:
    if row["payment_intent_id"]:
        return await _known(gw.intent(row["payment_intent_id"]), row["payment_intent_id"])
    if _age(row) < RESEND_WINDOW:
        # first attempt, or a re-send of one whose answer we never got: same key, same params
        return await gw.create_intent(ChargeRequest(
            purchase_id=row["id"], account_code=row["account"], amount=row["amount_minor"],
            currency=row["currency"], customer=row["stripe_customer_id"],
            payment_method=row["payment_method_id"], description=row["description"]),
            _intent_key(row))
    return await _known(gw.find_intent(row["id"]), f"purchase {row['id']}'s PaymentIntent")


def _intent_key(row: asyncpg.Record) -> str:
    """Stripe's idempotency key of the purchase's PaymentIntent; an auto-recharge's names the
    recharge, so one crossing is one charge whoever sends it."""
    if row["recharge_id"] is not None:
        return f"auto-recharge-{row['recharge_id']}-pi"
    return f"purchase-{row['id']}-pi"


async def _advance_checkout(ctx: AppContext, gw: StripeGateway, row: asyncpg.Record) -> asyncpg.Record:
    if row["checkout_session_id"]:
        session = await _known(gw.checkout_session(row["checkout_session_id"]),
                               row["checkout_session_id"])
        return await apply_session(ctx, row, session)
    if _age(row) >= RESEND_WINDOW:  # never created, so never shown to anyone: nothing was paid
        return await _fail(ctx, row, "stripe_unreachable", None,
                           "the Checkout Session could not be created in Stripe in time")
    session = await gw.create_checkout(CheckoutRequest(
        purchase_id=row["id"], account_code=row["account"], amount=row["amount_minor"],
        currency=row["currency"], customer=row["stripe_customer_id"],
        description=row["description"], success_url=row["success_url"],
        cancel_url=row["cancel_url"]), f"purchase-{row['id']}-checkout")
    await repo.record_session(ctx.pool, row["id"], session.id, session.url, session.status,
                              session.payment_intent)
    return await _reload(ctx, row["id"])


def _intent_belongs(row: asyncpg.Record, intent: Intent) -> bool:
    ours = intent.metadata.get(PURCHASE_KEY) == str(row["id"]) or intent.id == row["payment_intent_id"]
    return ours and intent.amount == int(row["amount_minor"]) and intent.currency == str(row["currency"])


async def apply_intent(ctx: AppContext, row: asyncpg.Record, intent: Intent) -> asyncpg.Record:
    """Settle a purchase from a PaymentIntent (a fresh one, or an event's snapshot)."""
    if not _intent_belongs(row, intent):
        log.error("purchase %s: PaymentIntent %s does not match it (amount %s %s); ignored",
                  row["id"], intent.id, intent.amount, intent.currency)
        return row
    if intent.status == "succeeded" or row["status"] == "granting":
        return await _grant(ctx, row, intent.id)  # success is final: any snapshot will do
    if row["status"] != "pending" or row["method"] == "checkout":
        # settled; or Checkout's own intent, which the customer may retry on the page
        return row
    await repo.record_intent(ctx.pool, row["id"], intent.id, intent.status, intent.next_action)
    if intent.status == "canceled":
        return await _fail(ctx, row, intent.cancellation_reason or "canceled", None,
                           "the PaymentIntent was canceled")
    if intent.status == "requires_payment_method" or (
            intent.status == "requires_action" and _age(row) > ACTION_TIMEOUT):
        return await _cancel_and_fail(ctx, row, intent)
    return await _reload(ctx, row["id"])


async def _cancel_and_fail(ctx: AppContext, row: asyncpg.Record, intent: Intent) -> asyncpg.Record:
    """A failed attempt is not final in Stripe (the customer could retry it), so the intent is
    cancelled first: only a cancelled intent can never succeed after we voided the credits."""
    gw = gateway(ctx)
    try:
        await gw.cancel_intent(intent.id)
    except Rejected:  # it moved on meanwhile (succeeded, processing): follow where it is now
        current = await gw.intent(intent.id)
        if current.status in ("requires_payment_method", "requires_action"):
            await repo.note_error(ctx.pool, row["id"], f"Stripe refused to cancel {intent.id}")
            return await _reload(ctx, row["id"])
        return await apply_intent(ctx, row, current)
    code = intent.failure_code or ("authentication_abandoned" if intent.status == "requires_action"
                                   else "payment_failed")
    return await _fail(ctx, row, code, intent.decline_code, intent.failure_message)


async def apply_session(ctx: AppContext, row: asyncpg.Record, session: Session) -> asyncpg.Record:
    ours = session.metadata.get(PURCHASE_KEY) == str(row["id"]) or session.id == row["checkout_session_id"]
    if not ours or session.amount_total != row["amount_minor"] or session.currency != row["currency"]:
        log.error("purchase %s: Checkout Session %s does not match it; ignored", row["id"], session.id)
        return row
    await repo.record_session(ctx.pool, row["id"], session.id, None, session.status,
                              session.payment_intent)
    if session.payment_status == "paid":
        row = await _grant(ctx, row, session.payment_intent)
        if row["status"] == "paid":  # also when the intent's own event granted first
            await _save_card(ctx, row, session)
        return row
    if session.status == "expired":
        return await _fail(ctx, row, "checkout_expired", None, "the Checkout Session expired unpaid")
    return await _reload(ctx, row["id"])


async def _save_card(ctx: AppContext, row: asyncpg.Record, session: Session) -> None:
    """Make the card paid through Checkout the customer's default for saved_card purchases
    (unless they have one). Best effort: the credits are granted either way."""
    if not session.payment_intent:
        return
    gw = gateway(ctx)
    try:
        intent = await gw.intent(session.payment_intent)
        customer = await gw.customer(row["stripe_customer_id"])
        if intent.payment_method and customer.default_payment_method is None:
            await gw.set_default_payment_method(customer.id, intent.payment_method,
                                                f"purchase-{row['id']}-default-pm")
    except StripeProblem as exc:
        log.warning("purchase %s: card not made the default: %s", row["id"], exc.message)


def _event(row: asyncpg.Record, kind: str, **data: Any) -> OutboxEvent:
    exponent = CURRENCIES[row["currency"]].exponent
    return OutboxEvent(
        event_id("purchase", row["id"], kind), kind, row["account_id"], None, datetime.now(UTC),
        {"account": row["account"], "purchase_id": row["id"], "balance_id": row["balance_id"],
         "credits": fmt(Decimal(row["credits"]), row["decimal_places"]),
         "credit_type": row["credit_type"], "price": fmt(Decimal(row["price"]), exponent),
         "currency": row["currency"], "payment_intent": row["payment_intent_id"],
         "checkout_session": row["checkout_session_id"], **data})


async def _grant(ctx: AppContext, row: asyncpg.Record, intent_id: str | None) -> asyncpg.Record:
    """Stripe says paid: grant the pending balance (once) and mark the purchase paid."""
    if not await repo.claim_granting(ctx.pool, row["id"], intent_id):
        current = await _reload(ctx, row["id"])
        if current["status"] == "failed":
            log.error("purchase %s was paid in Stripe (%s) after it failed here: refund it",
                      row["id"], intent_id or row["payment_intent_id"])
        return current
    await ledger.activate(ctx, row["balance_id"], Decimal(row["credits"]))
    if row["pays_overage"]:  # before it is paid: a crash here leaves it granting, resumed
        async with exclusive(ctx.settings.database_url, PURCHASE_LOCK, f"purchase:{row['id']}"):
            await ledger.pay_overage(ctx, row["balance_id"], f"po:{row['id']}",
                                     f"purchase {row['id']} pays what the account owes",
                                     purchase=row["id"])
    row = await _reload(ctx, row["id"])
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await repo.mark_paid(conn, row["id"]):
            await publish(conn, [_event(row, "payment.succeeded")])
    return await _reload(ctx, row["id"])


async def _fail(ctx: AppContext, row: asyncpg.Record, code: str, decline_code: str | None,
                message: str | None) -> asyncpg.Record:
    """The payment failed: void the pending balance and tell the vendor, in one transaction."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await repo.mark_failed(conn, row["id"], code, decline_code, message):
            await ledger_repo.void_pending_balance(conn, row["balance_id"])
            await publish(conn, [_event(row, "payment.failed", code=code, decline_code=decline_code,
                                        message=message)])
    return await _reload(ctx, row["id"])


def _credits_refunded(row: asyncpg.Record, refunded: int) -> int:
    """The purchased credits (minor units) that `refunded` of the price (minor units) pays
    back: their share, rounded down (in the customer's favour)."""
    credits, price = to_scaled(Decimal(row["credits"]), row["decimal_places"]), int(row["amount_minor"])
    return credits * min(refunded, price) // price


async def _refunded(ctx: AppContext, row: asyncpg.Record, charge: Charge) -> asyncpg.Record:
    """Take back the credits a refund pays for (README: Purchases, Refunds). Stripe reports
    the amount refunded so far, so each report takes what the ones before did not, under a
    per-purchase lock; a full refund voids what is left of the balance."""
    if row["status"] in UNSETTLED:  # only a paid charge can be refunded: the refund came first
        row = await _grant(ctx, row, charge.payment_intent)
    refunded = charge.amount_refunded
    full = charge.refunded or refunded >= row["amount_minor"]
    if row["status"] != "paid" or refunded <= 0:
        await repo.record_refunded_amount(ctx.pool, row["id"], refunded)
        return await _reload(ctx, row["id"])
    account = await ledger.account_ref(ctx, row["account"])
    async with exclusive(ctx.settings.database_url, PURCHASE_LOCK, f"purchase:{row['id']}"):
        # a take-back cut short by a crash reaches the ledger before we read what was taken
        await ctx.journal.recover_root(account.root_id)
        done = await repo.refunded_taken_back(ctx.pool, row["id"], row["balance_id"])
        # what this report's refunds pay back, less what earlier reports took (<= 0: older)
        share = _credits_refunded(row, refunded) - _credits_refunded(row, done)
        rendered = CURRENCIES[row["currency"]].render_minor(refunded)
        if full:
            live = await ledger.refund(ctx, row["balance_id"], share,
                                       f"purchase {row['id']} refunded in Stripe")
        else:
            live = share <= 0 or await ledger.claw_back(
                ctx, row["balance_id"], share, f"rp:{row['id']}:{refunded}",
                f"purchase {row['id']} partly refunded in Stripe", purchase=row["id"],
                refunded=rendered)
        if not live:  # expired or voided before the refund: what it lapsed covers the share
            await _owe_after_lapse(ctx, row, account, refunded, rendered, full)
        if full:
            await repo.mark_refunded(ctx.pool, row["id"], refunded)
        else:
            await repo.record_refunded_amount(ctx.pool, row["id"], refunded)
    return await _reload(ctx, row["id"])


async def _owe_after_lapse(ctx: AppContext, row: asyncpg.Record, account: AccountRef,
                           refunded: int, rendered: str, full: bool) -> None:
    """A refund of a purchase whose balance expired or was voided: the share it pays for
    (cumulative) is covered first by what partial refunds took while the balance was live,
    then by what lapsed unused; the rest was spent and is owed as overage, less what earlier
    take-backs owe already. Cumulative, so an older or repeated report owes nothing more.
    Runs under the purchase's lock, after its root's journal is committed."""
    dp = row["decimal_places"]
    lapsed, taken, owed = await repo.take_back_position(ctx.pool, row["id"], row["balance_id"])
    share = to_scaled(Decimal(row["credits"]), dp) if full else _credits_refunded(row, refunded)
    owe = max(0, share - to_scaled(taken, dp) - to_scaled(lapsed, dp)) - to_scaled(owed, dp)
    if owe <= 0:
        return
    amount = scaled_text(owe, dp)
    op = f"rx:{row['id']}:{refunded}"
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await repo.insert_lapsed_take_back(
                conn, op, row["account_id"], row["balance_id"], row["credit_type_id"],
                Decimal(amount), f"purchase {row['id']} refunded in Stripe after its credits "
                                 "lapsed"):
            await publish(conn, [OutboxEvent(
                event_id(op, "credits.clawed_back"), "credits.clawed_back", row["account_id"],
                None, datetime.now(UTC),
                {"account": row["account"], "balance_id": row["balance_id"],
                 "credit_type": row["credit_type"], "amount": fmt(Decimal(0), dp),
                 "overage": amount, "reason": "refund" if full else "partial_refund",
                 "purchase_id": row["id"], "amount_refunded": rendered})])
    await ctx.hot.invalidate(account.root_id)  # its overage is rebuilt from Postgres


# inbound Stripe events

async def receive_event(ctx: AppContext, payload: bytes, signature: str | None) -> WebhookReceipt:
    """Verify, store once by Stripe's event id, handle. A handling that needs Stripe and cannot
    reach it stays unhandled; the reconciler retries it."""
    gw = gateway(ctx)
    if not gw.receives_events:
        raise StripeNotConfigured("set STRIPE_WEBHOOK_SECRET to receive Stripe events")
    try:
        event = gw.parse_event(payload, signature)
    except BadSignature as exc:
        raise InvalidSignature(exc.message, field="Stripe-Signature") from exc
    new = await repo.store_event(ctx.pool, event.id, event.type, payload, EVENT_RETRY)
    if not new:
        handled, outcome = await repo.event_outcome(ctx.pool, event.id)
        if handled:
            return WebhookReceipt(received=True, duplicate=True, outcome=outcome)
    outcome = await handle_stored_event(ctx, event.id, event.type, event.object)
    return WebhookReceipt(received=True, duplicate=not new, outcome=outcome)


async def handle_stored_event(ctx: AppContext, stripe_event_id: str, event_type: str,
                              obj: Any) -> str | None:
    """Handle a stored event; its outcome, or None when it must be tried again."""
    try:
        outcome = await _handle(ctx, event_type, obj)
    except Unreachable as exc:
        log.warning("Stripe event %s: left for the reconciler: %s", stripe_event_id, exc.message)
        return None
    await repo.mark_event_handled(ctx.pool, stripe_event_id, outcome)
    return outcome


CHECKOUT_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded",
                   "checkout.session.async_payment_failed", "checkout.session.expired")


async def _handle(ctx: AppContext, event_type: str, obj: Any) -> str:
    if event_type.startswith("payment_intent."):
        intent = intent_from(obj)
        row = await _purchase_for(ctx, intent.metadata, intent_id=intent.id)
        if row is None:
            return "not ours"
        return _outcome(row, await apply_intent(ctx, row, intent))
    if event_type in CHECKOUT_EVENTS:
        session = session_from(obj)
        row = await _purchase_for(ctx, session.metadata, session_id=session.id)
        if row is None:
            return "not ours"
        if event_type == "checkout.session.async_payment_failed":
            return _outcome(row, await _fail(ctx, row, "payment_failed", None,
                                             "the delayed payment failed"))
        return _outcome(row, await apply_session(ctx, row, session))
    if event_type == "charge.refunded":
        charge = charge_from(obj)
        row = await _purchase_for(ctx, obj.get("metadata") or {}, intent_id=charge.payment_intent)
        if row is None and charge.payment_intent:  # refunded before we learnt the intent's id?
            try:
                intent = await gateway(ctx).intent(charge.payment_intent)
            except Rejected:
                return "not ours"
            row = await _purchase_for(ctx, intent.metadata)
        if row is None:
            return "not ours"
        return _outcome(row, await _refunded(ctx, row, charge))
    return "ignored"


async def _purchase_for(ctx: AppContext, metadata: Any, *, intent_id: str | None = None,
                        session_id: str | None = None) -> asyncpg.Record | None:
    raw = str(metadata.get(PURCHASE_KEY) or "")
    if raw.isdigit() and len(raw) < 19:
        found = await repo.purchase(ctx.pool, int(raw))
        if found is not None:
            return found
    if intent_id:
        return await repo.purchase_by_intent(ctx.pool, intent_id)
    if session_id:
        return await repo.purchase_by_session(ctx.pool, session_id)
    return None


def _outcome(before: asyncpg.Record, after: asyncpg.Record) -> str:
    return f"purchase {after['id']}: {before['status']} -> {after['status']}"
