"""Bodies of the auto-recharge routes."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictBool, StringConstraints

from app.schemas import Amount, Code, Integer, ListQuery, Page, Strict

PaymentMethodId = Annotated[str, StringConstraints(pattern=r"^pm_[A-Za-z0-9_]{1,250}$")]


class AutoRechargeIn(Strict):
    enabled: StrictBool = Field(default=True, description="false keeps the settings but stops recharging")
    threshold: Amount = Field(ge=0, description="recharge when the drawable balance falls to "
                                                 "this or below")
    recharge_to: Amount = Field(gt=0, description="buy what brings the balance back to this; "
                                                   "above the threshold")
    price_per_credit: Amount | None = Field(
        default=None, gt=0, description="in `currency`; omitted for a fiat credit type: 1 credit "
                                        "= 1 unit of the currency")
    currency: str = Field(pattern=r"^[A-Za-z]{3}$", description="ISO 4217, e.g. usd")
    expires_in_days: Integer | None = Field(default=None, gt=0, le=36_600,
                                              description="lifetime of the bought credits; omitted: "
                                                    "they never expire")
    products: list[Code] | None = Field(
        default=None, min_length=1, max_length=100,
        description="product codes the credits may pay for; omitted: every product")
    payment_method_id: PaymentMethodId | None = Field(
        default=None, description="charged off-session; omitted: the customer's default")
    max_per_day: Integer = Field(default=10, ge=1, le=1000,
                                 description="charges per UTC day; over it a recharge fails unpaid")
    min_charge: Amount = Field(default=Decimal(0), ge=0,
                               description="in `currency`; a smaller charge is not made")
    pays_overage: StrictBool = Field(
        default=False, description="a recharge also buys what the account owes in the credit type "
                                   "(its overage) and pays it once paid, so the balance still "
                                   "comes back to recharge_to")


class AutoRechargeOut(BaseModel):
    account: str
    credit_type: str
    enabled: bool
    threshold: str
    recharge_to: str
    price_per_credit: str
    currency: str
    expires_in_days: int | None
    products: list[str] | None
    payment_method_id: str | None
    max_per_day: int
    min_charge: str
    pays_overage: bool
    disabled_reason: str | None = Field(description="why creditgate disabled it (a declined "
                                                    "payment); cleared by saving it again")
    updated_at: datetime


class AutoRechargeList(BaseModel):
    data: list[AutoRechargeOut]


class RechargeOut(BaseModel):
    id: int
    account: str
    credit_type: str
    status: Literal["pending", "processing", "succeeded", "failed"]
    trigger: str = Field(description="what started it: crossing, enable or sweep")
    available: str = Field(description="the drawable balance when it started")
    credits: str = Field(description="what it buys: recharge_to - available, plus `owed`")
    owed: str | None = Field(description="the overage it pays (pays_overage), fixed when it is "
                                         "first charged; null before that or without it")
    purchase_id: int | None
    reason: str | None
    created_at: datetime
    updated_at: datetime


class RechargePage(Page[RechargeOut]):
    pass


class RechargeQuery(ListQuery):
    pass
