"""Bodies of the balance and ledger API."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from app.schemas import (
    Amount,
    Code,
    Day,
    Description,
    Integer,
    ListQuery,
    Page,
    Strict,
    Timestamp,
    Uid,
)

Source = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class GrantIn(Strict):
    amount: Amount = Field(gt=0, description="credits to grant, in the credit type's units")
    credit_type: Code | None = Field(default=None, description="default: the account's")
    products: list[Code] | None = Field(
        default=None, min_length=1, max_length=100,
        description="product codes this balance may pay for; omitted: every product")
    priority: Integer = Field(default=100, ge=0, le=1_000_000,
                              description="lower is drawn first")
    effective_at: Timestamp | None = Field(default=None, description="default: now")
    expires_at: Timestamp | None = None
    description: Description = ""
    source: Source = Field(default="grant",
                           description="grant, purchase, promotion, service_credit, ...")


class AdjustmentIn(Strict):
    amount: Amount = Field(description="signed change: positive adds credit, negative removes it")
    description: Description = ""


class VoidIn(Strict):
    description: Description = ""


class BalanceOut(BaseModel):
    id: int
    account: str
    credit_type: str
    granted: str
    remaining: str
    products: list[str] | None
    priority: int
    effective_at: datetime
    expires_at: datetime | None
    description: str
    source: str
    status: str
    created_at: datetime


class BalancePage(Page[BalanceOut]):
    pass


class LedgerQuery(ListQuery):
    credit_type: Code | None = None


class LedgerEntryOut(BaseModel):
    id: int
    kind: str
    balance_id: int | None
    credit_type: str
    amount: str
    running_balance: str = Field(description="the account's net balance of this credit type "
                                             "after this entry (overage counts negative)")
    usage_uid: str | None
    product: str | None
    description: str
    created_at: datetime


class LedgerPage(Page[LedgerEntryOut]):
    pass


class BalanceAtQuery(Strict):
    at: Timestamp


class CreditTypeTotal(BaseModel):
    credit_type: str
    balance: str
    overage: str


class BalanceAtOut(BaseModel):
    account: str
    at: datetime
    totals: list[CreditTypeTotal]


class ThresholdIn(Strict):
    low: Amount | None = Field(
        gt=0, description="`balance.low` fires once when the drawable balance falls below it; "
                          "null removes the threshold")


class ThresholdOut(BaseModel):
    account: str
    credit_type: str
    low: str | None


class ThresholdList(BaseModel):
    data: list[ThresholdOut]


# Recurring grants (app/ledger/recurring_grants.py)


class Allotment(Strict):
    """Credits granted every period: a recurring grant's, or a plan's included credits."""

    amount: Amount = Field(gt=0, description="credits granted each period")
    products: list[Code] | None = Field(default=None, min_length=1, max_length=100)
    priority: Integer = Field(default=100, ge=0, le=1_000_000,
                              description="lower is drawn first")
    description: Description = ""
    rollover_percent: Amount = Field(default=Decimal(0), ge=0, le=100, description=
                                     "of what a period leaves unused, the part added to the "
                                     "next period's credits (rounded down)")
    rollover_max: Amount | None = Field(default=None, ge=0, description="at most this much "
                                        "rolls over; omitted: no cap but the percentage")


class RecurringGrantIn(Allotment):
    credit_type: Code | None = Field(default=None, description="default: the account's")
    frequency: Literal["daily", "monthly", "quarterly", "annual"]
    interval: Integer = Field(default=1, ge=1, le=366, description="every this many days or "
                              "months, quarters, years")
    start: Day | None = Field(default=None, description="the first period's first day "
                                   "(UTC); default today. Periods over before it is created "
                                   "are not granted")
    end: Day | None = Field(default=None, description="exclusive: no period starts on or "
                                 "after it; omitted: open")


class RecurringGrantEndIn(Strict):
    end: Day | None = Field(default=None, description="exclusive; default: tomorrow (the "
                                 "period under way is kept, none starts after today)")


class RecurringGrantPeriodOut(BaseModel):
    period_start: date
    period_end: date
    balance_id: int
    rolled_over: bool = Field(description="its expiry has been settled: what rolled over is "
                              "in the next period's balance (a `rollover` ledger entry)")


class RecurringGrantOut(BaseModel):
    id: int
    account: str
    credit_type: str
    amount: str
    frequency: str
    interval: int
    start: date
    end: date | None
    products: list[str] | None
    priority: int
    description: str
    rollover_percent: str
    rollover_max: str | None
    account_plan: int | None = Field(description="the account plan whose included credits "
                                     "these are (its periods and end are the plan's); null: "
                                     "a recurring grant of its own")
    next_start: date = Field(description="the first period not granted yet")
    created_at: datetime
    periods: list[RecurringGrantPeriodOut] = Field(
        default=[], description="the latest 100 granted periods, newest first (a single "
                                "grant's read only)")


class RecurringGrantPage(Page[RecurringGrantOut]):
    pass


class OverageSettlementIn(Strict):
    amount: Amount = Field(gt=0, description="what the account paid (or is let off) of what it "
                                              "owes, at most that")
    reference: Uid = Field(description="the payment's id in the vendor's books (an "
                                             "invoice, a transfer): once per account and "
                                             "credit type")
    credit_type: Code | None = Field(default=None, description="default: the account's")
    description: Description = ""


class OverageSettlementOut(BaseModel):
    account: str
    credit_type: str
    reference: str
    amount: str
    owed_before: str | None = Field(description="what the account owed just before (null when "
                                                "this answers a settlement made earlier)")
    owed_after: str = Field(description="what it owes now")
    duplicate: bool = Field(default=False, description="this reference was settled before: "
                                                       "that settlement")
