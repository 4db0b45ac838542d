"""Routes of the configuration API (admin scope)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.config import repository as repo
from app.config import service
from app.config.schemas import (
    AccountIn,
    AccountListQuery,
    AccountOut,
    AccountPage,
    AccountPatch,
    CreditTypeIn,
    CreditTypeOut,
    CreditTypePage,
    CreditTypePatch,
    ProductIn,
    ProductOut,
    ProductPage,
    ProductPatch,
)
from app.errors import NotFound, ValidationProblem
from app.http import ADMIN, Call, Endpoint, Handler
from app.schemas import ListQuery, Page, next_cursor


async def create_credit_type(call: Call) -> BaseModel:
    return await service.create_credit_type(call.ctx, call.body)


async def create_product(call: Call) -> BaseModel:
    return await service.create_product(call.ctx, call.body)


def _named(table: str, label: str, out: type[BaseModel], page: type[Page[Any]]) -> tuple[Handler, ...]:
    """Read, list and rename handlers of a catalog of named codes (credit types, products)."""

    async def read(call: Call) -> BaseModel:
        row = await repo.named_by_code(call.ctx.pool, table, call.path("code"))
        if row is None:
            raise NotFound(f"no {label} {call.path('code')!r}", field="code")
        return out.model_validate(dict(row))

    async def list_all(call: Call) -> BaseModel:
        rows = await repo.list_rows(call.ctx.pool, table, call.query.after_id(), call.query.limit)
        return page(data=[out.model_validate(dict(r)) for r in rows],
                    next_cursor=next_cursor([r["id"] for r in rows], call.query.limit))

    async def rename(call: Call) -> BaseModel:
        row = await repo.rename(call.ctx.pool, table, call.path("code"), call.body.name)
        if row is None:
            raise NotFound(f"no {label} {call.path('code')!r}", field="code")
        return out.model_validate(dict(row))

    singular = table.removesuffix("s")
    for handler, name in ((read, "get_"), (list_all, "list_"), (rename, "update_")):
        handler.__name__ = handler.__qualname__ = name + (singular if name != "list_" else table)
    return read, list_all, rename


get_credit_type, list_credit_types, update_credit_type = _named(
    "credit_types", "credit type", CreditTypeOut, CreditTypePage)
get_product, list_products, update_product = _named("products", "product", ProductOut, ProductPage)


async def create_account(call: Call) -> BaseModel:
    return await service.create_account(call.ctx, call.body)


async def get_account(call: Call) -> BaseModel:
    return service.account_out(await service.account_row(call.ctx, call.path("code")))


async def list_accounts(call: Call) -> BaseModel:
    q = call.query
    parent_id = None
    if q.parent is not None:
        parent = await call.ctx.catalog.account(q.parent)
        if parent is None:
            raise ValidationProblem(f"unknown account {q.parent!r}", field="query.parent")
        parent_id = parent.id
    rows = await repo.list_accounts(call.ctx.pool, q.after_id(), q.limit, q.email, q.status,
                                    parent_id)
    return AccountPage(data=[service.account_out(r) for r in rows],
                       next_cursor=next_cursor([r["id"] for r in rows], q.limit))


async def update_account(call: Call) -> BaseModel:
    return await service.update_account(call.ctx, call.path("code"), call.body)


ENDPOINTS = [
    Endpoint("POST", "/v1/credit-types", create_credit_type, ADMIN, "Create a credit type",
             "credit types", body=CreditTypeIn, response=CreditTypeOut, status=201),
    Endpoint("GET", "/v1/credit-types", list_credit_types, ADMIN, "List credit types",
             "credit types", query=ListQuery, response=CreditTypePage),
    Endpoint("GET", "/v1/credit-types/{code}", get_credit_type, ADMIN, "Read a credit type",
             "credit types", response=CreditTypeOut),
    Endpoint("PATCH", "/v1/credit-types/{code}", update_credit_type, ADMIN,
             "Rename a credit type", "credit types", body=CreditTypePatch, response=CreditTypeOut),
    Endpoint("POST", "/v1/products", create_product, ADMIN, "Create a product", "products",
             body=ProductIn, response=ProductOut, status=201),
    Endpoint("GET", "/v1/products", list_products, ADMIN, "List products", "products",
             query=ListQuery, response=ProductPage),
    Endpoint("GET", "/v1/products/{code}", get_product, ADMIN, "Read a product", "products",
             response=ProductOut),
    Endpoint("PATCH", "/v1/products/{code}", update_product, ADMIN, "Rename a product",
             "products", body=ProductPatch, response=ProductOut),
    Endpoint("POST", "/v1/accounts", create_account, ADMIN, "Create an account", "accounts",
             body=AccountIn, response=AccountOut, status=201),
    Endpoint("GET", "/v1/accounts", list_accounts, ADMIN,
             "List accounts, optionally by email, status or parent", "accounts",
             query=AccountListQuery, response=AccountPage),
    Endpoint("GET", "/v1/accounts/{code}", get_account, ADMIN, "Read an account", "accounts",
             response=AccountOut),
    Endpoint("PATCH", "/v1/accounts/{code}", update_account, ADMIN,
             "Update an account (name, email, status, default credit type)", "accounts",
             body=AccountPatch, response=AccountOut),
]
