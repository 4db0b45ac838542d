"""Routes of webhook endpoints and the delivery log (admin scope)."""

from __future__ import annotations

import json

from pydantic import BaseModel

from app.errors import NotFound
from app.http import ADMIN, Call, Endpoint
from app.schemas import ListQuery, decode_cursor, next_cursor
from app.webhooks import repository as repo
from app.webhooks import service
from app.webhooks.schemas import (
    DeliveryOut,
    DeliveryPage,
    DeliveryQuery,
    EndpointCreated,
    EndpointIn,
    EndpointOut,
    EndpointPage,
    EndpointPatch,
    EventOut,
    ReplayFailedIn,
    ReplayFailedOut,
    ReplayIn,
    ReplayOut,
    SecretOut,
    TestEventOut,
)

TAG = "webhooks"


async def create_endpoint(call: Call) -> BaseModel:
    return await service.create_endpoint(call.ctx.pool, call.ctx.settings, call.body)


async def list_endpoints(call: Call) -> BaseModel:
    rows = await repo.list_endpoints(call.ctx.pool, call.query.after_id(), call.query.limit)
    return EndpointPage(data=[service.endpoint_out(r) for r in rows],
                        next_cursor=next_cursor([r["id"] for r in rows], call.query.limit))


async def get_endpoint(call: Call) -> BaseModel:
    endpoint_id = call.path_id("endpoint_id", "endpoint id")
    return service.endpoint_out(await service.endpoint_row(call.ctx.pool, endpoint_id))


async def update_endpoint(call: Call) -> BaseModel:
    return await service.update_endpoint(call.ctx.pool, call.ctx.settings,
                                         call.path_id("endpoint_id", "endpoint id"), call.body)


async def reveal_secret(call: Call) -> BaseModel:
    endpoint_id = call.path_id("endpoint_id", "endpoint id")
    return service.secret_out(await service.endpoint_row(call.ctx.pool, endpoint_id))


async def rotate_secret(call: Call) -> BaseModel:
    return await service.rotate_secret(call.ctx.pool, call.path_id("endpoint_id", "endpoint id"))


async def send_test(call: Call) -> BaseModel:
    event_id, delivery_id = await service.send_test(call.ctx.pool, call.path_id("endpoint_id", "endpoint id"))
    return TestEventOut(event_id=event_id, delivery_id=delivery_id)


async def list_deliveries(call: Call) -> BaseModel:
    q: DeliveryQuery = call.query
    rows = await repo.list_deliveries(call.ctx.pool, decode_cursor(q.cursor), q.limit,
                                      q.endpoint_id, q.event_id, q.event_type, q.status)
    return DeliveryPage(data=await service.deliveries_out(call.ctx.pool, rows),
                        next_cursor=next_cursor([r["id"] for r in rows], q.limit))


async def get_delivery(call: Call) -> BaseModel:
    rows = await repo.deliveries_by_id(call.ctx.pool, [call.path_id("delivery_id", "delivery id")])
    if not rows:
        raise NotFound(f"no delivery {call.path('delivery_id')!r}", field="delivery_id")
    [delivery] = await service.deliveries_out(call.ctx.pool, rows)
    return delivery


async def get_event(call: Call) -> BaseModel:
    row = await repo.event_by_id(call.ctx.pool, call.path("event_id"))
    if row is None:
        raise NotFound(f"no event {call.path('event_id')!r}", field="event_id")
    return EventOut(id=row["id"], type=row["type"], created_at=row["created_at"],
                    payload=json.loads(row["payload"]))


async def replay_event(call: Call) -> BaseModel:
    deliveries = await service.replay_event(call.ctx.pool, call.path("event_id"),
                                            call.body.endpoint_id)
    return ReplayOut(deliveries=deliveries)


async def replay_failed(call: Call) -> BaseModel:
    body: ReplayFailedIn = call.body
    return ReplayFailedOut(replayed=await repo.replay_failed(call.ctx.pool, body.since,
                                                             body.endpoint_id))


ENDPOINTS = [
    Endpoint("POST", "/v1/webhook-endpoints", create_endpoint, ADMIN,
             "Create a webhook endpoint; the answer shows its signing secret", TAG,
             body=EndpointIn, response=EndpointCreated, status=201),
    Endpoint("GET", "/v1/webhook-endpoints", list_endpoints, ADMIN, "List webhook endpoints", TAG,
             query=ListQuery, response=EndpointPage),
    Endpoint("GET", "/v1/webhook-endpoints/{endpoint_id}", get_endpoint, ADMIN,
             "Read a webhook endpoint (without its secret)", TAG, response=EndpointOut),
    Endpoint("PATCH", "/v1/webhook-endpoints/{endpoint_id}", update_endpoint, ADMIN,
             "Change a webhook endpoint's URL, description, event types or enabled flag; "
             "disabling cancels its pending deliveries", TAG,
             body=EndpointPatch, response=EndpointOut),
    Endpoint("POST", "/v1/webhook-endpoints/{endpoint_id}/secret/reveal", reveal_secret, ADMIN,
             "Show the signing secret (and the previous one while it still signs)", TAG,
             response=SecretOut),
    Endpoint("POST", "/v1/webhook-endpoints/{endpoint_id}/secret/rotate", rotate_secret, ADMIN,
             "New signing secret; the old one keeps signing beside it for 24 hours", TAG,
             response=SecretOut),
    Endpoint("POST", "/v1/webhook-endpoints/{endpoint_id}/test", send_test, ADMIN,
             "Send a webhook.test event to this endpoint only", TAG, response=TestEventOut,
             status=202),
    Endpoint("GET", "/v1/webhook-deliveries", list_deliveries, ADMIN,
             "The delivery log, newest first, with every attempt", TAG, query=DeliveryQuery,
             response=DeliveryPage),
    Endpoint("GET", "/v1/webhook-deliveries/{delivery_id}", get_delivery, ADMIN,
             "One delivery with every attempt", TAG, response=DeliveryOut),
    Endpoint("POST", "/v1/webhook-deliveries/replay-failed", replay_failed, ADMIN,
             "Queue again every failed or cancelled delivery of events since a time", TAG,
             body=ReplayFailedIn, response=ReplayFailedOut),
    Endpoint("GET", "/v1/webhook-events/{event_id}", get_event, ADMIN,
             "An event and the payload its deliveries send", TAG, response=EventOut),
    Endpoint("POST", "/v1/webhook-events/{event_id}/replay", replay_event, ADMIN,
             "Send an event again: to one endpoint, or to every endpoint that had it", TAG,
             body=ReplayIn, response=ReplayOut),
]
