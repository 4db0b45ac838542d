"""Re-rating: measurements stored unrated are rated once a plan or a pricing covers them.

A measurement for an account that no active pricing covers is stored with `rated = false`.
Attaching a plan to an account, or adding an aggregation pricing to a plan, writes a
`rerate_requests` row for the account(s) in the same transaction; the worker (every
`worker_interval_s`) then rates each requested account's unrated measurements that a pricing
now covers, whose billing period is still open (ends after today), newest first in batches of
BATCH: the measurement rows are locked `FOR UPDATE SKIP LOCKED` (a second process takes other
ones, and `NOT rated` is re-checked on the latest row version, so none is rated twice), then
the states and running charges in the same fixed order as the rating transaction (so a
concurrent new measurement of the same account and meter waits, or is waited for, and never
deadlocks), the states move exactly as for a new measurement, and `rated` flips in that same
transaction. Debits and give-backs are then sent as for new measurements.

A request is kept for GRACE_S after it was written, and the account rechecked on every pass
meanwhile: a measurement whose rating transaction read "no plan" just before the plan committed,
and committed itself just after, is still found.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg

from app.errors import ValidationProblem
from app.rating import drawdown
from app.rating import repository as repo
from app.rating.giveback import GIVEN_UP
from app.rating.schemas import MeasurementIn

if TYPE_CHECKING:
    from app.context import AppContext

log = logging.getLogger(__name__)
BATCH = 1_000
# newest requests first: a fresh one is worked on the next pass however many are kept
ACCOUNTS_PER_PASS = 500
GRACE_S = 60.0  # float-ok: seconds


async def rerate_pending(ctx: AppContext, grace_s: float = GRACE_S) -> int:  # float-ok: seconds
    """Worker: rate what the pending requests made ratable; returns how many were rated."""
    rated = 0
    for request in await repo.rerate_requests(ctx.pool, ACCOUNTS_PER_PASS):
        more = True
        try:
            count, more = await rerate_account(ctx, request["account_id"])
            rated += count
        except GIVEN_UP as exc:  # e.g. no conversion rate for the day
            log.warning("re-rating account %s failed: %s", request["account_id"], exc)
        if request["age"] > timedelta(seconds=grace_s) and not more:
            await repo.drop_rerate_request(ctx.pool, request["account_id"],
                                           request["requested_at"])
    return rated


async def rerate_account(ctx: AppContext, account_id: int,
                         limit: int = BATCH) -> tuple[int, bool]:
    """Rate up to `limit` of an account's unrated measurements; (how many were rated, whether
    more may be waiting)."""
    async with ctx.pool.acquire() as conn:
        async with conn.transaction():
            rows = await repo.claim_unrated(conn, account_id, limit)
            if not rows:
                return 0, False
            items = [item for row in rows if (item := await _item(ctx, row)) is not None]
            rated = await drawdown.rate_stored(conn, items, datetime.now(UTC).date())
            await repo.mark_rated(conn, account_id, [item.body.uid for item in rated])
    await drawdown.send_rated(ctx, rated)
    return len(rated), len(rows) == limit


async def _item(ctx: AppContext, row: asyncpg.Record) -> drawdown.Item | None:
    """A stored measurement as the rating sees a new one (None: it no longer validates)."""
    body = MeasurementIn(uid=row["uid"], account=row["account"], meter=row["meter"],
                         timestamp=row["ts"].astimezone(UTC), data=json.loads(row["data"]))
    account = await ctx.catalog.account(body.account)
    found = await drawdown.meter(ctx, body.meter)
    if account is None or found is None:
        return None
    try:
        values = drawdown.field_values(found, body.data)
    except ValidationProblem:
        return None
    return drawdown.Item(0, body, account, found, values)
