"""Bodies of the purchase, Stripe customer and Stripe webhook routes."""

from __future__ import annotations

import calendar
import re
from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, StrictBool, StringConstraints

from app.schemas import Amount, Code, Description, Email, ListQuery, Name, Page, Strict, Timestamp

_DURATION = re.compile(
    r"^P(?!$)(?:(?P<Y>\d+)Y)?(?:(?P<MO>\d+)M)?(?:(?P<W>\d+)W)?(?:(?P<D>\d+)D)?"
    r"(?:T(?=\d)(?:(?P<H>\d+)H)?(?:(?P<MI>\d+)M)?(?:(?P<S>\d+)S)?)?$")
MAX_EXPIRY = timedelta(days=366 * 100)


def _months_later(start: datetime, months: int) -> datetime:
    year, month = divmod(start.month - 1 + months, 12)
    year += start.year
    day = min(start.day, calendar.monthrange(year, month + 1)[1])
    return start.replace(year=year, month=month + 1, day=day)


def after(start: datetime, expires_in: str | int) -> datetime:
    """`start` plus an ISO 8601 duration (years and months by the calendar, clamped to the
    month's last day: Jan 31 + P1M = Feb 28) or a number of seconds."""
    if isinstance(expires_in, int):
        return start + timedelta(seconds=expires_in)
    match = _DURATION.match(expires_in)
    if match is None:
        raise ValueError("not an ISO 8601 duration")
    part = {k: int(v or 0) for k, v in match.groupdict().items()}
    later = _months_later(start, part["Y"] * 12 + part["MO"])
    return later + timedelta(weeks=part["W"], days=part["D"], hours=part["H"], minutes=part["MI"],
                             seconds=part["S"])


def _duration(value: str | int) -> str | int:
    if isinstance(value, int) and value <= 0:
        raise ValueError("must be a positive number of seconds")
    probe = datetime(2000, 1, 1)
    try:
        later = after(probe, value)
    except (ValueError, OverflowError) as exc:
        raise ValueError("must be an ISO 8601 duration such as P1Y, P30D or PT12H, "
                         "or a number of seconds") from exc
    if later <= probe:
        raise ValueError("must be longer than zero")
    if later - probe > MAX_EXPIRY:
        raise ValueError("must be at most 100 years")
    return value


ExpiresIn = Annotated[str | int, AfterValidator(_duration)]
Url = Annotated[str, StringConstraints(pattern=r"^https?://\S+$", max_length=2000)]
CustomerId = Annotated[str, StringConstraints(pattern=r"^cus_[A-Za-z0-9]{1,250}$")]


class PurchaseIn(Strict):
    credits: Amount = Field(gt=0, description="credits granted once paid, in the credit type's units")
    credit_type: Code | None = Field(default=None, description="default: the account's")
    price: Amount = Field(gt=0, description="what the customer pays, in major units (10.00 USD)")
    currency: str = Field(pattern=r"^[A-Za-z]{3}$", description="ISO 4217, e.g. usd")
    expires_in: ExpiresIn | None = Field(
        default=None, description="credit lifetime from the purchase: ISO 8601 duration "
                                  "(P1Y, P30D, PT12H) or seconds")
    expires_at: Timestamp | None = None
    products: list[Code] | None = Field(
        default=None, min_length=1, max_length=100,
        description="product codes the credits may pay for; omitted: every product")
    method: Literal["saved_card", "checkout"] = Field(
        default="saved_card",
        description="saved_card: charge the customer's default payment method off-session; "
                    "checkout: return a Stripe Checkout URL (the card is saved for next time)")
    success_url: Url | None = Field(default=None, description="checkout: required")
    cancel_url: Url | None = None
    description: Description = ""
    pays_overage: StrictBool = Field(
        default=False, description="once paid, the credits first pay what the account owes in "
                                   "their credit type (its overage); the rest stay drawable")


class StripeRefs(BaseModel):
    customer: str
    payment_intent: str | None
    checkout_session: str | None
    status: str | None = Field(description="the PaymentIntent's (or Checkout Session's) last "
                                           "status creditgate saw")


class NextAction(BaseModel):
    """What the customer must do before the payment can complete."""

    type: str = Field(description="Stripe's next_action.type, e.g. use_stripe_sdk, redirect_to_url")
    redirect_url: str | None = None
    client_secret: str | None = Field(
        default=None, description="for Stripe.js `handleNextAction`; only in the creating response")


class Failure(BaseModel):
    code: str | None
    decline_code: str | None
    message: str | None


class PurchaseOut(BaseModel):
    id: int
    account: str
    status: Literal["pending", "granting", "paid", "failed", "refunded"]
    credits: str
    credit_type: str
    price: str
    currency: str
    method: str
    balance_id: int = Field(description="the balance the credits are granted on once paid")
    expires_at: datetime | None
    products: list[str] | None
    description: str
    stripe: StripeRefs
    checkout_url: str | None
    next_action: NextAction | None
    failure: Failure | None
    amount_refunded: str
    pays_overage: bool
    overage_paid: str | None = Field(
        description="what of the credits went to the account's overage once paid (pays_overage)")
    created_at: datetime
    updated_at: datetime
    paid_at: datetime | None


class PurchasePage(Page[PurchaseOut]):
    pass


class PurchaseQuery(ListQuery):
    pass


class StripeCustomerIn(Strict):
    customer_id: CustomerId | None = Field(
        default=None, description="attach this existing Stripe customer; omitted: create one")
    name: Name | None = Field(default=None, description="creating: default the account's name")
    email: Email | None = Field(default=None, description="creating: default the account's email")


class StripeCustomerOut(BaseModel):
    account: str
    customer_id: str
    created_here: bool = Field(description="created by creditgate (else attached by id)")
    default_payment_method: str | None = Field(
        description="what a saved_card purchase charges; null: purchase through checkout")


class WebhookReceipt(BaseModel):
    received: bool
    duplicate: bool
    outcome: str | None
