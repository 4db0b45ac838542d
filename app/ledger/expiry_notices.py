"""`credits.expiring`: a balance is announced once, `CREDITGATE_EXPIRY_NOTICE_D` days before it
expires, with what remains of it, so the vendor can tell its customer to use the credit (or buy
more) in time. A balance granted with less time left than that is announced at the workers'
next pass; one with nothing left is marked without an event; one that is voided or expires
first is not announced.

Each pass claims the due balances with `FOR UPDATE SKIP LOCKED` and marks them in the
transaction that publishes their events (ids derived from the balance), so any number of
processes announce each balance once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from app.ledger.repository import REMAINING
from app.money import fmt
from app.webhooks.outbox import OutboxEvent, event_id, publish

if TYPE_CHECKING:
    from app.context import AppContext

_DUE = f"""SELECT b.id, b.account_id, ct.code AS credit_type, ct.decimal_places, b.expires_at,
                  b.source, b.product_codes, {REMAINING} AS remaining
           FROM balances b JOIN credit_types ct ON ct.id = b.credit_type_id
           LEFT JOIN balance_snapshots s ON s.balance_id = b.id
           WHERE b.status = 'active' AND b.expires_at IS NOT NULL
             AND b.expiry_noticed_at IS NULL AND b.expires_at > $1 AND b.expires_at <= $2
           ORDER BY b.expires_at LIMIT $3
           FOR UPDATE OF b SKIP LOCKED"""


async def announce_due(ctx: AppContext, limit: int = 500) -> int:
    """Worker: announce the balances expiring within the notice period; how many were marked."""
    days = ctx.settings.expiry_notice_d
    if days <= 0:
        return 0
    now = datetime.now(UTC)
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_DUE, now, now + timedelta(days=days), limit)
        if not rows:
            return 0
        await conn.execute("UPDATE balances SET expiry_noticed_at = $2 WHERE id = ANY($1)",
                           [r["id"] for r in rows], now)
        await publish(conn, [OutboxEvent(
            event_id("credits.expiring", r["id"]), "credits.expiring", r["account_id"], None, now,
            {"account": None, "balance_id": r["id"], "credit_type": r["credit_type"],
             "amount": fmt(Decimal(r["remaining"]), r["decimal_places"]),
             "expires_at": r["expires_at"].astimezone(UTC).isoformat().replace("+00:00", "Z"),
             "products": r["product_codes"], "source": r["source"]})
            for r in rows if Decimal(r["remaining"]) > 0])
    return len(rows)
