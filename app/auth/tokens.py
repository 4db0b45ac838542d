"""Customer tokens: short-lived, signed, read-only access to one account.

DESIGN's end customer "sees own balance live" with "a scoped, short-lived token that can read
only its own account". The vendor's backend (an admin or runtime key) mints one for its
signed-in customer (`POST /v1/accounts/{code}/customer-tokens`); the customer's browser sends
it as `Authorization: Bearer cgct_…` to the routes that declare the `customer` scope, all of
them under `/v1/accounts/{code}/`, and only with its own account's code there.

A token is not stored: `cgct_<payload>.<signature>`, the payload the base64url text
`<minting key id>:<expiry, epoch seconds>:<account code>` and the signature the base64url
HMAC-SHA256 of `cgct1.<payload>` under one secret that every app instance shares (Postgres,
migration 020). So checking one costs an HMAC and no round trip, and a token minted by one
instance is good on every other. A token dies at its expiry, or once the key that minted it
is revoked (the key cache notices within `KEY_CACHE_TTL_S`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from app.auth.keys import Principal, Scope
from app.db import Conn

PREFIX = "cgct_"
_CONTEXT = b"cgct1."
MIN_TTL_S, DEFAULT_TTL_S, MAX_TTL_S = 60, 900, 86_400


@dataclass(frozen=True)
class Claims:
    key_id: int
    expires: int  # epoch seconds
    account: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, _CONTEXT + payload.encode(), hashlib.sha256).digest())


def sign(secret: bytes, claims: Claims) -> str:
    payload = _b64(f"{claims.key_id}:{claims.expires}:{claims.account}".encode())
    return f"{PREFIX}{payload}.{_signature(secret, payload)}"


class TokenRefused(Exception):
    """Why a customer token is not accepted (the 401's message)."""


def verify(secret: bytes, token: str, now: float | None = None) -> Claims:  # float-ok: seconds
    """The claims of a well-signed, unexpired token; TokenRefused otherwise."""
    payload, dot, signature = token.removeprefix(PREFIX).partition(".")
    if not dot or not hmac.compare_digest(signature.encode(),
                                          _signature(secret, payload).encode()):
        raise TokenRefused("not a valid customer token")
    try:
        key_id, expires, account = _unb64(payload).decode().split(":", 2)
        claims = Claims(int(key_id), int(expires), account)
    except (ValueError, binascii.Error) as exc:  # signed by us, so never in practice
        raise TokenRefused("not a valid customer token") from exc
    if claims.expires <= (time.time() if now is None else now):
        raise TokenRefused("customer token expired: ask the vendor's backend for a new one")
    return claims


async def load_secret(conn: Conn) -> bytes:
    """The shared signing secret, written by the first instance that needs it."""
    await conn.execute(
        "INSERT INTO token_secrets (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        secrets.token_bytes(32))
    return bytes(await conn.fetchval("SELECT secret FROM token_secrets WHERE id = 1"))


class CustomerTokens:
    """One process's signing secret (read once) for minting and checking tokens."""

    def __init__(self) -> None:
        self._secret: bytes | None = None

    async def secret(self, conn: Conn) -> bytes:
        if self._secret is None:
            self._secret = await load_secret(conn)
        return self._secret

    async def mint(self, conn: Conn, key_id: int, account: str, ttl_s: int,
                   now: float | None = None) -> tuple[str, int]:  # float-ok: seconds
        """A token for `account` and its expiry (epoch seconds)."""
        expires = int(time.time() if now is None else now) + ttl_s
        return sign(await self.secret(conn), Claims(key_id, expires, account)), expires

    async def principal(self, conn: Conn, token: str) -> tuple[Principal, int]:
        """The principal a token stands for (its `key_id` is the minting key's: the caller
        checks that key is still alive) and the token's expiry (epoch seconds); TokenRefused
        when it is not valid."""
        claims = verify(await self.secret(conn), token)
        return Principal(claims.key_id, Scope.customer, claims.account), claims.expires
