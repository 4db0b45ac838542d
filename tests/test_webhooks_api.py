"""Webhook endpoints API: secrets shown once and on reveal, rotation, updates, and bad input
answered with a 4xx problem naming the field."""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from app.errors import ValidationProblem
from app.settings import Settings
from app.webhooks import service
from app.webhooks.urls import address_problem
from tests import webhook_receiver
from tests.conftest import Api
from tests.webhook_receiver import (
    Endpoints,
    attempt_rows,
    eventually,
    statuses,
)

# the fixtures every webhook test uses
receiver = webhook_receiver.receiver
endpoints = webhook_receiver.endpoints

BASE = "/v1/webhook-endpoints"


def problem(response: Any, status: int, field: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["field"] == field, body
    return body


async def test_secret_is_shown_at_creation_and_on_reveal_only(api: Api, endpoints: Endpoints) -> None:
    created = await endpoints.create(None, url="http://127.0.0.1:9/hook", description="billing",
                                     event_types=["balance.low", "balance.low", "credits.granted"])
    secret = created["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24
    assert created["event_types"] == ["balance.low", "credits.granted"]  # duplicates dropped
    assert (created["enabled"], created["description"]) == (True, "billing")
    read = await api.call("GET", f"{BASE}/{created['id']}")
    assert "secret" not in read and secret not in str(read)
    listed = await api.call("GET", BASE, params={"limit": 500})
    assert created["id"] in [e["id"] for e in listed["data"]] and secret not in str(listed)
    revealed = await api.call("POST", f"{BASE}/{created['id']}/secret/reveal")
    assert revealed == {"secret": secret, "previous_secret": None,
                        "previous_secret_expires_at": None}


async def test_rotation_keeps_the_old_secret_for_24_hours(api: Api, endpoints: Endpoints) -> None:
    created = await endpoints.create(None, url="http://127.0.0.1:9/hook")
    rotated = await api.call("POST", f"{BASE}/{created['id']}/secret/rotate")
    assert rotated["secret"] != created["secret"] and rotated["secret"].startswith("whsec_")
    assert rotated["previous_secret"] == created["secret"]
    until = datetime.fromisoformat(rotated["previous_secret_expires_at"])
    assert abs(until - (datetime.now(UTC) + timedelta(hours=24))) < timedelta(minutes=1)
    assert await api.call("POST", f"{BASE}/{created['id']}/secret/reveal") == rotated
    read = await api.call("GET", f"{BASE}/{created['id']}")
    assert read["previous_secret_expires_at"] == rotated["previous_secret_expires_at"]


async def test_update_and_disable(api: Api, endpoints: Endpoints, db: asyncpg.Connection) -> None:
    created = await endpoints.create(None, url="http://127.0.0.1:9/a", event_types=["balance.low"])
    path = f"{BASE}/{created['id']}"
    updated = await api.call("PATCH", path, json={"url": "https://example.invalid/b",
                                                  "description": "new", "event_types": None})
    assert (updated["url"], updated["description"], updated["event_types"]) == \
        ("https://example.invalid/b", "new", None)
    # a queued delivery (its receiver does not resolve: retried later) is cancelled on disable
    await endpoints.send_test(created["id"])
    disabled = await api.call("PATCH", path, json={"enabled": False})
    assert (disabled["enabled"], disabled["disabled_reason"]) == (False, "disabled by an admin")
    assert set(await statuses(db, created["id"])) <= {"cancelled", "failed"}
    assert (await api.client.post(f"{path}/test", headers=api.admin)).status_code == 409
    enabled = await api.call("PATCH", path, json={"enabled": True})
    assert (enabled["enabled"], enabled["disabled_reason"]) == (True, None)


@pytest.mark.parametrize(("body", "field"), [
    ({"url": "ftp://example.com/hook"}, "url"),
    ({"url": "javascript:alert(1)"}, "url"),
    ({"url": "http://"}, "url"),
    ({"url": "not a url"}, "url"),
    ({"url": "http://example.com:99999/"}, "url"),
    ({"url": "http://169.254.169.254/latest/meta-data/"}, "url"),
    ({"url": "http://169.254.10.1:8080/"}, "url"),
    ({"url": "http://[fe80::1]/hook"}, "url"),
    ({"url": "http://[fd00:ec2::254]/"}, "url"),
    ({"url": "http://[::ffff:169.254.169.254]/"}, "url"),
    ({"url": "http://metadata.google.internal/computeMetadata/v1/"}, "url"),
    ({"url": "http://Metadata.Google.Internal./"}, "url"),
    ({"url": "http://2852039166/"}, "url"),  # 169.254.169.254 as one number: caught on resolving
    ({"url": "http://x/" + "a" * 2100}, "url"),
    ({}, "url"),
    ({"url": "http://127.0.0.1/", "description": "d" * 501}, "description"),
    ({"url": "http://127.0.0.1/", "event_types": ["balance.low", "balance.lo"]}, "event_types.1"),
    ({"url": "http://127.0.0.1/", "event_types": []}, "event_types"),
    ({"url": "http://127.0.0.1/", "event_types": "balance.low"}, "event_types"),
    ({"url": "http://127.0.0.1/", "enabled": "maybe"}, "enabled"),
    ({"url": "http://127.0.0.1/", "secret": "whsec_mine"}, "secret"),
])
async def test_bad_endpoint_is_a_422_naming_the_field(api: Api, body: dict[str, Any],
                                                      field: str) -> None:
    response = await api.client.post(BASE, json=body, headers=api.admin)
    problem(response, 422, field)


@pytest.mark.parametrize(("body", "field"), [
    ({"url": None}, "url"),
    ({"url": "gopher://example.com"}, "url"),
    ({"url": "http://169.254.169.254/"}, "url"),
    ({"enabled": None}, "enabled"),
    ({"description": "d" * 501}, "description"),
    ({"event_types": ["nope"]}, "event_types.0"),
])
async def test_bad_update_is_a_422_naming_the_field(api: Api, endpoints: Endpoints,
                                                    body: dict[str, Any], field: str) -> None:
    created = await endpoints.create(None, url="http://127.0.0.1:9/hook")
    response = await api.client.patch(f"{BASE}/{created['id']}", json=body, headers=api.admin)
    problem(response, 422, field)


async def test_unknown_endpoints_and_events_are_404(api: Api) -> None:
    for path, field in [(f"{BASE}/999999999", "endpoint_id"), (f"{BASE}/abc", "endpoint_id"),
                        (f"{BASE}/0", "endpoint_id"), (f"{BASE}/99999999999999999999", "endpoint_id"),
                        ("/v1/webhook-deliveries/999999999", "delivery_id"),
                        ("/v1/webhook-events/evt_nope", "event_id")]:
        problem(await api.client.get(path, headers=api.admin), 404, field)
    problem(await api.client.post("/v1/webhook-events/evt_nope/replay", json={},
                                  headers=api.admin), 404, "event_id")
    problem(await api.client.post(f"{BASE}/999999999/secret/rotate", headers=api.admin), 404,
            "endpoint_id")


@pytest.mark.parametrize(("params", "field"), [
    ({"status": "lost"}, "query.status"),
    ({"event_type": "balance.high"}, "query.event_type"),
    ({"endpoint_id": "x"}, "query.endpoint_id"),
    ({"endpoint_id": "99999999999999999999"}, "query.endpoint_id"),
    ({"cursor": "!!"}, "query.cursor"),
    ({"limit": "0"}, "query.limit"),
])
async def test_bad_delivery_filters_are_a_422(api: Api, params: dict[str, str], field: str) -> None:
    problem(await api.client.get("/v1/webhook-deliveries", params=params, headers=api.admin),
            422, field)


async def test_bad_replay_input_is_a_4xx(api: Api) -> None:
    response = await api.client.post("/v1/webhook-deliveries/replay-failed",
                                     json={"since": "yesterday"}, headers=api.admin)
    problem(response, 422, "since")
    response = await api.client.post("/v1/webhook-deliveries/replay-failed",
                                     json={"since": "2026-01-01T00:00:00"}, headers=api.admin)
    problem(response, 422, "since")  # no offset


async def test_loopback_and_private_receivers_are_allowed(endpoints: Endpoints) -> None:
    for url in ("http://127.0.0.1:9/x", "http://localhost:9/x", "http://[::1]:9/x",
                "http://10.1.2.3/x", "http://192.168.1.1/x", "https://unresolvable.invalid/x"):
        assert (await endpoints.create(None, url=url))["url"] == url


async def test_the_setting_allows_link_local_and_metadata(settings: Settings) -> None:
    allowing = dataclasses.replace(settings, webhooks_allow_private=True)
    for url in ("http://169.254.169.254/", "http://[fe80::1]/", "http://metadata.google.internal/"):
        await service.check_url(allowing, url)
        with pytest.raises(ValidationProblem):
            await service.check_url(settings, url)


def test_address_rules() -> None:
    refused = ["169.254.169.254", "169.254.0.1", "fe80::1", "fe80::1%eth0", "fd00:ec2::254",
               "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "100.100.100.200"]
    allowed = ["127.0.0.1", "::1", "10.0.0.1", "172.16.0.1", "192.168.0.1", "8.8.8.8",
               "2001:db8::1", "fd00::1"]
    assert all(address_problem(a) for a in refused)
    assert not any(address_problem(a) for a in allowed)


async def test_a_connection_to_a_refused_address_is_never_made(
        api: Api, endpoints: Endpoints, db: asyncpg.Connection) -> None:
    # saved before the rule (or its DNS changed since): the dispatcher still refuses to connect
    created = await endpoints.create(None, url="http://127.0.0.1:9/x", event_types=["webhook.test"])
    await db.execute("UPDATE webhook_endpoints SET url = 'http://169.254.169.254/latest' "
                     "WHERE id = $1", created["id"])
    await endpoints.send_test(created["id"])

    async def attempted() -> bool:
        return bool(await attempt_rows(db, created["id"]))

    await eventually(attempted)
    [first] = await attempt_rows(db, created["id"])
    assert first["status_code"] is None and "169.254.169.254 is a cloud metadata address" \
        in first["error"], first["error"]
