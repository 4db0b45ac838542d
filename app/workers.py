"""Background work every app process runs: orphaned-journal sweep, a sampled check of the hot
copy against Postgres, recurring grants (each period's credits, and the rollover of the period
that ended), credit expiry and the notices of credit about to expire, expired holds, the usage
rollups, rated debits a crash left, the standing charges and counter charges of billing periods
that started, the bill run of closed periods, the purchase reconciler, the auto-recharge
runner, expired Idempotency-Keys, and webhook events and audit-trail rows past their retention.

Safe with any number of processes: journal flushes are idempotent, expiries are keyed by
balance id, recurring grants by period and balance, recurring charges are settled and bills
written under the account's row lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from app import audit
from app.entitlements.holds import settle as settle_holds
from app.entitlements.reversals import settle as settle_reversals
from app.entitlements.rollups import roll_up_due as roll_up_usage
from app.errors import STORE_ERRORS
from app.idempotency import purge_expired as purge_expired_keys
from app.ledger.expiry_notices import announce_due as announce_expiring
from app.ledger.recurring_grants import grant_due as grant_recurring
from app.ledger.rollups import roll_up_due as roll_up_ledger
from app.ledger.service import expire_due
from app.ledger.snapshots import take_due as take_snapshots
from app.ledger.verifier import check_sampled
from app.purchases.tasks import run_reconciler
from app.rating.bills import BillMemory, announce_settled
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


Step = tuple[str, Callable[[], Awaitable[object]]]


def _steps(ctx: AppContext) -> list[Step]:
    """A pass's steps, in order, each with the name it is logged by."""
    recurring, unsent, billed = SweepMemory(), UnsentCursor(shared=True), BillMemory()
    settings = ctx.settings
    return [
        ("journal sweep", lambda: ctx.journal.sweep(settings.journal_orphan_ms)),
        ("hot-state check", lambda: check_sampled(ctx, ctx.hot_check, settings.verify_every_s)),
        ("recurring grants", lambda: grant_recurring(ctx)),
        ("expiry", lambda: expire_due(ctx)),
        ("expiry notices", lambda: announce_expiring(ctx)),
        ("expired holds", lambda: settle_holds(ctx)),
        ("reversals", lambda: settle_reversals(ctx)),
        ("snapshots", lambda: take_snapshots(ctx, settings.snapshot_every)),
        ("usage rollups", lambda: roll_up_usage(ctx)),
        ("ledger rollups", lambda: roll_up_ledger(ctx)),
        ("unsent rated debits", lambda: send_unsent(ctx, cursor=unsent)),
        ("recurring charges", lambda: draw_recurring_charges(ctx, recurring)),
        ("bill run", lambda: run_bills(ctx, billed)),
        ("give-backs", lambda: settle_unsettled(ctx)),
        ("bill settlements", lambda: announce_settled(ctx)),
        ("re-rating", lambda: rerate_pending(ctx)),
        ("idempotency keys", lambda: purge_expired_keys(ctx)),
        ("webhook retention", lambda: purge_old_webhooks(ctx.pool, settings)),
        ("audit retention", lambda: audit.purge_old(ctx.pool, settings.audit_retention_d)),
    ]


async def _store_workers(ctx: AppContext) -> None:
    steps = _steps(ctx)
    while True:
        await run_pass(steps)
        await asyncio.sleep(ctx.settings.worker_interval_s)


async def run_pass(steps: list[Step]) -> None:
    """One pass. A step that fails for its own reason (a bug, a row it cannot handle) is
    logged and the next one runs: one failing step used to skip every step after it, in
    every pass. A store that cannot answer ends the pass (every later step would fail too)."""
    for name, step in steps:
        try:
            await step()
        except STORE_ERRORS as exc:
            log.warning("worker pass skipped at %s: %s", name, exc)
            return
        except Exception:
            log.exception("worker step %s failed", name)
