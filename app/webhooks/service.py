"""Rules of webhook endpoints and the delivery log."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg

from app.db import Conn, Connection
from app.errors import Conflict, NotFound, ValidationProblem
from app.webhooks import repository as repo
from app.webhooks.outbox import OutboxEvent, event_id, publish
from app.webhooks.schemas import (
    AttemptOut,
    DeliveryOut,
    EndpointCreated,
    EndpointIn,
    EndpointOut,
    EndpointPatch,
    SecretOut,
)
from app.webhooks.signing import new_secret
from app.webhooks.urls import parse_url, url_problem

if TYPE_CHECKING:
    from app.settings import Settings

ROTATION_OVERLAP = timedelta(hours=24)
PURGE_BATCH = 1000


def endpoint_out(row: asyncpg.Record) -> EndpointOut:
    fields = dict(row)
    expires = fields["previous_secret_expires_at"]
    if expires is not None and expires <= datetime.now(UTC):
        fields["previous_secret_expires_at"] = None
    return EndpointOut.model_validate(fields)


async def check_url(settings: Settings, url: str) -> None:
    if settings.webhooks_allow_private:
        return
    problem = await url_problem(parse_url(url))
    if problem:
        raise ValidationProblem(
            f"refused: {problem} (set CREDITGATE_WEBHOOKS_ALLOW_PRIVATE=1 to allow)", field="url")


async def create_endpoint(pool: Conn, settings: Settings, body: EndpointIn) -> EndpointCreated:
    await check_url(settings, body.url)
    row = await repo.insert_endpoint(pool, body.url, body.description, body.event_types,
                                     body.enabled, new_secret())
    return EndpointCreated.model_validate({**endpoint_out(row).model_dump(), "secret": row["secret"]})


async def endpoint_row(conn: Conn, endpoint_id: int) -> asyncpg.Record:
    row = await repo.endpoint_by_id(conn, endpoint_id)
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id}", field="endpoint_id")
    return row


async def update_endpoint(pool: asyncpg.Pool, settings: Settings, endpoint_id: int,
                          body: EndpointPatch) -> EndpointOut:
    changes: dict[str, Any] = body.model_dump(exclude_unset=True)
    for name in ("url", "description", "enabled"):
        if name in changes and changes[name] is None:
            raise ValidationProblem("may not be null", field=name)
    if "url" in changes:
        await check_url(settings, changes["url"])
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.update_endpoint(conn, endpoint_id, changes) if changes \
            else await repo.endpoint_by_id(conn, endpoint_id)
        if row is None:
            raise NotFound(f"no webhook endpoint {endpoint_id}", field="endpoint_id")
        if changes.get("enabled") is False:
            await repo.cancel_pending(conn, endpoint_id, "endpoint disabled")
    return endpoint_out(row)


def secret_out(row: asyncpg.Record) -> SecretOut:
    expires = row["previous_secret_expires_at"]
    live = expires is not None and expires > datetime.now(UTC)
    return SecretOut(secret=row["secret"], previous_secret=row["previous_secret"] if live else None,
                     previous_secret_expires_at=expires if live else None)


async def rotate_secret(conn: Conn, endpoint_id: int) -> SecretOut:
    row = await repo.rotate_secret(conn, endpoint_id, new_secret(), ROTATION_OVERLAP)
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id}", field="endpoint_id")
    return secret_out(row)


def make_test_event(endpoint_id: int) -> OutboxEvent:
    return OutboxEvent(event_id("webhook.test", endpoint_id, uuid.uuid4()), "webhook.test", None,
                       None, datetime.now(UTC),
                       {"endpoint_id": endpoint_id, "message": "a test event from creditgate"})


async def send_test(conn: Conn, endpoint_id: int) -> tuple[str, int]:
    """Publish a `webhook.test` event to this endpoint only; its (event id, delivery id)."""
    row = await endpoint_row(conn, endpoint_id)
    if not row["enabled"]:
        raise Conflict(f"webhook endpoint {endpoint_id} is disabled", field="endpoint_id")
    event = make_test_event(endpoint_id)
    return event.id, await repo.insert_event_for(conn, event, endpoint_id)


async def disable_endpoint(conn: Connection, endpoint_id: int, reason: str, detail: str) -> bool:
    """Disable an endpoint on the dispatcher's initiative and announce it (once)."""
    row = await repo.disable_endpoint(conn, endpoint_id, detail)
    if row is None:
        return False
    at = datetime.now(UTC)
    failing_since = row["failing_since"]
    await publish(conn, [OutboxEvent(
        event_id("webhook_endpoint.disabled", endpoint_id, row["updated_at"].isoformat()),
        "webhook_endpoint.disabled", None, None, at,
        {"endpoint_id": endpoint_id, "url": row["url"], "reason": reason, "detail": detail,
         "failing_since": failing_since.isoformat().replace("+00:00", "Z")
         if failing_since else None})])
    return True


async def deliveries_out(conn: Conn, rows: list[asyncpg.Record]) -> list[DeliveryOut]:
    attempts: dict[int, list[AttemptOut]] = defaultdict(list)
    for attempt in await repo.attempts_of(conn, [r["id"] for r in rows]):
        attempts[attempt["delivery_id"]].append(AttemptOut.model_validate(dict(attempt)))
    return [DeliveryOut.model_validate({**dict(r), "attempts": attempts[r["id"]]}) for r in rows]


async def replay_event(conn: Conn, event_id_: str, endpoint_id: int | None) -> list[DeliveryOut]:
    if await repo.event_by_id(conn, event_id_) is None:
        raise NotFound(f"no event {event_id_!r}", field="event_id")
    if endpoint_id is not None:
        endpoint = await repo.endpoint_by_id(conn, endpoint_id)
        if endpoint is None:
            raise ValidationProblem(f"no webhook endpoint {endpoint_id}", field="endpoint_id")
        if not endpoint["enabled"]:
            raise Conflict(f"webhook endpoint {endpoint_id} is disabled", field="endpoint_id")
    ids = await repo.replay_event(conn, event_id_, endpoint_id)
    return await deliveries_out(conn, await repo.deliveries_by_id(conn, ids))


async def purge_old(conn: Conn, settings: Settings) -> int:
    """Worker: delete events (with their deliveries and attempts) older than the retention
    that no delivery is pending for, at most PURGE_BATCH per pass; how many events went."""
    if settings.webhook_retention_d <= 0:
        return 0
    return await repo.purge_settled(conn, timedelta(days=settings.webhook_retention_d),
                                    PURGE_BATCH)
