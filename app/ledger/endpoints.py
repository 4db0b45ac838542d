"""Routes of balances, recurring grants and the ledger (admin scope)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel
from starlette.responses import Response

from app.http import ADMIN, Call, Endpoint, render
from app.ledger import overage, recurring_grants, service
from app.ledger import repository as repo
from app.ledger.schemas import (
    AdjustmentIn,
    BalanceAtOut,
    BalanceAtQuery,
    BalanceOut,
    BalancePage,
    GrantIn,
    LedgerPage,
    LedgerQuery,
    OverageSettlementIn,
    OverageSettlementOut,
    RecurringGrantEndIn,
    RecurringGrantIn,
    RecurringGrantOut,
    RecurringGrantPage,
    ThresholdIn,
    ThresholdList,
    ThresholdOut,
    VoidIn,
)
from app.schemas import Code, ListQuery, next_cursor


class BalanceListQuery(ListQuery):
    account: Code
    status: Literal["active", "pending", "voided", "expired"] | None = None
    credit_type: Code | None = None


async def grant(call: Call) -> BaseModel:
    return await service.grant(call.ctx, call.path("code"), call.body)


async def get_balance(call: Call) -> BaseModel:
    return await service.read_balance(call.ctx, call.path_id("balance_id", "balance"))


async def list_balances(call: Call) -> BaseModel:
    q = call.query
    account = await service.account_ref(call.ctx, q.account)
    credit_type = None if q.credit_type is None else (await service.resolve_credit_type(
        call.ctx, account, q.credit_type, field="query.credit_type")).id
    rows = await repo.account_balances(call.ctx.pool, account.id, q.after_id(), q.limit,
                                       q.status, credit_type)
    return BalancePage(data=[service.balance_out(r) for r in rows],
                       next_cursor=next_cursor([r["id"] for r in rows], q.limit))


async def adjust(call: Call) -> BaseModel:
    return await service.adjust(call.ctx, call.path_id("balance_id", "balance"), call.body)


async def void(call: Call) -> BaseModel:
    return await service.void(call.ctx, call.path_id("balance_id", "balance"), call.body)


async def ledger(call: Call) -> BaseModel:
    q = call.query
    return await service.ledger(call.ctx, call.path("code"), q.credit_type, q.cursor, q.limit)


async def set_threshold(call: Call) -> BaseModel:
    return await service.set_threshold(call.ctx, call.path("code"), call.path("credit_type"),
                                       call.body)


async def thresholds(call: Call) -> BaseModel:
    return await service.thresholds(call.ctx, call.path("code"))


async def balance_at(call: Call) -> BaseModel:
    return await service.balance_at(call.ctx, call.path("code"), call.query.at)


async def create_recurring(call: Call) -> BaseModel:
    return await recurring_grants.create(call.ctx, call.path("code"), call.body)


async def list_recurring(call: Call) -> BaseModel:
    account = await service.account_ref(call.ctx, call.path("code"))
    q = call.query
    rows = await repo.recurring_grants_of(call.ctx.pool, account.id, q.after_id(), q.limit)
    return RecurringGrantPage(data=[recurring_grants.grant_out(r) for r in rows],
                              next_cursor=next_cursor([r["id"] for r in rows], q.limit))


async def read_recurring(call: Call) -> BaseModel:
    return await recurring_grants.read(call.ctx, call.path_id("id", "recurring grant"))


async def end_recurring(call: Call) -> BaseModel:
    return await recurring_grants.end(call.ctx, call.path_id("id", "recurring grant"),
                                      call.body.end)


async def settle_overage(call: Call) -> Response:
    out, made = await overage.settle(call.ctx, call.path("code"), call.body)
    return render(out, 201 if made else 200)  # 200: this reference was settled before


ENDPOINTS = [
    Endpoint("POST", "/v1/accounts/{code}/overage-settlements", settle_overage, ADMIN,
             "Record that an amount of what the account owes (overage) was paid, once per "
             "reference (201; 200 for a reference settled before)", "balances",
             body=OverageSettlementIn, response=OverageSettlementOut, status=201, also=(200,)),
    Endpoint("POST", "/v1/accounts/{code}/grants", grant, ADMIN,
             "Grant credits: creates a balance and its grant entry", "balances", body=GrantIn,
             response=BalanceOut, status=201),
    Endpoint("GET", "/v1/balances", list_balances, ADMIN,
             "List an account's balances (all statuses, or one) with granted and remaining "
             "amounts",
             "balances", query=BalanceListQuery, response=BalancePage),
    Endpoint("GET", "/v1/balances/{balance_id}", get_balance, ADMIN, "Read a balance",
             "balances", response=BalanceOut),
    Endpoint("POST", "/v1/balances/{balance_id}/adjustments", adjust, ADMIN,
             "Adjust a balance up or down", "balances", body=AdjustmentIn, response=BalanceOut),
    Endpoint("POST", "/v1/balances/{balance_id}/void", void, ADMIN,
             "Void what remains of a balance", "balances", body=VoidIn, response=BalanceOut),
    Endpoint("GET", "/v1/accounts/{code}/ledger", ledger, ADMIN,
             "The account's ledger, oldest first, with a running balance per entry", "ledger",
             query=LedgerQuery, response=LedgerPage),
    Endpoint("PUT", "/v1/accounts/{code}/thresholds/{credit_type}", set_threshold, ADMIN,
             "Set or clear the low-balance threshold of an account and credit type", "balances",
             body=ThresholdIn, response=ThresholdOut),
    Endpoint("GET", "/v1/accounts/{code}/thresholds", thresholds, ADMIN,
             "Low-balance thresholds of an account", "balances", response=ThresholdList),
    Endpoint("GET", "/v1/accounts/{code}/balance-at", balance_at, ADMIN,
             "The account's balance per credit type as of a past time", "ledger",
             query=BalanceAtQuery, response=BalanceAtOut),
    Endpoint("POST", "/v1/accounts/{code}/recurring-grants", create_recurring, ADMIN,
             "Grant credits every period (each period's a balance expiring at its end; what "
             "it leaves unused rolls over into the next, up to a percentage and a cap)",
             "recurring grants", body=RecurringGrantIn, response=RecurringGrantOut, status=201),
    Endpoint("GET", "/v1/accounts/{code}/recurring-grants", list_recurring, ADMIN,
             "An account's recurring grants", "recurring grants", query=ListQuery,
             response=RecurringGrantPage),
    Endpoint("GET", "/v1/recurring-grants/{id}", read_recurring, ADMIN,
             "A recurring grant with its latest periods", "recurring grants",
             response=RecurringGrantOut),
    Endpoint("POST", "/v1/recurring-grants/{id}/end", end_recurring, ADMIN,
             "End a recurring grant: no period starts on or after `end` (the periods granted "
             "stay)", "recurring grants", body=RecurringGrantEndIn, response=RecurringGrantOut),
]
