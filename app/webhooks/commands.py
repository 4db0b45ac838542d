"""`creditgate webhooks send-test` and `creditgate webhooks watch`: straight on Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from app.settings import Seconds
from app.webhooks import repository as repo
from app.webhooks import service


async def send_test(dsn: str, endpoint_id: int) -> str:
    """Queue a `webhook.test` event for one endpoint; a line saying what was queued."""
    conn = await asyncpg.connect(dsn)
    try:
        event_id, delivery_id = await service.send_test(conn, endpoint_id)
    finally:
        await conn.close()
    return f"queued {event_id} (webhook.test) for endpoint {endpoint_id} as delivery {delivery_id}"


def _when(at: datetime | None) -> str:
    return (at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def delivery_line(row: asyncpg.Record) -> str:
    return (f"{_when(row['created_at'])}  queued      delivery {row['id']}  {row['event_id']}  "
            f"{row['event_type']}  endpoint {row['endpoint_id']}")


def attempt_line(row: asyncpg.Record) -> str:
    answer = f"HTTP {row['status_code']}" if row["status_code"] is not None else "no answer"
    if row["status"] == "pending":
        outcome = f"retry at {_when(row['next_attempt_at'])}"
    else:
        outcome = row["status"]
    line = (f"{_when(row['attempted_at'])}  attempt {row['attempt'] or '?':<3} delivery "
            f"{row['delivery_id']}  {row['event_id']}  {row['event_type']}  endpoint "
            f"{row['endpoint_id']}  {answer} in {row['latency_ms']} ms  -> {outcome}")
    return line + (f"  ({row['error']})" if row["error"] else "")


async def watch(dsn: str, endpoint_id: int | None, interval_s: Seconds,
                out: Callable[[str], None]) -> None:
    """Print new deliveries and attempts as they are logged, until cancelled."""
    conn = await asyncpg.connect(dsn)
    try:
        last_delivery, last_attempt = await repo.last_ids(conn)
        scope = f"endpoint {endpoint_id}" if endpoint_id else "every endpoint"
        out(f"watching deliveries to {scope} (Ctrl-C to stop)")
        while True:
            for row in await repo.deliveries_after(conn, last_delivery, endpoint_id):
                last_delivery = row["id"]
                out(delivery_line(row))
            for row in await repo.attempts_after(conn, last_attempt, endpoint_id):
                last_attempt = row["id"]
                out(attempt_line(row))
            await asyncio.sleep(interval_s)
    finally:
        await conn.close()
