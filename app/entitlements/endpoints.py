"""Routes of the runtime API: what product backends call on every request."""

from __future__ import annotations

from pydantic import BaseModel
from starlette.responses import Response

from app.entitlements import history, holds, reversals, service
from app.entitlements.schemas import (
    MAX_BATCH,
    AccountBalancesOut,
    CaptureIn,
    CheckIn,
    CheckOut,
    HoldIn,
    HoldOut,
    ReleaseIn,
    ReversalIn,
    ReversalOut,
    UsageBatch,
    UsageBatchOut,
    UsageEventOut,
    UsageEventPage,
    UsageEventsQuery,
    UsageResult,
    UsageSummaryOut,
    UsageSummaryQuery,
)
from app.entitlements.streams import MEDIA_TYPE, StreamQuery, balances_stream
from app.errors import ValidationProblem
from app.http import CUSTOMER_READ, READ, RUNTIME, Call, Endpoint, batch_of, render


async def check(call: Call) -> BaseModel:
    out = await service.check(call.ctx, call.body, call.request.header(b"idempotency-key"))
    if (observed := call.ctx.observed) is not None:
        observed.checks[out.reason, call.body.consume] += 1
    return out


async def usage(call: Call) -> BaseModel:
    """One event object, or {"events": [...]} with up to MAX_BATCH events answered one by one."""
    body = call.body
    events = batch_of(body, "events", MAX_BATCH)
    if events is not None:
        results = await service.record_usage(call.ctx, events, "events.{}.")
        _count(call, results)
        return UsageBatchOut(
            accepted=sum(r.status == "accepted" for r in results),
            duplicates=sum(r.status == "duplicate" for r in results),
            rejected=sum(r.status == "rejected" for r in results), results=results)
    [result] = await service.record_usage(call.ctx, [body], "")
    _count(call, [result])
    if result.error is not None:
        raise ValidationProblem(result.error.message, field=result.error.field)
    return result


def _count(call: Call, results: list[UsageResult]) -> None:
    if (observed := call.ctx.observed) is not None:
        counts = observed.usage
        for r in results:  # (Counter.update checks its argument's type first: dearer for one)
            counts[r.status] += 1


async def balances(call: Call) -> BaseModel:
    return await service.live_balances(call.ctx, call.path("code"))


async def place_hold(call: Call) -> Response:
    out, made = await holds.place(call.ctx, call.path("code"), call.body)
    return render(out, 201 if made else 200)  # 200: refused, or this uid's hold made before


async def read_hold(call: Call) -> BaseModel:
    return await holds.read(call.ctx, call.path("code"), call.path("uid"))


async def capture_hold(call: Call) -> BaseModel:
    return await holds.end(call.ctx, call.path("code"), call.path("uid"), call.body.amount)


async def release_hold(call: Call) -> BaseModel:
    return await holds.end(call.ctx, call.path("code"), call.path("uid"), None)


async def read_usage_event(call: Call) -> BaseModel:
    return await reversals.read_event(call.ctx, call.path("code"), call.path("uid"))


async def usage_events(call: Call) -> BaseModel:
    return await history.events(call.ctx, call.path("code"), call.query)


async def usage_summary(call: Call) -> BaseModel:
    return await history.summary(call.ctx, call.path("code"), call.query)


async def reverse_usage(call: Call) -> Response:
    out, made = await reversals.reverse(call.ctx, call.path("code"), call.path("uid"), call.body)
    return render(out, 201 if made else 200)  # 200: this event's reversal made before


ENDPOINTS = [
    Endpoint("POST", "/v1/check", check, RUNTIME,
             "May this account use this product now? Optionally consume atomically",
             "runtime", body=CheckIn, response=CheckOut),
    Endpoint("POST", "/v1/usage", usage, RUNTIME,
             "Report usage: one event, or {events: [...]} up to 1,000, each answered on its own",
             "runtime", body=UsageBatch, response=UsageBatchOut, raw_body=True),
    Endpoint("GET", "/v1/accounts/{code}/balances", balances, CUSTOMER_READ,
             "Real-time balances of an account, from the hot state", "runtime",
             response=AccountBalancesOut),
    Endpoint("GET", "/v1/accounts/{code}/balances/stream", balances_stream, CUSTOMER_READ,
             "The real-time balances as server-sent events: now, then at each change",
             "runtime", query=StreamQuery, response=AccountBalancesOut, media_type=MEDIA_TYPE,
             token_in_query=True),
    Endpoint("POST", "/v1/accounts/{code}/holds", place_hold, RUNTIME,
             "Set credit aside for a use whose cost is known after it, atomically and only if "
             "covered (201; 200 when refused, or for a uid held before)", "holds",
             body=HoldIn, response=HoldOut, status=201, also=(200,)),
    Endpoint("GET", "/v1/accounts/{code}/holds/{uid}", read_hold, READ, "A hold", "holds",
             response=HoldOut),
    Endpoint("POST", "/v1/accounts/{code}/holds/{uid}/capture", capture_hold, RUNTIME,
             "Capture what the use cost (at most the amount held); the rest goes back",
             "holds", body=CaptureIn, response=HoldOut),
    Endpoint("POST", "/v1/accounts/{code}/holds/{uid}/release", release_hold, RUNTIME,
             "Give back everything a hold set aside", "holds", body=ReleaseIn,
             response=HoldOut),
    Endpoint("GET", "/v1/accounts/{code}/usage-events", usage_events, READ,
             "An account's usage events, newest recorded first, each with what a reversal "
             "gave back", "runtime", query=UsageEventsQuery, response=UsageEventPage),
    Endpoint("GET", "/v1/accounts/{code}/usage-summary", usage_summary, CUSTOMER_READ,
             "The account's usage per UTC hour or day, product and credit type: reported, "
             "reversed, net, overage", "runtime", query=UsageSummaryQuery,
             response=UsageSummaryOut),
    Endpoint("GET", "/v1/accounts/{code}/usage-events/{uid}", read_usage_event, READ,
             "A usage event as recorded, the balances it drew, and its reversal", "runtime",
             response=UsageEventOut),
    Endpoint("POST", "/v1/accounts/{code}/usage-events/{uid}/reverse", reverse_usage, READ,
             "Give a usage event's debit back, in full or in part, once (201; 200 for a "
             "reversal made before with the same amount)", "runtime", body=ReversalIn,
             response=ReversalOut, status=201, also=(200,)),
]

SINGLE_USAGE_RESPONSE = UsageResult
