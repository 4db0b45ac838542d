"""Rules of the configuration API. Nothing here is ever deleted: codes stay valid forever."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg

from app.config import repository as repo
from app.config.schemas import (
    AccountIn,
    AccountOut,
    AccountPatch,
    CreditTypeIn,
    CreditTypeOut,
    ProductIn,
    ProductOut,
)
from app.errors import Conflict, NotFound, ValidationProblem

if TYPE_CHECKING:
    from app.context import AppContext


def account_out(row: asyncpg.Record) -> AccountOut:
    return AccountOut.model_validate(dict(row))


async def create_credit_type(ctx: AppContext, body: CreditTypeIn) -> CreditTypeOut:
    try:
        row = await repo.insert_credit_type(ctx.pool, body.code, body.name, body.kind,
                                            body.decimal_places)
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"credit type {body.code!r} already exists", field="code") from exc
    return CreditTypeOut.model_validate(dict(row))


async def create_product(ctx: AppContext, body: ProductIn) -> ProductOut:
    try:
        row = await repo.insert_product(ctx.pool, body.code, body.name)
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"product {body.code!r} already exists", field="code") from exc
    return ProductOut.model_validate(dict(row))


async def credit_type_id(ctx: AppContext, code: str | None, field: str) -> int | None:
    if code is None:
        return None
    ref = await ctx.catalog.credit_type(code)
    if ref is None:
        raise ValidationProblem(f"unknown credit type {code!r}", field=field)
    return ref.id


async def create_account(ctx: AppContext, body: AccountIn) -> AccountOut:
    parent_id = root_id = None
    if body.parent is not None:
        parent = await repo.account_by_code(ctx.pool, body.parent)
        if parent is None:
            raise ValidationProblem(f"unknown parent account {body.parent!r}", field="parent")
        parent_id, root_id = parent["id"], parent["root_id"]
    type_id = await credit_type_id(ctx, body.credit_type, "credit_type")
    async with ctx.pool.acquire() as conn:
        try:
            account_id = await repo.insert_account(conn, body.code, body.name, body.email,
                                                   parent_id, root_id, body.status, type_id)
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(f"account {body.code!r} already exists", field="code") from exc
        row = await repo.account_by_id(conn, account_id)
    assert row is not None
    # a child joins its root's hot state at once; a new root is loaded on first use
    await ctx.hot.set_account(row["root_id"], account_id, body.status,
                              str(parent_id) if parent_id else "")
    return account_out(row)


async def account_row(ctx: AppContext, code: str) -> asyncpg.Record:
    row = await repo.account_by_code(ctx.pool, code)
    if row is None:
        raise NotFound(f"no account {code!r}", field="code")
    return row


async def update_account(ctx: AppContext, code: str, body: AccountPatch) -> AccountOut:
    row = await account_row(ctx, code)
    changes: dict[str, Any] = body.model_dump(exclude_unset=True, exclude={"credit_type"})
    for name in ("name", "status"):
        if name in changes and changes[name] is None:
            raise ValidationProblem("may not be null", field=name)
    if "credit_type" in body.model_fields_set:
        changes["credit_type_id"] = await credit_type_id(ctx, body.credit_type, "credit_type")
    blocking = changes.get("status") == "blocked"
    parent = str(row["parent_id"] or "")
    if blocking:  # fail closed: the hot copy blocks before Postgres records it
        await ctx.hot.set_account(row["root_id"], row["id"], "blocked", parent)
    await repo.update_account(ctx.pool, row["id"], changes)
    if changes.get("status") == "active":
        await ctx.hot.set_account(row["root_id"], row["id"], "active", parent)
    ctx.catalog.forget_accounts()
    updated = await repo.account_by_id(ctx.pool, row["id"])
    assert updated is not None
    return account_out(updated)
