"""Re-rating: what a plan or pricing that arrives later covers is rated by it.

A measurement for an account that no active pricing covers is stored with `rated = false`; one
rated by some pricings may later be covered by another (a pricing added to its plan, a second
plan attached, either backdated). Each measurement keeps the rating_config_version its rating
read its pricings at, and each pricing and account plan the version its insert took
(migration 016), so a pricing has rated a measurement exactly when its `visible_from` (the
later of its own version and its account plan's) is at most the measurement's.

Attaching a plan to an account, or adding an aggregation pricing to a plan, writes a
`rerate_requests` row for the account(s) in the same transaction, with the version that row
took (`from_version`; the lowest when requests merge); the worker (every `worker_interval_s`)
then takes each requested account's measurements of its billing periods not billed yet (a
period is open until the bill run closes it) that a pricing covers with a later
`visible_from`, reading only the meters that pricings visible from `from_version` on rate
(migration 018), newest first in batches of BATCH:
the measurement rows are locked `FOR UPDATE SKIP LOCKED` (a second process takes other ones,
and the condition is re-checked on the latest row version, so none is taken twice), each is
placed in exactly those pricings (unless that billing period has been billed), the states and
running charges are locked in the same fixed order as the rating transaction (so a
concurrent new measurement of the same account and meter waits, or is waited for, and never
deadlocks) and move exactly as for a new measurement, and in that same transaction the
measurement's version moves to the one the pricings were read at (and `rated` flips if it
was placed). Debits and give-backs are then sent as for new measurements.

No rating can miss a pricing and commit after the re-rating looked: a rating transaction
share-locks the version row when it reads the pricings (repository.active_pricings_many), and
the insert of a pricing or account plan updates that row, so each waits for the other to
commit. A request is dropped once a pass finds nothing more to take.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg

from app.db import Connection
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


async def rerate_pending(ctx: AppContext) -> int:
    """Worker: rate what the pending requests made ratable; returns how many were rated."""
    rated = 0
    for request in await repo.rerate_requests(ctx.pool, ACCOUNTS_PER_PASS):
        more = True
        try:
            count, more = await rerate_account(ctx, request["account_id"],
                                               from_version=request["from_version"])
            rated += count
        except GIVEN_UP as exc:  # e.g. no conversion rate for the day
            log.warning("re-rating account %s failed: %s", request["account_id"], exc)
        except Exception:  # its own failure (a bug): kept for the next pass, the others go on
            log.exception("re-rating account %s failed", request["account_id"])
        if not more:
            await repo.drop_rerate_request(ctx.pool, request["account_id"],
                                           request["requested_at"])
    return rated


async def rerate_account(ctx: AppContext, account_id: int, limit: int = BATCH,
                         from_version: int | None = None) -> tuple[int, bool]:
    """Rate up to `limit` of an account's measurements for the pricings that arrived after
    their rating; (how many were placed in a pricing, whether more may be waiting). With
    `from_version`, only measurements of the meters that pricings visible from that version on
    rate are read."""
    async with ctx.pool.acquire() as conn:
        async with conn.transaction():
            since = await _open_since(conn, account_id)
            if since is None:
                return 0, False
            rows = await repo.claim_unplaced(conn, account_id, since, limit, from_version)
            if not rows:
                return 0, False
            items = [(item, row["config_version"]) for row in rows
                     if (item := await _item(ctx, row)) is not None]
            placed, version = await drawdown.rate_stored(conn, items)
            await repo.mark_placed(conn, account_id, [row["uid"] for row in rows],
                                   [item.body.uid for item in placed], version)
    await drawdown.send_rated(ctx, placed)
    return len(placed), len(rows) == limit


async def _open_since(conn: Connection, account_id: int) -> datetime | None:
    """The earliest start of a billing period of the account's plans not billed yet (None: no
    plan): what lies before it is in billed periods only, which nothing reopens."""
    starts = [r["billed_through"] or r["anchor"]
              for r in await repo.account_plan_anchors(conn, account_id)]
    if not starts:
        return None
    first = min(starts)
    return datetime(first.year, first.month, first.day, tzinfo=UTC)


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
