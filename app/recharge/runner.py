"""The recharge runner: pays the recharges the hot path, a config save or the sweep started.

Each pass claims due recharges with `FOR UPDATE SKIP LOCKED` (so any number of processes share
them; a claim doubles as a lease that a dead runner's recharge is taken over after) and works on
them concurrently, then sweeps a page of configs for low balances nothing crossed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from app.errors import STORE_ERRORS
from app.recharge import repository as repo
from app.recharge import service

if TYPE_CHECKING:
    import asyncpg

    from app.context import AppContext

log = logging.getLogger(__name__)
BATCH = 20


async def _process(ctx: AppContext, row: asyncpg.Record) -> None:
    try:
        await service.process(ctx, row)
    except Exception:
        log.exception("auto-recharge %s: processing failed; retried after its backoff", row["id"])


async def run_once(ctx: AppContext, limit: int = BATCH) -> int:
    """Claim and work on due recharges; returns how many it claimed."""
    rows = await repo.claim_due(ctx.pool, limit)
    await asyncio.gather(*(_process(ctx, row) for row in rows))
    return len(rows)


async def run_recharges(ctx: AppContext) -> None:
    """Runs beside the other workers (a Stripe call may take seconds)."""
    if ctx.stripe is None:  # nothing can be paid: configs cannot be saved either
        return
    cursor = (0, 0)
    while True:
        try:
            await run_once(ctx)
            cursor = await service.sweep(ctx, cursor)
        except STORE_ERRORS as exc:
            log.warning("recharge pass skipped: %s", exc)
        except Exception:
            log.exception("recharge pass failed")
        await asyncio.sleep(ctx.settings.worker_interval_s)
