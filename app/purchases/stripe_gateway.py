"""Stripe behind plain types: the one module that imports `stripe`.

Everything Stripe returns comes back as a small frozen dataclass and every Stripe error as one
of four exceptions, so the rest of the app never sees an SDK object. Writes carry idempotency
keys the caller derives from our own row ids; the SDK retries network errors, 409 and 5xx with
the same key (`max_network_retries`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import stripe

if TYPE_CHECKING:
    from stripe.params.checkout import SessionCreateParams

    from app.settings import Settings

SIGNATURE_TOLERANCE_S = 300
PURCHASE_KEY = "creditgate_purchase"  # metadata key naming our purchase id
ACCOUNT_KEY = "creditgate_account"


class StripeProblem(Exception):
    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class Unreachable(StripeProblem):
    """No answer we can act on (network, 5xx after retries, rate limit, our credentials):
    the same request with the same idempotency key may be sent again later."""


class Rejected(StripeProblem):
    """Stripe refused the request for good (unknown customer, bad parameter, wrong state)."""


class Declined(StripeProblem):
    """The payment method was declined or needs the customer (402 `card_error`)."""

    def __init__(self, message: str, *, code: str | None, decline_code: str | None,
                 intent: Intent | None) -> None:
        super().__init__(message, code=code)
        self.decline_code = decline_code
        self.intent = intent


class BadSignature(StripeProblem):
    pass


@dataclass(frozen=True)
class Customer:
    id: str
    default_payment_method: str | None
    deleted: bool = False


@dataclass(frozen=True)
class Intent:
    id: str
    status: str
    amount: int
    currency: str
    customer: str | None
    payment_method: str | None
    metadata: Mapping[str, str] = field(default_factory=dict)
    client_secret: str | None = None
    next_action: str | None = None
    redirect_url: str | None = None
    failure_code: str | None = None
    decline_code: str | None = None
    failure_message: str | None = None
    cancellation_reason: str | None = None


@dataclass(frozen=True)
class Session:
    id: str
    status: str | None
    payment_status: str | None
    url: str | None
    payment_intent: str | None
    amount_total: int | None
    currency: str | None
    metadata: Mapping[str, str] = field(default_factory=dict)
    client_reference_id: str | None = None


@dataclass(frozen=True)
class Charge:
    id: str
    payment_intent: str | None
    amount: int
    amount_refunded: int
    refunded: bool


@dataclass(frozen=True)
class InboundEvent:
    id: str
    type: str
    object: Mapping[str, Any]


@dataclass(frozen=True)
class ChargeRequest:
    """A PaymentIntent for a saved payment method, confirmed off-session at once."""

    purchase_id: int
    account_code: str
    amount: int
    currency: str
    customer: str
    payment_method: str
    description: str


@dataclass(frozen=True)
class CheckoutRequest:
    purchase_id: int
    account_code: str
    amount: int
    currency: str
    customer: str
    description: str
    success_url: str
    cancel_url: str | None


def _id(value: Any) -> str | None:
    """An expandable field: an id, an expanded object, or nothing."""
    if isinstance(value, Mapping):
        return str(value["id"])
    return str(value) if value else None


def intent_from(data: Mapping[str, Any]) -> Intent:
    error = data.get("last_payment_error") or {}
    action = data.get("next_action") or {}
    return Intent(
        id=data["id"], status=data["status"], amount=int(data["amount"]),
        currency=data["currency"], customer=_id(data.get("customer")),
        payment_method=_id(data.get("payment_method")), metadata=dict(data.get("metadata") or {}),
        client_secret=data.get("client_secret"), next_action=action.get("type"),
        redirect_url=(action.get("redirect_to_url") or {}).get("url"),
        failure_code=error.get("code"), decline_code=error.get("decline_code"),
        failure_message=error.get("message"), cancellation_reason=data.get("cancellation_reason"))


def session_from(data: Mapping[str, Any]) -> Session:
    total = data.get("amount_total")
    return Session(
        id=data["id"], status=data.get("status"), payment_status=data.get("payment_status"),
        url=data.get("url"), payment_intent=_id(data.get("payment_intent")),
        amount_total=int(total) if total is not None else None, currency=data.get("currency"),
        metadata=dict(data.get("metadata") or {}),
        client_reference_id=data.get("client_reference_id"))


def charge_from(data: Mapping[str, Any]) -> Charge:
    return Charge(id=data["id"], payment_intent=_id(data.get("payment_intent")),
                  amount=int(data["amount"]), amount_refunded=int(data.get("amount_refunded") or 0),
                  refunded=bool(data.get("refunded")))


def _customer_from(data: Mapping[str, Any]) -> Customer:
    settings = data.get("invoice_settings") or {}
    return Customer(id=data["id"], default_payment_method=_id(settings.get("default_payment_method")),
                    deleted=bool(data.get("deleted")))


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except stripe.CardError as exc:
        body: dict[str, Any] = exc.json_body if isinstance(exc.json_body, dict) else {}
        error = body.get("error") or {}
        intent = error.get("payment_intent")
        raise Declined(exc.user_message or str(exc), code=exc.code,
                       decline_code=error.get("decline_code"),
                       intent=intent_from(intent) if intent else None) from exc
    except (stripe.InvalidRequestError, stripe.IdempotencyError) as exc:
        raise Rejected(exc.user_message or str(exc), code=exc.code,
                       param=getattr(exc, "param", None)) from exc
    except stripe.StripeError as exc:  # connection, 5xx, 429, authentication, permission
        raise Unreachable(f"{type(exc).__name__}: {exc.user_message or exc}", code=exc.code) from exc


class _HTTPXClient(stripe.HTTPXClient):
    """The SDK's httpx client, sending its form-encoded body as `content=`: it passes the body
    string as `data=`, which httpx deprecates (a DeprecationWarning on every POST)."""

    def _get_request_args_kwargs(self, method: str, url: str, headers: Mapping[str, str],
                                 post_data: Any) -> list[Any]:
        args: list[Any] = super()._get_request_args_kwargs(method, url, headers, post_data)
        kwargs = args[1]
        if isinstance(kwargs.get("data"), str | bytes):
            kwargs["content"] = kwargs.pop("data")
        return args


class StripeGateway:
    def __init__(self, api_key: str, webhook_secret: str, *, api_base: str = "",
                 max_network_retries: int = 2,
                 timeout_s: float = 30.0) -> None:  # float-ok: a duration
        self._http = _HTTPXClient(timeout=timeout_s)
        self._client = stripe.StripeClient(
            api_key, http_client=self._http, max_network_retries=max_network_retries,
            base_addresses={"api": api_base} if api_base else None)
        self._webhook_secret = webhook_secret

    @classmethod
    def from_settings(cls, settings: Settings) -> StripeGateway | None:
        if not settings.stripe_api_key:
            return None
        return cls(settings.stripe_api_key, settings.stripe_webhook_secret,
                   api_base=settings.stripe_api_base,
                   max_network_retries=settings.stripe_max_network_retries,
                   timeout_s=settings.stripe_timeout_s)

    @property
    def receives_events(self) -> bool:
        return bool(self._webhook_secret)

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    # customers

    async def create_customer(self, name: str, email: str | None, account_code: str,
                              idempotency_key: str) -> Customer:
        with _translated():
            created = await self._client.v1.customers.create_async(
                {"name": name, "email": email or "", "metadata": {ACCOUNT_KEY: account_code}},
                {"idempotency_key": idempotency_key})
        return _customer_from(created.to_dict())

    async def customer(self, customer_id: str) -> Customer:
        with _translated():
            found = await self._client.v1.customers.retrieve_async(customer_id)
        return _customer_from(found.to_dict())

    async def set_default_payment_method(self, customer_id: str, payment_method: str,
                                         idempotency_key: str) -> None:
        with _translated():
            await self._client.v1.customers.update_async(
                customer_id, {"invoice_settings": {"default_payment_method": payment_method}},
                {"idempotency_key": idempotency_key})

    # payment intents

    async def create_intent(self, request: ChargeRequest, idempotency_key: str) -> Intent:
        """Create and confirm off-session; raises Declined when the card says no."""
        with _translated():
            created = await self._client.v1.payment_intents.create_async(
                {"amount": request.amount, "currency": request.currency,
                 "customer": request.customer, "payment_method": request.payment_method,
                 "off_session": True, "confirm": True,
                 # a saved method charged without the customer: nothing may need a redirect
                 "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
                 "description": request.description,
                 "metadata": {PURCHASE_KEY: str(request.purchase_id),
                              ACCOUNT_KEY: request.account_code}},
                {"idempotency_key": idempotency_key})
        return intent_from(created.to_dict())

    async def intent(self, intent_id: str) -> Intent:
        with _translated():
            found = await self._client.v1.payment_intents.retrieve_async(intent_id)
        return intent_from(found.to_dict())

    async def cancel_intent(self, intent_id: str) -> Intent:
        # No key of ours: Stripe would replay a refused cancel for 24 h, and cancelling twice
        # is harmless anyway (the SDK still keeps one key across its own retries).
        with _translated():
            canceled = await self._client.v1.payment_intents.cancel_async(
                intent_id, {"cancellation_reason": "abandoned"})
        return intent_from(canceled.to_dict())

    async def find_intent(self, purchase_id: int) -> Intent | None:
        """The PaymentIntent carrying this purchase id in its metadata (search lags ~1 min)."""
        with _translated():
            found = await self._client.v1.payment_intents.search_async(
                {"query": f"metadata['{PURCHASE_KEY}']:'{purchase_id}'", "limit": 1})
        return intent_from(found.data[0].to_dict()) if found.data else None

    # checkout

    async def create_checkout(self, request: CheckoutRequest, idempotency_key: str) -> Session:
        metadata = {PURCHASE_KEY: str(request.purchase_id), ACCOUNT_KEY: request.account_code}
        params: SessionCreateParams = {
            "mode": "payment", "customer": request.customer,
            "client_reference_id": str(request.purchase_id),
            "line_items": [{"quantity": 1, "price_data": {
                "currency": request.currency, "unit_amount": request.amount,
                "product_data": {"name": request.description}}}],
            # the card is saved on the customer for later off-session purchases
            "payment_intent_data": {"setup_future_usage": "off_session", "metadata": metadata,
                                    "description": request.description},
            "metadata": metadata, "success_url": request.success_url}
        if request.cancel_url:
            params["cancel_url"] = request.cancel_url
        with _translated():
            created = await self._client.v1.checkout.sessions.create_async(
                params, {"idempotency_key": idempotency_key})
        return session_from(created.to_dict())

    async def checkout_session(self, session_id: str) -> Session:
        with _translated():
            found = await self._client.v1.checkout.sessions.retrieve_async(session_id)
        return session_from(found.to_dict())

    # inbound events

    def parse_event(self, payload: bytes, signature: str | None) -> InboundEvent:
        """Verify `Stripe-Signature` (HMAC and a 300 s timestamp tolerance) and parse."""
        try:
            event = self._client.construct_event(payload, signature, self._webhook_secret,
                                                 tolerance=SIGNATURE_TOLERANCE_S)
            body = json.loads(payload)
            return InboundEvent(event.id, event.type, body["data"]["object"])
        except stripe.SignatureVerificationError as exc:
            raise BadSignature(str(exc).split(". ")[0]) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise BadSignature("the signed payload is not a Stripe event") from exc
