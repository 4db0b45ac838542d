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


def covered_from(period: tuple[date, date], plan_start: date) -> date:
    """Where an account plan's cover of a billing period begins: the period's start, or the
    plan's when the plan begins within it (the first period of calendar billing)."""
    return min(max(period[0], plan_start), period[1])


def covered_until(period: tuple[date, date], plan_end: date | None) -> date:
    """Where an account plan's cover of a billing period [start, end) ends (exclusive): the
    period's end, or the plan's end when the plan ends within the period (a plan change or a
    cancellation). The standing charge, the minimum spend and a prorated counter are for the
    days before it."""
    start, end = period
    return end if plan_end is None or plan_end >= end else max(plan_end, start)


def counted(since: date, until: date, pricing_start: date,
            pricing_end: date | None) -> tuple[date, date]:
    """The days [from, to) of a billing period a counter pricing counts: those its own date
    range holds within the account plan's cover of the period [since, until)
    (`covered_from`, `covered_until`). A price change within a period so splits it by day,
    each pricing counting its own days."""
    low = max(since, pricing_start)
    high = until if pricing_end is None else min(until, pricing_end)
    return low, max(low, high)
