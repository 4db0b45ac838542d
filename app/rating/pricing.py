"""Pure rating functions: an aggregation state to a quantity, a quantity to a charge.

Everything is Decimal. A quotient (MEAN, quantity per unit, proration) is computed with
PRECISION significant digits, the same way on every path, so real-time drawdown and the bill
run see the same number; rounding to a credit type's places happens once, in `to_minor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Context, Decimal

PRECISION = 40
FUNCTIONS = ("SUM", "COUNT", "MIN", "MAX", "MEAN", "LATEST", "UNIQUE")
ROUNDINGS = ("up", "down", "nearest", "none")
PRICING_TYPES = ("per_unit", "tiered", "volume", "stair_step")
# the documented rounding of a charge to a credit type's decimal places
CHARGE_ROUNDING = ROUND_HALF_UP
# a quotient's context: PRECISION significant digits (app/__init__.py makes the default 100
# for exact sums and products), kept instead of opening a context per quotient on the rating
# hot path
_QUOTIENT = Context(prec=PRECISION)


@dataclass(frozen=True)
class Band:
    up_to: Decimal | None  # None: open-ended (the last band)
    price: Decimal  # per unit; for stair-step the fixed amount of the band


@dataclass
class AggState:
    """What an aggregation remembers of a period's measurements (one segment)."""

    count: int = 0
    total: Decimal = Decimal(0)
    low: Decimal | None = None
    high: Decimal | None = None
    latest: Decimal | None = None
    latest_key: str = ""  # "<timestamp ms, zero padded>:<uid>": the latest wins, any arrival order
    uniques: int = 0

    def add(self, value: Decimal, key: str, new_unique: bool) -> None:
        self.count += 1
        self.total += value
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)
        if key >= self.latest_key:
            self.latest, self.latest_key = value, key
        self.uniques += int(new_unique)


def aggregate(function: str, state: AggState) -> Decimal:
    if state.count == 0:
        return Decimal(0)
    value: Decimal | None
    if function == "SUM":
        value = state.total
    elif function == "COUNT":
        value = Decimal(state.count)
    elif function == "MIN":
        value = state.low
    elif function == "MAX":
        value = state.high
    elif function == "MEAN":  # the only quotient: PRECISION significant digits
        value = _QUOTIENT.divide(state.total, state.count)
    elif function == "LATEST":
        value = state.latest
    elif function == "UNIQUE":
        value = Decimal(state.uniques)
    else:
        raise KeyError(function)
    assert value is not None
    return value


def quantity(value: Decimal, per_unit: Decimal, rounding: str) -> Decimal:
    """Units of an aggregated value: divided by the quantity per unit, then rounded."""
    units = _QUOTIENT.divide(value, per_unit)
    if rounding == "none":
        return units
    mode = {"up": ROUND_CEILING, "down": ROUND_FLOOR, "nearest": ROUND_HALF_UP}[rounding]
    return units.quantize(Decimal(1), rounding=mode)


def check_bands(bands: Sequence[Band]) -> str | None:
    """What is wrong with a band list (None: nothing): ascending, the last open-ended."""
    if not bands:
        return "needs at least one band"
    if bands[-1].up_to is not None:
        return "the last band must be open-ended (up_to null)"
    bounds = [b.up_to for b in bands[:-1]]
    if any(b is None for b in bounds):
        return "only the last band may be open-ended"
    previous = Decimal(0)
    for bound in bounds:
        assert bound is not None
        if bound <= previous:
            return "bands must ascend: each up_to above the one before (and above 0)"
        previous = bound
    return None


def price(kind: str, bands: Sequence[Band], units: Decimal) -> Decimal:
    """The charge for a quantity; nothing for no (or a negative) quantity."""
    if units <= 0:
        return Decimal(0)
    if kind == "per_unit":
        return units * bands[0].price
    if kind == "tiered":
        charge, lower = Decimal(0), Decimal(0)
        for band in bands:
            upper = units if band.up_to is None else min(units, band.up_to)
            if upper > lower:
                charge += (upper - lower) * band.price
            if band.up_to is None or units <= band.up_to:
                break
            lower = band.up_to
        return charge
    reached = next(b for b in bands if b.up_to is None or units <= b.up_to)
    return units * reached.price if kind == "volume" else reached.price


def charge(kind: str, bands: Sequence[Band], fixed_fee: Decimal, units: Decimal,
           used: bool) -> Decimal:
    """A pricing's charge for a period: the fixed fee once there is any usage, plus the price."""
    return (fixed_fee if used else Decimal(0)) + price(kind, bands, units)


def to_minor(amount: Decimal, decimal_places: int) -> int:
    """Round a charge once, at the credit type's places (CHARGE_ROUNDING), to minor units."""
    return int(amount.scaleb(decimal_places).quantize(Decimal(1), rounding=CHARGE_ROUNDING))


def prorate(amount: Decimal, period: tuple[date, date], since: date, until: date) -> Decimal:
    """A per-period amount (a standing charge, a minimum spend) for the days [since, until) of
    the period [start, end): whole when that is every day, else amount * days / the period's
    days (PRECISION significant digits, as every quotient here)."""
    start, end = period
    if since <= start and until >= end:
        return amount
    return _QUOTIENT.divide(amount * (until - since).days, (end - start).days)


def convert(amount: Decimal, rate: Decimal, to_fiat: bool) -> Decimal:
    """Credits <-> fiat at `rate` (1 credit = rate fiat)."""
    return _QUOTIENT.multiply(amount, rate) if to_fiat else _QUOTIENT.divide(amount, rate)


def counter_levels(levels: Sequence[tuple[date, Decimal]], start: date,
                   end: date) -> list[tuple[Decimal, int]]:
    """(level, days) in effect over [start, end); `levels` are (from date, level) ascending and
    the level before the first is 0."""
    spans = []
    for i, (day, level) in enumerate(levels):
        nxt = levels[i + 1][0] if i + 1 < len(levels) else end
        lo, hi = max(day, start), min(nxt, end)
        if hi > lo:
            spans.append((level, (hi - lo).days))
    return spans


def counter_charge(kind: str, bands: Sequence[Band], fixed_fee: Decimal,
                   spans: Sequence[tuple[Decimal, int]], period_days: int, mode: str) -> Decimal:
    """A counter pricing's charge for a period: at the peak level, or each level's price
    prorated by the days it was in effect (a running total)."""
    used = any(level > 0 for level, _ in spans)
    if mode == "peak":
        return charge(kind, bands, fixed_fee, max((lvl for lvl, _ in spans), default=Decimal(0)),
                      used)
    total = sum((price(kind, bands, level) * days for level, days in spans), Decimal(0))
    return (fixed_fee if used else Decimal(0)) + _QUOTIENT.divide(total, period_days)
