"""Background work every app process runs: orphaned-journal sweep, recurring grants (each
period's credits, and the rollover of the period that ended), credit expiry and the notices of
credit about to expire, expired holds, the usage rollups, rated debits a crash left, the
standing charges and counter charges of billing periods that started, the bill run of closed
periods, the purchase reconciler, the auto-recharge runner, expired Idempotency-Keys, and
webhook events and audit-trail rows past their retention.

Safe with any number of processes: journal flushes are idempotent, expiries are keyed by
balance id, recurring grants by period and balance, recurring charges are settled and bills
written under the account's row lock.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from app import audit
from app.entitlements.holds import settle as settle_holds
from app.entitlements.reversals import settle as settle_reversals
from app.entitlements.rollups import roll_up_due as roll_up_usage
from app.errors import STORE_ERRORS
from app.idempotency import purge_expired as purge_expired_keys
from app.ledger.expiry_notices import announce_due as announce_expiring
from app.ledger.recurring_grants import grant_due as grant_recurring
from app.ledger.service import expire_due
from app.ledger.snapshots import take_due as take_snapshots
from app.purchases.tasks import run_reconciler
from app.rating.bills import BillMemory
from app.rating.bills import run_when_due as run_bills
from app.rating.drawdown import UnsentCursor, send_unsent
from app.rating.giveback import settle_unsettled
from app.rating.recurring import SweepMemory
from app.rating.recurring import sweep_when_due as draw_recurring_charges
from app.rating.rerate import rerate_pending
from app.recharge.runner import run_recharges
from app.webhooks.service import purge_old as purge_old_webhooks

if TYPE_CHECKING:
    from app.context import AppContext

log = logging.getLogger(__name__)


async def run_workers(ctx: AppContext) -> None:
    # Stripe calls may take seconds: the purchase reconciler runs beside this loop, not in it
    await asyncio.gather(_store_workers(ctx), run_reconciler(ctx), run_recharges(ctx))


async def _store_workers(ctx: AppContext) -> None:
    recurring, unsent, billed = SweepMemory(), UnsentCursor(shared=True), BillMemory()
    while True:
        try:
            await ctx.journal.sweep(ctx.settings.journal_orphan_ms)
            await grant_recurring(ctx)
            await expire_due(ctx)
            await announce_expiring(ctx)
            await settle_holds(ctx)
            await settle_reversals(ctx)
            await take_snapshots(ctx, ctx.settings.snapshot_every)
            await roll_up_usage(ctx)
            await send_unsent(ctx, cursor=unsent)
            await draw_recurring_charges(ctx, recurring)
            await run_bills(ctx, billed)
            await settle_unsettled(ctx)
            await rerate_pending(ctx)
            await purge_expired_keys(ctx)
            await purge_old_webhooks(ctx.pool, ctx.settings)
            await audit.purge_old(ctx.pool, ctx.settings.audit_retention_d)
        except STORE_ERRORS as exc:
            log.warning("worker pass skipped: %s", exc)
        except Exception:
            log.exception("worker pass failed")
        await asyncio.sleep(ctx.settings.worker_interval_s)
