"""The purchase reconciler: settles what the request and the webhook could not.

It takes due unsettled purchases (each claimed with a backoff, so several processes share the
work) and asks Stripe where they stand: a create that never got an answer is re-sent with the
same idempotency key, a known PaymentIntent or Checkout Session is retrieved. It also retries
stored Stripe events whose handling could not reach Stripe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from app.errors import STORE_ERRORS
from app.purchases import repository as repo
from app.purchases import service

if TYPE_CHECKING:
    from app.context import AppContext

log = logging.getLogger(__name__)
BATCH = 20


async def reconcile_once(ctx: AppContext, limit: int = BATCH) -> int:
    """One pass; returns how many purchases and events it looked at."""
    if ctx.stripe is None:
        return 0
    rows = await repo.claim_unsettled(ctx.pool, limit)
    for row in rows:
        try:
            await service.advance(ctx, row)
        except Exception:
            log.exception("purchase %s: reconciling failed", row["id"])
    events = await repo.claim_unhandled_events(ctx.pool, limit)
    for event_id, event_type, payload in events:
        try:
            await service.handle_stored_event(ctx, event_id, event_type, payload["data"]["object"])
        except Exception:
            log.exception("Stripe event %s: handling failed", event_id)
    return len(rows) + len(events)


async def run_reconciler(ctx: AppContext) -> None:
    """Runs beside the other workers: a Stripe call may take seconds, the journal sweep may not
    wait for it."""
    if ctx.stripe is None:
        return
    while True:
        try:
            await reconcile_once(ctx)
        except STORE_ERRORS as exc:
            log.warning("reconciler pass skipped: %s", exc)
        except Exception:
            log.exception("reconciler pass failed")
        await asyncio.sleep(ctx.settings.worker_interval_s)
