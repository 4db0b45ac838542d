"""Billing periods: anchored at the account plan's start date, every `interval` days or months."""

from __future__ import annotations

import calendar
from datetime import date, timedelta

MONTHS = {"monthly": 1, "quarterly": 3, "annual": 12}


def add_months(anchor: date, months: int) -> date:
    year, month = divmod(anchor.month - 1 + months, 12)
    year += anchor.year
    day = min(anchor.day, calendar.monthrange(year, month + 1)[1])
    return date(year, month + 1, day)


def period_of(anchor: date, frequency: str, interval: int, day: date) -> tuple[date, date]:
    """[start, end) of the billing period holding `day` (day >= anchor)."""
    if frequency == "daily":
        k = (day - anchor).days // interval
        start = anchor + timedelta(days=k * interval)
        return start, start + timedelta(days=interval)
    step = MONTHS[frequency] * interval
    k = ((day.year - anchor.year) * 12 + day.month - anchor.month) // step
    while add_months(anchor, k * step) > day:
        k -= 1
    return add_months(anchor, k * step), add_months(anchor, (k + 1) * step)


def billing_anchor(billing: str, frequency: str, start: date) -> date:
    """Where an account plan's periods are counted from: its start (`anniversary`), or the
    first day of the month, quarter or year its start falls in (`calendar`; daily periods are
    days either way)."""
    if billing == "anniversary" or frequency == "daily":
        return start
    if frequency == "monthly":
        return start.replace(day=1)
    if frequency == "quarterly":
        return date(start.year, (start.month - 1) // 3 * 3 + 1, 1)
    return date(start.year, 1, 1)


def covered(period: tuple[date, date], plan_start: date,
            plan_end: date | None) -> tuple[date, date]:
    """The days [since, until) of a billing period [start, end) an account plan covers: the
    whole period, unless the plan begins within it (the first period of calendar billing) or
    ends within it (a plan change or a cancellation). The standing charge, the minimum spend
    and a prorated counter are for those days."""
    start, end = period
    since = min(max(start, plan_start), end)
    until = end if plan_end is None or plan_end >= end else max(plan_end, start)
    return since, until


def counted(since: date, until: date, pricing_start: date,
            pricing_end: date | None) -> tuple[date, date]:
    """The days [from, to) of a billing period a counter pricing counts: those its own date
    range holds within the account plan's cover of the period [since, until)
    (`covered`). A price change within a period so splits it by day,
    each pricing counting its own days."""
    low = max(since, pricing_start)
    high = until if pricing_end is None else min(until, pricing_end)
    return low, max(low, high)
