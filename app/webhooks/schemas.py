"""Bodies of the webhook endpoints API and the delivery log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    StrictBool,
    StringConstraints,
    WithJsonSchema,
)

from app.schemas import Integer, ListQuery, Page, Strict, Timestamp
from app.webhooks.events import EVENT_TYPES
from app.webhooks.urls import MAX_URL_LENGTH, parse_url

MAX_ID = 2**63 - 1
DeliveryStatus = Literal["pending", "delivered", "failed", "cancelled"]


def _known_type(value: str) -> str:
    if value not in EVENT_TYPES:
        raise ValueError(f"unknown event type {value!r}; known: {', '.join(EVENT_TYPES)}")
    return value


def _http_url(value: str) -> str:
    parse_url(value)
    return value


def _distinct(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


EventType = Annotated[str, AfterValidator(_known_type),
                      WithJsonSchema({"type": "string", "enum": list(EVENT_TYPES)})]
ReceiverUrl = Annotated[str, StringConstraints(min_length=1, max_length=MAX_URL_LENGTH),
                        AfterValidator(_http_url),
                        WithJsonSchema({"type": "string", "format": "uri",
                                        "maxLength": MAX_URL_LENGTH})]
EventTypes = Annotated[list[EventType], Field(min_length=1, max_length=len(EVENT_TYPES) * 2),
                       AfterValidator(_distinct)] | None
EndpointDescription = Annotated[str, StringConstraints(max_length=500)]
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
BodyId = Annotated[Integer, Field(ge=1, le=MAX_ID)]  # in a JSON body: a number, not "5"


class EndpointIn(Strict):
    url: ReceiverUrl
    description: EndpointDescription = ""
    event_types: EventTypes = Field(default=None, description="null: every event type")
    enabled: StrictBool = True


class EndpointPatch(Strict):
    url: ReceiverUrl | None = None
    description: EndpointDescription | None = None
    event_types: EventTypes = Field(default=None, description="null: every event type")
    enabled: StrictBool | None = None


class EndpointOut(BaseModel):
    id: int
    url: str
    description: str
    event_types: list[str] | None = Field(description="null: every event type")
    enabled: bool
    disabled_reason: str | None
    failing_since: datetime | None = Field(description="first failure of the current streak")
    previous_secret_expires_at: datetime | None = Field(
        description="while set, the previous secret still signs beside the current one")
    created_at: datetime
    updated_at: datetime


class EndpointCreated(EndpointOut):
    secret: str = Field(description="whsec_...: shown here and by the reveal call only")


class EndpointPage(Page[EndpointOut]):
    pass


class SecretOut(BaseModel):
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: datetime | None


class TestEventOut(BaseModel):
    event_id: str
    delivery_id: int


class AttemptOut(BaseModel):
    id: int
    attempt: int | None
    attempted_at: datetime
    status_code: int | None = Field(description="null: no HTTP answer (refused, timeout, ...)")
    latency_ms: int
    error: str | None
    response_excerpt: str | None = Field(description="the first 1 KB of the response body")


class DeliveryOut(BaseModel):
    id: int
    event_id: str
    event_type: str
    endpoint_id: int
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: datetime | None = Field(description="while pending")
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime
    attempts: list[AttemptOut]


class DeliveryPage(Page[DeliveryOut]):
    pass


class DeliveryQuery(ListQuery):
    endpoint_id: Id | None = None
    event_id: Annotated[str, StringConstraints(max_length=100)] | None = None
    event_type: EventType | None = None
    status: DeliveryStatus | None = None


class EventOut(BaseModel):
    id: str
    type: str
    created_at: datetime
    payload: dict[str, Any] = Field(description="the body every delivery sends: {type, timestamp, data}")


class ReplayIn(Strict):
    endpoint_id: BodyId | None = Field(
        default=None, description="only this endpoint (even one that never had the event); "
        "default: every endpoint that had it")


class ReplayOut(BaseModel):
    deliveries: list[DeliveryOut]


class ReplayFailedIn(Strict):
    since: Timestamp = Field(description="events created at or after this time")
    endpoint_id: BodyId | None = None


class ReplayFailedOut(BaseModel):
    replayed: int
