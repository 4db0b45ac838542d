"""Routes of auto-recharge (admin): the config per account and credit type, and the recharges."""

from __future__ import annotations

from pydantic import BaseModel

from app.http import ADMIN, Call, Endpoint
from app.recharge import service
from app.recharge.schemas import (
    AutoRechargeIn,
    AutoRechargeList,
    AutoRechargeOut,
    RechargePage,
    RechargeQuery,
)
from app.schemas import next_cursor


async def save_config(call: Call) -> BaseModel:
    return await service.save_config(call.ctx, call.path("code"), call.path("credit_type"),
                                     call.body)


async def read_config(call: Call) -> BaseModel:
    return await service.read_config(call.ctx, call.path("code"), call.path("credit_type"))


async def list_configs(call: Call) -> BaseModel:
    return await service.list_configs(call.ctx, call.path("code"))


async def list_recharges(call: Call) -> BaseModel:
    q = call.query
    rows = await service.account_recharges(call.ctx, call.path("code"), q.after_id(), q.limit)
    return RechargePage(data=[service.recharge_out(r) for r in rows],
                        next_cursor=next_cursor([r["id"] for r in rows], q.limit))


ENDPOINTS = [
    Endpoint("PUT", "/v1/accounts/{code}/auto-recharge/{credit_type}", save_config, ADMIN,
             "Set auto-recharge of an account and credit type: when the drawable balance falls "
             "to the threshold, buy back up to recharge_to with the saved card. Saving it enabled "
             "while the balance is already at or below the threshold recharges at once.",
             "auto-recharge", body=AutoRechargeIn, response=AutoRechargeOut),
    Endpoint("GET", "/v1/accounts/{code}/auto-recharge/{credit_type}", read_config, ADMIN,
             "Read an account's auto-recharge of a credit type", "auto-recharge",
             response=AutoRechargeOut),
    Endpoint("GET", "/v1/accounts/{code}/auto-recharge", list_configs, ADMIN,
             "List an account's auto-recharge configs", "auto-recharge",
             response=AutoRechargeList),
    Endpoint("GET", "/v1/accounts/{code}/auto-recharges", list_recharges, ADMIN,
             "List an account's recharges: what started each, what it bought, how it ended",
             "auto-recharge", query=RechargeQuery, response=RechargePage),
]
