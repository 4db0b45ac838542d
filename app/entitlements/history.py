"""An account's usage history: its usage events as recorded, and their sums per hour or day.

`GET /v1/accounts/{code}/usage-events` lists every event newest recorded first (the client's
usage and consuming checks, holds' set-asides, the rating engine's debits, told apart by
`kind`), each with what a reversal gave back. `GET /v1/accounts/{code}/usage-summary` sums the
client's usage per UTC hour or day of the events' timestamps, per product and credit type: the
amounts reported, what reversals gave back, the net, and the overage; a hold counts once it is
captured, for what it captured. The rating engine's debits are left out: priced usage is read
per pricing from bill-to-date (`GET /v1/accounts/{code}/usage`).

A summary whose `start` and `end` are whole hours (the default range is) reads the hourly
rollups (app/entitlements/rollups.py) plus what no rollup pass has summed yet; any other range
reads the events. The list and that reading use `usage_events (account_id, recorded_at)`. A
timestamp is accepted only within `usage_max_age_s` before and `usage_future_skew_s` after the
moment the event is recorded, so a range of timestamps is a range of that index widened by
those bounds (and an hour for clock differences between processes): such a summary reads the
account's events recorded in it, not its whole history.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from app.entitlements import history_repository as repo
from app.entitlements.schemas import (
    RESERVED_UID,
    EventKind,
    UsageBucket,
    UsageEventItem,
    UsageEventPage,
    UsageEventsQuery,
    UsageSummaryOut,
    UsageSummaryQuery,
)
from app.errors import ValidationProblem
from app.ledger.service import account_ref, resolve_credit_type
from app.money import fmt
from app.schemas import EPOCH, US, decode_time_cursor, next_time_cursor

if TYPE_CHECKING:
    from app.context import AppContext

# the longest range a summary covers, per window: 744 hours, 366 days
MAX_RANGE = {"hour": timedelta(days=31), "day": timedelta(days=366)}
HOUR = timedelta(hours=1)
STEP = {"hour": HOUR, "day": timedelta(days=1)}
CLOCKS = HOUR


def _whole_hour(at: datetime) -> bool:
    return (at - EPOCH) % HOUR == timedelta(0)


def kind_of(uid: str) -> EventKind:
    if not RESERVED_UID.match(uid):
        return "usage"
    return "hold" if uid[0] == "h" else "rated"


async def events(ctx: AppContext, code: str, query: UsageEventsQuery) -> UsageEventPage:
    account = await account_ref(ctx, code, field="code")
    before = decode_time_cursor(query.cursor) if query.cursor else None
    rows = await repo.events(ctx.pool, account.id, before, query.product, query.kind,
                             query.limit)
    items = []
    for row in rows:
        credit_type = await ctx.catalog.credit_type_by_id(row["credit_type_id"])
        places = credit_type.decimal_places
        items.append(UsageEventItem(
            uid=row["uid"], kind=kind_of(row["uid"]), product=row["product_code"],
            credit_type=credit_type.code,
            amount=fmt(Decimal(row["amount"]), places),
            overage=fmt(Decimal(row["overage"]), places),
            reversed=None if row["reversed"] is None else fmt(Decimal(row["reversed"]), places),
            timestamp=row["event_time"], recorded_at=row["recorded_at"]))
    return UsageEventPage(data=items,
                          next_cursor=next_time_cursor(rows, query.limit, "recorded_at"))


async def summary(ctx: AppContext, code: str, query: UsageSummaryQuery) -> UsageSummaryOut:
    account = await account_ref(ctx, code, field="code")
    # default: through the end of the current hour (a whole hour: the rollups serve it)
    end = query.end or datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + HOUR
    # default: the month of the range's last instant (an end on the 1st at 00:00 ends the month
    # before, not an empty range)
    start = query.start or (end - US).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start >= end:
        raise ValidationProblem("must be before `end`", field="query.start")
    if end - start > MAX_RANGE[query.window]:
        raise ValidationProblem(f"at most {MAX_RANGE[query.window].days} days after `start` "
                                f"with window={query.window}", field="query.end")
    credit_type = None
    if query.credit_type is not None:
        credit_type = await resolve_credit_type(ctx, account, query.credit_type,
                                                field="query.credit_type")
    credit_type_id = None if credit_type is None else credit_type.id
    if _whole_hour(start) and _whole_hour(end):
        async with ctx.pool.acquire() as conn:
            rows = await repo.summary_rolled(conn, account.id, query.window, start, end,
                                             query.product, credit_type_id)
    else:
        settings = ctx.settings
        rows = await repo.summary(
            ctx.pool, account.id, query.window, start, end,
            start - timedelta(seconds=settings.usage_future_skew_s) - CLOCKS,
            end + timedelta(seconds=settings.usage_max_age_s) + CLOCKS,
            query.product, credit_type_id)
    buckets = []
    for row in rows:
        ct = await ctx.catalog.credit_type_by_id(row["credit_type_id"])
        amount, back = Decimal(row["amount"]), Decimal(row["reversed"])
        bucket = row["bucket"].replace(tzinfo=UTC)
        buckets.append(UsageBucket(
            start=bucket, end=bucket + STEP[query.window], product=row["product_code"],
            credit_type=ct.code, events=row["events"],
            amount=fmt(amount, ct.decimal_places), reversed=fmt(back, ct.decimal_places),
            net=fmt(amount - back, ct.decimal_places),
            overage=fmt(Decimal(row["overage"]), ct.decimal_places)))
    return UsageSummaryOut(account=account.code, start=start, end=end, window=query.window,
                           data=buckets)
