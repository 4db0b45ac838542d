"""SQL of accounts, products and credit types."""

from __future__ import annotations

from typing import Any

import asyncpg

from app.db import Conn, Connection, Where

_ACCOUNT = """SELECT a.id, a.code, a.name, a.email, a.status, a.root_id, a.parent_id,
                     p.code AS parent, ct.code AS credit_type, a.created_at, a.updated_at
              FROM accounts a LEFT JOIN accounts p ON p.id = a.parent_id
              LEFT JOIN credit_types ct ON ct.id = a.credit_type_id"""


async def insert_credit_type(conn: Conn, code: str, name: str, kind: str, places: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        """INSERT INTO credit_types (code, name, kind, decimal_places) VALUES ($1, $2, $3, $4)
           RETURNING *""", code, name, kind, places)
    assert row is not None
    return row


async def credit_type_by_code(conn: Conn, code: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM credit_types WHERE code = $1", code)


async def credit_type_by_id(conn: Conn, type_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM credit_types WHERE id = $1", type_id)


async def list_rows(conn: Conn, table: str, after_id: int, limit: int) -> list[asyncpg.Record]:
    assert table in ("credit_types", "products")
    return await conn.fetch(
        f"SELECT * FROM {table} WHERE id > $1 ORDER BY id LIMIT $2", after_id, limit
    )


async def named_by_code(conn: Conn, table: str, code: str) -> asyncpg.Record | None:
    assert table in ("credit_types", "products")
    return await conn.fetchrow(f"SELECT * FROM {table} WHERE code = $1", code)


async def rename(conn: Conn, table: str, code: str, name: str) -> asyncpg.Record | None:
    assert table in ("credit_types", "products")
    return await conn.fetchrow(
        f"UPDATE {table} SET name = $2, updated_at = now() WHERE code = $1 RETURNING *", code, name
    )


async def insert_product(conn: Conn, code: str, name: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "INSERT INTO products (code, name) VALUES ($1, $2) RETURNING *", code, name
    )
    assert row is not None
    return row


async def product_by_code(conn: Conn, code: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM products WHERE code = $1", code)


async def existing_products(conn: Conn, codes: list[str]) -> set[str]:
    rows = await conn.fetch("SELECT code FROM products WHERE code = ANY($1::text[])", codes)
    return {r["code"] for r in rows}


async def insert_account(
    conn: Connection, code: str, name: str, email: str | None, parent_id: int | None,
    root_id: int | None, status: str, credit_type_id: int | None,
) -> int:
    account_id: int = await conn.fetchval(
        """INSERT INTO accounts (id, code, name, email, parent_id, root_id, status, credit_type_id)
           VALUES (nextval('accounts_id_seq'), $1, $2, $3, $4,
                   COALESCE($5, currval('accounts_id_seq')), $6, $7)
           RETURNING id""",
        code, name, email, parent_id, root_id, status, credit_type_id,
    )
    return account_id


async def account_by_code(conn: Conn, code: str) -> asyncpg.Record | None:
    return await conn.fetchrow(_ACCOUNT + " WHERE a.code = $1", code)


async def account_by_id(conn: Conn, account_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(_ACCOUNT + " WHERE a.id = $1", account_id)


async def list_accounts(conn: Conn, after_id: int, limit: int, email: str | None = None,
                        status: str | None = None,
                        parent_id: int | None = None) -> list[asyncpg.Record]:
    """In id order; each filter given narrows the list (email compared without case)."""
    where = Where(after_id, limit)
    where.add("a.id > $1")
    for condition, value in (("lower(a.email) = lower({})", email), ("a.status = {}", status),
                             ("a.parent_id = {}", parent_id)):
        if value is not None:
            where.add(condition, value)
    return await conn.fetch(f"{_ACCOUNT} WHERE {where} ORDER BY a.id LIMIT $2", *where.args)


async def update_account(conn: Conn, account_id: int, changes: dict[str, Any]) -> None:
    allowed = {"name", "email", "status", "credit_type_id"}
    assert set(changes) <= allowed
    if not changes:
        return
    sets = ", ".join(f"{col} = ${i + 2}" for i, col in enumerate(changes))
    await conn.execute(
        f"UPDATE accounts SET {sets}, updated_at = now() WHERE id = $1", account_id, *changes.values()
    )


async def account_chain(conn: Conn, account_id: int) -> list[int]:
    """The account, its parent, ... up to its billing root."""
    rows = await conn.fetch(
        """WITH RECURSIVE up(id, parent_id, depth) AS (
               SELECT id, parent_id, 0 FROM accounts WHERE id = $1
               UNION ALL
               SELECT a.id, a.parent_id, up.depth + 1 FROM accounts a JOIN up ON a.id = up.parent_id)
           SELECT id FROM up ORDER BY depth""",
        account_id,
    )
    return [r["id"] for r in rows]


async def inherited_credit_type(conn: Conn, chain: list[int]) -> int | None:
    rows = await conn.fetch(
        "SELECT id, credit_type_id FROM accounts WHERE id = ANY($1::int8[])", chain
    )
    by_id = {r["id"]: r["credit_type_id"] for r in rows}
    for account_id in chain:
        if by_id.get(account_id) is not None:
            return int(by_id[account_id])
    return None
