"""Bodies of the rating API: meters, aggregations, counters, plans, pricings, measurements."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, computed_field

from app.ledger.schemas import Allotment
from app.schemas import Amount, Code, Day, Integer, ListQuery, Name, Page, Strict, Timestamp, Uid

FieldName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
# bounded so that no arithmetic on them can overflow a Decimal context
Number = Annotated[Amount, Field(max_digits=30, decimal_places=12)]
Function = Literal["SUM", "COUNT", "MIN", "MAX", "MEAN", "LATEST", "UNIQUE"]
Rounding = Literal["up", "down", "nearest", "none"]
PricingType = Literal["per_unit", "tiered", "volume", "stair_step"]
Frequency = Literal["daily", "monthly", "quarterly", "annual"]
MAX_MEASUREMENTS = 1_000


class DataField(Strict):
    code: FieldName
    category: Literal["measure", "who", "what", "where"] = Field(
        description="measure: a number; who/what/where: a dimension (a string to segment by)")


class DerivedField(Strict):
    code: FieldName
    expression: str = Field(max_length=500, description="numbers, field names, + - * / ( )")


class MeterIn(Strict):
    code: Code
    name: Name
    product: Code | None = Field(default=None, description="omitted: a global meter")
    data_fields: list[DataField] = Field(min_length=1, max_length=50)
    derived_fields: list[DerivedField] = Field(default=[], max_length=50)


class MeterOut(BaseModel):
    code: str
    name: str
    product: str | None
    data_fields: list[DataField]
    derived_fields: list[DerivedField]
    created_at: datetime


class AggregationIn(Strict):
    code: Code
    name: Name
    meter: Code
    target_field: FieldName
    function: Function
    quantity_per_unit: Number = Field(default=Decimal(1), gt=0)
    rounding: Rounding = "none"
    segment_field: FieldName | None = Field(default=None, description="a dimension field")


class AggregationOut(BaseModel):
    code: str
    name: str
    meter: str
    target_field: str
    function: str
    quantity_per_unit: str
    rounding: str
    segment_field: str | None
    created_at: datetime


class CounterIn(Strict):
    code: Code
    name: Name
    unit: Name
    product: Code | None = None


class CounterOut(BaseModel):
    code: str
    name: str
    unit: str
    product: str | None
    created_at: datetime


class PlanTemplateIn(Strict):
    code: Code
    name: Name
    product: Code
    bill_frequency: Frequency
    bill_interval: Integer = Field(default=1, ge=1, le=366)
    currency: Code = Field(description="the credit type prices are in (usually fiat)")
    standing_charge: Number = Field(default=Decimal(0), ge=0)
    minimum_spend: Number = Field(default=Decimal(0), ge=0)


class PlanTemplateOut(BaseModel):
    code: str
    name: str
    product: str
    bill_frequency: str
    bill_interval: int
    currency: str
    standing_charge: str
    minimum_spend: str
    created_at: datetime


class PlanCreditIn(Allotment):
    credit_type: Code = Field(description="the credit type of the balances granted")


class PlanCreditOut(BaseModel):
    credit_type: str
    amount: str
    products: list[str] | None
    priority: int
    description: str
    rollover_percent: str
    rollover_max: str | None


class PlanIn(Strict):
    code: Code
    name: Name
    template: Code
    standing_charge: Number | None = Field(default=None, ge=0, description="overrides the template")
    minimum_spend: Number | None = Field(default=None, ge=0, description="overrides the template")
    credits: list[PlanCreditIn] = Field(
        default=[], max_length=10, description="credits included every billing period: each "
        "account the plan is attached to gets them as a recurring grant tied to its account "
        "plan (the plan's periods, prorated by day where the account plan covers a period in "
        "part)")


class PlanOut(BaseModel):
    code: str
    name: str
    template: str
    standing_charge: str
    minimum_spend: str
    credits: list[PlanCreditOut]
    created_at: datetime


class BandIn(Strict):
    up_to: Number | None = Field(gt=0, description="upper bound (inclusive); null: open-ended")
    price: Number = Field(ge=0, description="per unit; stair-step: the band's fixed amount")


class PricingIn(Strict):
    plan: Code
    aggregation: Code | None = None
    counter: Code | None = None
    start_date: Day
    end_date: Day | None = Field(default=None, description="exclusive; omitted: open")
    type: PricingType
    bands: list[BandIn] = Field(min_length=1, max_length=50)
    fixed_fee: Number = Field(default=Decimal(0), ge=0, description="per period with usage")
    counter_mode: Literal["prorate", "peak"] = "prorate"


class Dated(BaseModel):
    """An account plan's or a pricing's date range, and where today (UTC) stands in it."""

    start_date: date
    end_date: date | None

    @computed_field(description="today (UTC): `scheduled` (it starts later), `active`, "
                    "`ended`, or `cancelled` (ended on its start date: it never applied)")
    def status(self) -> Literal["scheduled", "active", "ended", "cancelled"]:
        today = datetime.now(UTC).date()
        if self.end_date == self.start_date:
            return "cancelled"
        if self.start_date > today:
            return "scheduled"
        return "ended" if self.end_date is not None and self.end_date <= today else "active"


class PricingOut(Dated):
    id: int
    plan: str
    aggregation: str | None
    counter: str | None
    type: str
    bands: list[dict[str, Any]]
    fixed_fee: str
    counter_mode: str
    created_at: datetime


class PricingQuery(Strict):
    plan: Code
    cursor: str | None = None
    limit: int = Field(default=50, ge=1, le=500)


class AccountPlanIn(Strict):
    plan: Code
    start_date: Day
    end_date: Day | None = Field(default=None, description="exclusive; omitted: open")
    billing: Literal["anniversary", "calendar"] = Field(
        default="anniversary", description="where the billing periods are counted from: the "
        "start date, or the first day of the month, quarter or year it falls in (a first "
        "period that begins before the plan is prorated by day)")


class AccountPlanOut(Dated):
    id: int
    account: str
    plan: str
    billing_anchor: date = Field(description="the day the billing periods are counted from")
    created_at: datetime


class EndIn(Strict):
    end_date: Day | None = Field(
        default=None, description="exclusive: the first day it no longer covers; default and "
        "earliest: the day after the latest a measurement may be dated on now (tomorrow, as a "
        "rule). Later than the present end extends it; its start date, for one that has not "
        "started, cancels it")


class AccountPlanAttached(AccountPlanOut):
    debits: list[Debit] = Field(description="what attaching it drew: the standing charge and "
                                "counter charges of its periods that have started")


class AccountPlanList(BaseModel):
    data: list[AccountPlanOut]


class CounterAdjustmentIn(Strict):
    counter: Code
    effective: Day = Field(description="the level holds from this date on")
    level: Number = Field(ge=0)


class CounterAdjustmentOut(BaseModel):
    account: str
    counter: str
    effective: date
    level: str
    debits: list[Debit] = Field(default=[], description="what the new level drew at once")


class ConversionRateIn(Strict):
    fiat: Code = Field(description="a fiat credit type")
    effective: Day = Field(description="the rate holds from this date on")
    rate: Number = Field(gt=0, description="1 unit of this credit type = rate units of fiat")


class ConversionRateOut(BaseModel):
    credit_type: str
    fiat: str
    effective: date
    rate: str


class MeasurementIn(Strict):
    uid: Uid = Field(description="unique per account: a repeated uid is a duplicate")
    account: Code
    meter: Code
    timestamp: Timestamp
    data: dict[str, Any] = Field(description="{field: value}: numbers for measures, strings "
                                 "for dimensions")


class MeasurementOut(BaseModel):
    uid: str
    account: str
    meter: str
    timestamp: datetime
    data: dict[str, str]
    rated: bool = Field(description="false: no active pricing covered it when it arrived; it "
                        "becomes true when a plan or pricing attached later rates it")


class MeasurementsQuery(Strict):
    cursor: str | None = None
    limit: int = Field(default=50, ge=1, le=500)
    meter: Code | None = None
    start: Timestamp | None = Field(default=None, description="measurements timestamped at or "
                                    "after this instant")
    end: Timestamp | None = Field(default=None, description="before this instant")
    rated: bool | None = Field(default=None, description="true: rated only; false: stored "
                               "unrated only; omitted: both")


class MeasurementPage(BaseModel):
    data: list[MeasurementOut]
    next_cursor: str | None


class MeasurementBatch(Strict):
    measurements: list[MeasurementIn] = Field(min_length=1, max_length=MAX_MEASUREMENTS)


class ItemError(BaseModel):
    code: str
    field: str
    message: str


class Debit(BaseModel):
    pricing: str = Field(description="`p<pricing id>`, or `s<account plan id>` (standing charge)")
    product: str
    credit_type: str
    amount: str


class MeasurementResult(BaseModel):
    uid: str | None
    status: Literal["rated", "unrated", "duplicate", "rejected"]
    debits: list[Debit] = []
    credits: list[Debit] = Field(default=[], description="give-backs: what a charge that went "
                                 "down credited back")
    error: ItemError | None = None


class MeasurementBatchOut(BaseModel):
    rated: int
    unrated: int
    duplicates: int
    rejected: int
    results: list[MeasurementResult]


class UsageQuery(Strict):
    at: Day | None = Field(default=None, description="a day in the period; omitted: today")


class BandApplied(BaseModel):
    up_to: str | None
    price: str
    units: str
    amount: str


class PricingUsage(BaseModel):
    pricing: int
    aggregation: str | None
    counter: str | None
    segment: str | None
    quantity: str
    bands: list[BandApplied]
    fixed_fee: str
    amount: str = Field(description="in the plan's currency, exact")


# a period an account plan covers only in part (it starts or ends within it) is prorated by day
CoveredFrom = Annotated[date, Field(description="`period_start`, or the account plan's start "
                                    "when it falls within the period (calendar billing's first "
                                    "period)")]
CoveredUntil = Annotated[date, Field(description="exclusive: `period_end`, or the account "
                                     "plan's end when it falls within the period; the standing "
                                     "charge, the minimum spend and prorated counters are for "
                                     "the days in [covered_from, covered_until)")]


class ChargeIn(Strict):
    amount: Number = Field(gt=0, description="in the plan's currency, at most its places")
    description: Annotated[str, StringConstraints(min_length=1, max_length=1000)]
    day: Day | None = Field(default=None, description="the day it is for: it goes on the bill "
                            "of the period holding it; default today")
    account_plan: Integer | None = Field(default=None, ge=1, description="the account plan "
                                         "whose bill it goes on; omitted: the one plan of the "
                                         "account covering `day`")


class ChargeLine(BaseModel):
    id: int
    day: date
    description: str
    amount: str


class ChargeOut(ChargeLine):
    account: str
    account_plan: int
    plan: str
    currency: str
    bill: int | None = Field(description="the bill it is on; null: not billed yet")
    voided_at: datetime | None
    created_at: datetime


class ChargePage(Page[ChargeOut]):
    pass


class PlanUsage(BaseModel):
    plan: str
    currency: str
    period_start: date
    period_end: date
    covered_from: CoveredFrom
    covered_until: CoveredUntil
    standing_charge: str
    minimum_spend: str
    pricings: list[PricingUsage]
    total: str = Field(description="standing charge + pricings, in the plan's currency")
    charges: list[ChargeLine] = Field(description="the period's charges, billed on top of "
                                      "`total` (not drawn from credits)")
    charges_total: str
    drawn: str = Field(description="what the period's charges have debited, in the balance "
                       "credit type (a billed period's: the bill run's settlement included)")
    standing_charge_drawn: str = Field(description="of `drawn`: the standing charge")
    covered: str = Field(description="of `drawn`: what balances covered, as the ledger has it "
                         "now")
    overage: str = Field(description="of `drawn`: what no balance covered (the account's "
                         "overage), as the ledger has it now")
    credit_type: str


class AccountUsageOut(BaseModel):
    account: str
    plans: list[PlanUsage]


class MeterPage(Page[MeterOut]):
    pass


class AggregationPage(Page[AggregationOut]):
    pass


class CounterPage(Page[CounterOut]):
    pass


class PlanTemplatePage(Page[PlanTemplateOut]):
    pass


class PlanPage(Page[PlanOut]):
    pass


class PricingPage(Page[PricingOut]):
    pass


class BillRunIn(Strict):
    through: Day | None = Field(
        default=None, description="bill every period that ended on or before this day (its "
        "exclusive end at most this day); at most today. Omitted: today minus the grace period")
    account: Code | None = Field(default=None, description="only this account's plans")


class NotBilled(BaseModel):
    account: str
    reason: str


class BillRunOut(BaseModel):
    through: date
    bills: list[int] = Field(description="ids of the bills this run wrote (none: all billed)")
    not_billed: list[NotBilled] = Field(description="accounts with periods due that could not "
                                        "be billed yet (a missing conversion rate); the workers "
                                        "retry them")


class BillOut(BaseModel):
    id: int
    account: str
    account_plan: int = Field(description="the attachment billed (`GET …/plans` lists them)")
    plan: str
    period_start: date
    period_end: date = Field(description="exclusive")
    covered_from: CoveredFrom
    covered_until: CoveredUntil
    currency: str = Field(description="the plan's: every amount below but `drawn`, `settled`")
    standing_charge: str
    pricings: list[PricingUsage]
    subtotal: str = Field(description="standing charge + pricings, exact")
    minimum_spend: str
    minimum_spend_topup: str = Field(description="what brings the subtotal up to the minimum")
    total: str = Field(description="subtotal + top-up, rounded half up at the currency's places")
    charges: list[ChargeLine] = Field(description="the period's charges, billed on top of "
                                      "`total` (not drawn from credits)")
    charges_total: str
    credit_type: str | None = Field(description="the account's; null: nothing was drawn")
    drawn: str | None = Field(description="credits the period's charges drew, in the credit type")
    settled: str | None = Field(description="of `drawn`: what the bill run drew (+) or gave "
                                "back (-)")
    covered: str | None = Field(description="of `drawn`: what balances covered, as the ledger "
                                "has it now")
    overage: str | None = Field(description="of `drawn`: what no balance covered, recorded as "
                                "the account's overage (what the vendor collects for this bill), "
                                "as the ledger has it now")
    created_at: datetime


class BillPage(Page[BillOut]):
    pass


class BillQuery(ListQuery):
    period_start: Day | None = Field(default=None, description="only bills of periods that "
                                     "started on this day")
