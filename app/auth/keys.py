"""API keys: generated once, stored as a SHA-256 hash, looked up by hash."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum

import asyncpg


class Scope(StrEnum):
    admin = "admin"
    runtime = "runtime"
    # not a key's: a customer token's (app/auth/tokens.py), reading one account
    customer = "customer"


KEY_SCOPES = (Scope.admin, Scope.runtime)  # what an API key may have


@dataclass(frozen=True)
class Principal:
    key_id: int  # for a customer token, the key that minted it
    scope: Scope
    account: str | None = None  # a customer token's account code


def hash_key(key: str) -> bytes:
    # Keys carry 192 random bits, so a fast hash is enough; no salt or KDF is needed.
    return hashlib.sha256(key.encode()).digest()


async def create_api_key(conn: asyncpg.Connection, scope: Scope, name: str = "") -> str:
    """Create a key and return it in plain text: the only time it is ever shown."""
    key = f"cg_{scope.value}_{secrets.token_urlsafe(24)}"
    await conn.execute(
        "INSERT INTO api_keys (key_hash, prefix, scope, name) VALUES ($1, $2, $3, $4)",
        hash_key(key), key[:12], scope.value, name,
    )
    return key


async def find_principal(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> Principal | None:
    row = await conn.fetchrow(
        "SELECT id, scope FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", hash_key(key)
    )
    return Principal(row["id"], Scope(row["scope"])) if row else None


async def key_alive(conn: asyncpg.Connection | asyncpg.Pool, key_id: int) -> bool:
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM api_keys WHERE id = $1 AND revoked_at IS NULL)", key_id))


async def list_api_keys(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every key, oldest first, as its prefix (the rest is never stored)."""
    return await conn.fetch(
        "SELECT id, prefix, scope, name, created_at, revoked_at FROM api_keys ORDER BY id")


async def revoke_api_key(conn: asyncpg.Connection, key_id: int) -> bool:
    """Revoke a key (and the customer tokens it minted); False when no live key has the id.
    Processes notice within KEY_CACHE_TTL_S (app/http.py)."""
    return await conn.fetchval(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL "
        "RETURNING true", key_id) is not None


async def count_api_keys(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL"))
