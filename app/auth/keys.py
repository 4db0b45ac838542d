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


@dataclass(frozen=True)
class Principal:
    key_id: int
    scope: Scope


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


async def count_api_keys(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL"))
