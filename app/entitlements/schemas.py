"""Bodies of the runtime API: check, usage, real-time balances."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, StrictBool, StringConstraints

from app.schemas import Amount, Code, Description, Integer, Page, Strict, Timestamp, Uid, uid_pattern

# Usage uids the rating engine gives its own debits (`r<pricing>:…`, `s<account plan>:…`,
# `c<pricing>:…`, the bill run's `b<account plan>:…`): a client's usage uid or consume key
# may not take that shape, so it can never collide with (and silently deduplicate) a rated
# debit.
# A hold's debit is `h0:<hold uid>` (app/entitlements/holds.py): reserved the same way.
RESERVED_UID = re.compile(r"^[rscbh][0-9]+:")


def _not_reserved(value: str) -> str:
    if RESERVED_UID.match(value):
        raise ValueError("uids of the form r<digits>:…, s<digits>:…, c<digits>:…, "
                         "b<digits>:… and h<digits>:… are reserved for rated debits and holds")
    return value


UsageUid = Annotated[Uid, AfterValidator(_not_reserved)]
Reason = Literal["ok", "insufficient_balance", "no_eligible_balance", "account_blocked",
                 "unknown_account", "unknown_product"]
MAX_BATCH = 1_000


class CheckIn(Strict):
    account: Code
    product: Code
    amount: Amount | None = Field(default=None, gt=0,
                                  description="needed amount; omitted: any credit left")
    credit_type: Code | None = Field(default=None, description="default: the account's")
    consume: StrictBool = Field(default=False,
                                description="debit `amount` now, atomically, only if allowed")
    idempotency_key: UsageUid | None = Field(
        default=None, description="required with consume (or the Idempotency-Key header)")


class CheckOut(BaseModel):
    allowed: bool
    reason: Reason
    available: str | None = Field(description="eligible credit left for this product")
    credit_type: str | None
    consumed: bool = False
    duplicate: bool = Field(default=False, description="this idempotency key was consumed before")


class UsageEvent(Strict):
    uid: UsageUid = Field(description="unique per account: a repeated uid is a duplicate")
    account: Code
    product: Code
    amount: Amount = Field(gt=0, description="in the credit type's units")
    timestamp: Timestamp
    credit_type: Code | None = Field(default=None, description="default: the account's")


class UsageBatch(Strict):
    events: list[UsageEvent] = Field(min_length=1, max_length=MAX_BATCH)


class EventError(BaseModel):
    code: str
    field: str
    message: str


class UsageResult(BaseModel):
    uid: str | None
    status: Literal["accepted", "duplicate", "rejected"]
    credit_type: str | None = None
    available: str | None = Field(default=None, description="eligible credit left after it")
    overage: str | None = Field(default=None, description="part no balance covered")
    error: EventError | None = None


class UsageBatchOut(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    results: list[UsageResult]


class LiveBalance(BaseModel):
    id: int
    credit_type: str
    remaining: str
    products: list[str] | None
    priority: int
    effective_at: datetime
    expires_at: datetime | None
    drawable: bool = Field(description="active, effective and not expired right now")


class CreditTypeAvailable(BaseModel):
    credit_type: str
    available: str = Field(description="sum of drawable balances of this account")
    overage: str


class AccountBalancesOut(BaseModel):
    account: str
    status: str
    balances: list[LiveBalance]
    totals: list[CreditTypeAvailable]


# Holds (app/entitlements/holds.py)

# a usage uid's shape, 3 characters shorter: the hold's debit is `h0:<uid>`
HOLD_UID_PATTERN = uid_pattern(128 - len("h0:"))
HoldUid = Annotated[str, StringConstraints(pattern=HOLD_UID_PATTERN)]
MAX_HOLD_S = 86_400


class HoldIn(Strict):
    uid: HoldUid = Field(description="unique per account: the same uid again answers the "
                         "hold made first")
    product: Code
    amount: Amount = Field(gt=0, description="credit set aside, in the credit type's units")
    credit_type: Code | None = Field(default=None, description="default: the account's")
    expires_in_s: Integer = Field(default=600, ge=1, le=MAX_HOLD_S,
                                  description="released by the workers after this long "
                                              "unless captured or released before")


class CaptureIn(Strict):
    amount: Amount = Field(ge=0, description="what the use cost: at most the amount held; "
                           "the rest is released")


class ReleaseIn(Strict):
    pass


class HoldOut(BaseModel):
    uid: str
    account: str
    allowed: bool = Field(description="false: nothing was held (see `reason`)")
    reason: Reason
    available: str | None = Field(description="eligible credit left for this product, after "
                                  "the hold (when it was decided)")
    product: str
    credit_type: str | None
    amount: str
    captured: str | None = None
    status: Literal["held", "refused", "capturing", "captured", "releasing", "released",
                    "expired"]
    expires_at: datetime | None = None
    duplicate: bool = Field(default=False, description="this uid was held before: its state")


class ReversalIn(Strict):
    amount: Amount | None = Field(default=None, gt=0,
                                  description="what to give back, at most the event's "
                                              "amount; default: all of it")
    reason: Description = Field(default="", description="kept with the reversal and written "
                                                        "on its ledger entries")


class Part(BaseModel):
    balance_id: int
    amount: str


class ReversalOut(BaseModel):
    uid: str
    account: str
    amount: str = Field(description="what the reversal gives back")
    reason: str
    status: Literal["reversing", "reversed"]
    returned: list[Part] = Field(description="given back to the balances the event drew")
    overage_reversed: str = Field(description="taken off the overage the event created")
    lapsed: list[Part] = Field(description="not given back: the balance expired or was voided "
                                           "since (that credit would be gone anyway)")
    created_at: datetime
    duplicate: bool = Field(default=False, description="this event was reversed before (with "
                                                       "the same amount): its reversal")


class UsageEventOut(BaseModel):
    uid: str
    account: str
    product: str
    credit_type: str
    amount: str
    overage: str = Field(description="what no balance covered")
    timestamp: datetime
    recorded_at: datetime
    drawn: list[Part] = Field(description="the balances it drew, in drawdown order")
    reversal: ReversalOut | None


EventKind = Literal["usage", "hold", "rated"]


class UsageEventsQuery(Strict):
    cursor: str | None = None
    limit: int = Field(default=50, ge=1, le=500)
    product: Code | None = None
    kind: EventKind | None = Field(default=None, description="usage: the client's events and "
                                   "consuming checks; hold: holds' set-asides; rated: the "
                                   "rating engine's debits; default: all")


class UsageEventItem(BaseModel):
    uid: str
    kind: EventKind
    product: str
    credit_type: str
    amount: str = Field(description="as recorded (a hold's: what it set aside)")
    overage: str = Field(description="what no balance covered")
    reversed: str | None = Field(description="what its reversal gives back, if reversed")
    timestamp: datetime
    recorded_at: datetime


class UsageEventPage(Page[UsageEventItem]):
    """Newest recorded first."""


class UsageSummaryQuery(Strict):
    start: Timestamp | None = Field(default=None, description="default: the start of the UTC "
                                    "month of the range's last instant")
    end: Timestamp | None = Field(default=None, description="exclusive; default: the end of "
                                  "the current UTC hour")
    window: Literal["hour", "day"] = "day"
    product: Code | None = None
    credit_type: Code | None = None


class UsageBucket(BaseModel):
    start: datetime
    end: datetime
    product: str
    credit_type: str
    events: int = Field(description="usage events and captured holds")
    amount: str = Field(description="as reported (a hold's: what it captured)")
    reversed: str = Field(description="given back by usage reversals")
    net: str = Field(description="amount - reversed")
    overage: str = Field(description="what no balance covered when it was recorded")


class UsageSummaryOut(BaseModel):
    account: str
    start: datetime
    end: datetime
    window: Literal["hour", "day"]
    data: list[UsageBucket] = Field(description="the windows with usage, oldest first")
