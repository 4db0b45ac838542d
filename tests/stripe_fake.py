"""Stripe faked at the HTTP boundary, and a "shop": an app instance with Stripe configured.

The fake answers the SDK's real HTTP requests (respx on api.stripe.com; every other host passes
through). It keeps PaymentIntents, Checkout Sessions and customers, and replays the stored
answer for a repeated Idempotency-Key as Stripe does, so a re-sent create is recognisable.
Faults are injected per request: `down` (never reaches Stripe), `lost` (Stripe acts, the answer
is lost: a read timeout), `500`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import httpx
import respx
import stripe

from app.context import AppContext
from app.main import create_app
from app.purchases.tasks import reconcile_once
from app.settings import Settings
from tests.conftest import Api

WEBHOOK_SECRET = "whsec_test_creditgate_secret"
_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:14]}{next(_ids)}"


def _form(request: httpx.Request) -> dict[str, str]:
    return dict(parse_qsl(request.content.decode()))


def _metadata(form: dict[str, str], prefix: str = "metadata[") -> dict[str, str]:
    """`metadata[k]=v`, or with another prefix `payment_intent_data[metadata][k]=v`."""
    return {k[len(prefix):-1]: v for k, v in form.items() if k.startswith(prefix) and k.endswith("]")}


def _error(status: int, kind: str, message: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"type": kind, "message": message, **extra}}


@dataclass
class Outcome:
    """What the next PaymentIntent create does."""

    status: str = "succeeded"  # succeeded, processing, requires_action
    decline: tuple[str, str | None] | None = None  # (code, decline_code): a 402 card_error


@dataclass
class FakeStripe:
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    replies: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[str | None] = field(default_factory=list)  # consumed one per request
    requests: list[httpx.Request] = field(default_factory=list)
    # awaited inside a PaymentIntent create, after Stripe "charged" and before it answers
    during_create: Callable[[dict[str, Any]], Awaitable[None]] | None = None

    # state helpers

    def customer(self, default_payment_method: str | None = "pm_card_visa") -> str:
        customer_id = new_id("cus")
        self.customers[customer_id] = {
            "id": customer_id, "object": "customer", "name": "Example Inc.", "email": None,
            "metadata": {}, "invoice_settings": {"default_payment_method": default_payment_method}}
        return customer_id

    def seen(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]

    def creates(self) -> list[httpx.Request]:
        return self.seen("POST", "/v1/payment_intents")

    def complete_session(self, session_id: str, paid: bool = True) -> dict[str, Any]:
        """The customer pays on the Checkout page: a succeeded intent on a saved card."""
        session = self.sessions[session_id]
        intent = self._intent(session["amount_total"], session["currency"], session["customer"],
                              "pm_from_checkout", session["payment_intent_metadata"],
                              "succeeded" if paid else "processing")
        session.update(status="complete", payment_status="paid" if paid else "unpaid",
                       payment_intent=intent["id"])
        return self._public_session(session)

    def set_status(self, intent_id: str, status: str, **extra: Any) -> dict[str, Any]:
        self.intents[intent_id].update(status=status, **extra)
        return dict(self.intents[intent_id])

    def charge(self, intent_id: str, refunded: int | None = None) -> dict[str, Any]:
        intent = self.intents[intent_id]
        amount = intent["amount"]
        return {"id": new_id("ch"), "object": "charge", "payment_intent": intent_id,
                "amount": amount, "amount_refunded": amount if refunded is None else refunded,
                "refunded": refunded is None or refunded == amount, "metadata": {}}

    # the HTTP side

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = self.faults.pop(0) if self.faults else None
        if fault == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if fault == "500":
            return httpx.Response(500, json={"error": {"type": "api_error", "message": "boom"}})
        key = request.headers.get("idempotency-key")
        if request.method == "POST" and key in self.replies:
            status, body = self.replies[key]
        else:
            status, body = await self._route(request)
            if request.method == "POST" and key:
                self.replies[key] = (status, body)
        if fault == "lost":
            raise httpx.ReadTimeout("read timed out", request=request)
        return httpx.Response(status, json=body)

    async def _route(self, request: httpx.Request) -> tuple[int, dict[str, Any]]:
        path, method = request.url.path, request.method
        parts = path.strip("/").split("/")
        form = _form(request) if method == "POST" else {}
        if path == "/v1/payment_intents" and method == "POST":
            return await self._create_intent(form)
        if path == "/v1/payment_intents/search":
            wanted = request.url.params["query"].split(":'")[1].rstrip("'")
            found = [i for i in self.intents.values()
                     if i["metadata"].get("creditgate_purchase") == wanted]
            return 200, {"object": "search_result", "data": found[:1], "has_more": False,
                         "url": path}
        if parts[:2] == ["v1", "payment_intents"] and len(parts) == 3:
            return self._get(self.intents, parts[2])
        if parts[:2] == ["v1", "payment_intents"] and parts[3:] == ["cancel"]:
            return self._cancel(parts[2])
        if path == "/v1/checkout/sessions" and method == "POST":
            return self._create_session(form)
        if parts[:3] == ["v1", "checkout", "sessions"] and len(parts) == 4:
            status, body = self._get(self.sessions, parts[3])
            return status, self._public_session(body) if status == 200 else body
        if path == "/v1/customers" and method == "POST":
            customer_id = new_id("cus")
            self.customers[customer_id] = {
                "id": customer_id, "object": "customer", "name": form.get("name"),
                "email": form.get("email") or None, "metadata": _metadata(form),
                "invoice_settings": {"default_payment_method": None}}
            return 200, self.customers[customer_id]
        if parts[:2] == ["v1", "customers"] and len(parts) == 3:
            status, body = self._get(self.customers, parts[2])
            if status == 200 and method == "POST":
                pm = form.get("invoice_settings[default_payment_method]")
                body["invoice_settings"]["default_payment_method"] = pm
            return status, body
        return _error(404, "invalid_request_error", f"fake Stripe has no {method} {path}")

    @staticmethod
    def _get(store: dict[str, dict[str, Any]], object_id: str) -> tuple[int, dict[str, Any]]:
        if object_id not in store:
            return _error(404, "invalid_request_error", f"No such object: '{object_id}'",
                          code="resource_missing", param="id")
        return 200, store[object_id]

    def _intent(self, amount: int, currency: str, customer: str | None, payment_method: str | None,
                metadata: dict[str, str], status: str) -> dict[str, Any]:
        intent_id = new_id("pi")
        intent: dict[str, Any] = {
            "id": intent_id, "object": "payment_intent", "amount": amount, "currency": currency,
            "customer": customer, "payment_method": payment_method, "metadata": metadata,
            "status": status, "client_secret": f"{intent_id}_secret_x", "next_action": None,
            "last_payment_error": None, "cancellation_reason": None}
        if status == "requires_action":
            intent["next_action"] = {"type": "use_stripe_sdk", "use_stripe_sdk": {}}
        self.intents[intent_id] = intent
        return intent

    async def _create_intent(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        outcome = self.outcomes.pop(0) if self.outcomes else Outcome()
        status = "requires_payment_method" if outcome.decline else outcome.status
        intent = self._intent(int(form["amount"]), form["currency"], form.get("customer"),
                              form.get("payment_method"), _metadata(form), status)
        if self.during_create is not None:
            await self.during_create(dict(intent))
        if outcome.decline:
            code, decline_code = outcome.decline
            intent["last_payment_error"] = {"type": "card_error", "code": code,
                                            "decline_code": decline_code,
                                            "message": "Your card was declined."}
            return _error(402, "card_error", "Your card was declined.", code=code,
                          decline_code=decline_code, payment_intent=dict(intent))
        return 200, dict(intent)

    def _cancel(self, intent_id: str) -> tuple[int, dict[str, Any]]:
        status, intent = self._get(self.intents, intent_id)
        if status != 200:
            return status, intent
        if intent["status"] in ("succeeded", "canceled", "processing"):
            return _error(400, "invalid_request_error",
                          f"You cannot cancel this PaymentIntent because it has a status of "
                          f"{intent['status']}.", code="payment_intent_unexpected_state")
        intent.update(status="canceled", cancellation_reason="abandoned", next_action=None)
        return 200, dict(intent)

    def _create_session(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        session_id = new_id("cs")
        self.sessions[session_id] = {
            "id": session_id, "object": "checkout.session", "mode": form["mode"],
            "status": "open", "payment_status": "unpaid",
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            "amount_total": int(form["line_items[0][price_data][unit_amount]"]),
            "currency": form["line_items[0][price_data][currency]"],
            "customer": form.get("customer"), "client_reference_id": form.get("client_reference_id"),
            "metadata": _metadata(form), "payment_intent": None,
            "payment_intent_metadata": _metadata(form, "payment_intent_data[metadata]["), "form": form}
        return 200, self._public_session(self.sessions[session_id])

    @staticmethod
    def _public_session(session: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in session.items() if k not in ("payment_intent_metadata", "form")}


@contextmanager
def fake_stripe() -> Iterator[FakeStripe]:
    fake = FakeStripe()
    with respx.mock(assert_all_called=False) as router:
        router.route(host="api.stripe.com").mock(side_effect=fake.handle)
        router.route().pass_through()
        yield fake


def signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET,
           timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    payload = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp)
    return payload.encode(), {"Stripe-Signature": header, "content-type": "application/json"}


def event(event_type: str, obj: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    public = {k: v for k, v in obj.items() if k not in ("payment_intent_metadata", "form")}
    return {"id": event_id or new_id("evt"), "object": "event", "type": event_type,
            "api_version": "2025-01-27.acacia", "created": int(time.time()), "livemode": False,
            "data": {"object": public}}


@dataclass
class Shop:
    """An app with Stripe configured (workers off: tests run the reconciler themselves)."""

    ctx: AppContext
    api: Api
    client: httpx.AsyncClient

    async def deliver(self, evt: dict[str, Any], *, timestamp: int | None = None,
                      secret: str = WEBHOOK_SECRET) -> httpx.Response:
        body, headers = signed(evt, secret, timestamp)
        return await self.client.post("/v1/stripe/webhook", content=body, headers=headers)

    async def customer_account(self, fake: FakeStripe, default_payment_method: str | None = "pm_card_visa",
                               **setup: Any) -> dict[str, str]:
        """A fresh account linked to a fake Stripe customer."""
        names = await self.api.setup(**setup)
        customer_id = fake.customer(default_payment_method)
        await self.api.call("POST", f"/v1/accounts/{names['account']}/stripe-customer",
                            json={"customer_id": customer_id})
        return {**names, "customer": customer_id}

    async def buy(self, account: str, expect: int, key: str | None = None,
                  **body: Any) -> dict[str, Any]:
        payload = {"credits": "20.00", "price": "20.00", "currency": "usd", "expires_in": "P1Y",
                   **body}
        headers = {"Idempotency-Key": key or uuid.uuid4().hex}
        result: dict[str, Any] = await self.api.call(
            "POST", f"/v1/accounts/{account}/purchases", expect=expect, json=payload,
            headers=headers)
        return result

    async def purchase(self, account: str, purchase_id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self.api.call(
            "GET", f"/v1/accounts/{account}/purchases/{purchase_id}")
        return result

    async def reconcile(self, db: asyncpg.Connection, purchase_id: int | None = None,
                        event_id: str | None = None) -> int:
        """One reconciler pass with only this purchase (and this stored event) due: whatever
        other tests left unsettled waits."""
        await db.execute("UPDATE purchases SET check_after = CASE WHEN id = $1 THEN now() - "
                         "interval '1 second' ELSE now() + interval '1 hour' END "
                         "WHERE status IN ('pending', 'granting')", purchase_id)
        await db.execute("UPDATE stripe_events SET retry_after = CASE WHEN id = $1 THEN now() - "
                         "interval '1 second' ELSE now() + interval '1 hour' END "
                         "WHERE handled_at IS NULL", event_id)
        return await reconcile_once(self.ctx)


@asynccontextmanager
async def open_shop(settings: Settings, keys: dict[str, str]) -> AsyncIterator[Shop]:
    shop_settings = dataclasses.replace(
        settings, run_workers=False, db_pool_size=6, stripe_api_key="sk_test_creditgate",
        stripe_webhook_secret=WEBHOOK_SECRET, stripe_max_network_retries=2, stripe_timeout_s=5)
    app = create_app(shop_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500, as served
        async with httpx.AsyncClient(transport=transport, base_url="http://creditgate") as client:
            yield Shop(app.state.ctx, Api(client, keys), client)


async def outbox(db: asyncpg.Connection, event_type: str, purchase_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT payload::text AS p FROM webhook_events WHERE type = $1 "
        "AND payload->'data'->>'purchase_id' = $2", event_type, str(purchase_id))
    return [json.loads(r["p"]) for r in rows]
