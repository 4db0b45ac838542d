"""Routes of purchases (admin), Stripe customers (admin) and Stripe's webhook (public: it is
verified by its signature instead of an API key)."""

from __future__ import annotations

from pydantic import BaseModel
from starlette.responses import Response

from app.errors import problem_response
from app.http import ADMIN, PUBLIC, Call, Endpoint
from app.purchases import service
from app.purchases.schemas import (
    PurchaseIn,
    PurchaseOut,
    PurchasePage,
    PurchaseQuery,
    StripeCustomerIn,
    StripeCustomerOut,
    WebhookReceipt,
)
from app.schemas import next_cursor


async def create_purchase(call: Call) -> Response:
    assert call.principal is not None
    progress = await service.create_purchase(call.ctx, call.path("code"), call.body,
                                             call.principal.key_id,
                                             call.request.headers["idempotency-key"])
    out = service.purchase_out(progress.row, progress.intent)
    if out.status == "failed":
        return problem_response(service.PaymentFailed(out))
    # paid at once: 201; waiting for Stripe or the customer: 202 (poll it, or wait for the event)
    status = 201 if out.status in ("paid", "refunded") else 202
    return Response(out.model_dump_json(), status_code=status, media_type="application/json")


async def list_purchases(call: Call) -> BaseModel:
    q = call.query
    rows = await service.account_purchases(call.ctx, call.path("code"), q.after_id(), q.limit)
    return PurchasePage(data=[service.purchase_out(r) for r in rows],
                        next_cursor=next_cursor([r["id"] for r in rows], q.limit))


async def get_purchase(call: Call) -> BaseModel:
    return await service.read_purchase(call.ctx, call.path("code"), call.path_id("purchase_id", "purchase"))


async def link_stripe_customer(call: Call) -> BaseModel:
    return await service.link_customer(call.ctx, call.path("code"), call.body)


async def get_stripe_customer(call: Call) -> BaseModel:
    return await service.stripe_customer(call.ctx, call.path("code"))


async def stripe_webhook(call: Call) -> BaseModel:
    return await service.receive_event(call.ctx, await call.request.body(),
                                       call.request.headers.get("stripe-signature"))


ENDPOINTS = [
    Endpoint("POST", "/v1/accounts/{code}/purchases", create_purchase, ADMIN,
             "Buy credits: charge the saved card (or open Checkout); credits are granted once "
             "paid. 201 paid, 202 pending, 402 declined. Needs an Idempotency-Key.",
             "purchases", body=PurchaseIn, response=PurchaseOut, status=201, also=(202,),
             idempotency_required=True),
    Endpoint("GET", "/v1/accounts/{code}/purchases", list_purchases, ADMIN,
             "List an account's purchases with their status and Stripe ids", "purchases",
             query=PurchaseQuery, response=PurchasePage),
    Endpoint("GET", "/v1/accounts/{code}/purchases/{purchase_id}", get_purchase, ADMIN,
             "Read a purchase", "purchases", response=PurchaseOut),
    Endpoint("POST", "/v1/accounts/{code}/stripe-customer", link_stripe_customer, ADMIN,
             "Link the account to a Stripe customer: attach one by id, or create one",
             "purchases", body=StripeCustomerIn, response=StripeCustomerOut),
    Endpoint("GET", "/v1/accounts/{code}/stripe-customer", get_stripe_customer, ADMIN,
             "The account's Stripe customer and its default payment method", "purchases",
             response=StripeCustomerOut),
    Endpoint("POST", "/v1/stripe/webhook", stripe_webhook, PUBLIC,
             "Stripe's events (verified by Stripe-Signature, no API key)", "purchases",
             response=WebhookReceipt),
]
