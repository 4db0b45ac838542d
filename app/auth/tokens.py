"""Customer tokens: short-lived, signed, read-only access to one account.

DESIGN's end customer "sees own balance live" with "a scoped, short-lived token that can read
only its own account". The vendor's backend (an admin or runtime key) mints one for its
signed-in customer (`POST /v1/accounts/{code}/customer-tokens`); the customer's browser sends
it as `Authorization: Bearer cgct_…` to the routes that declare the `customer` scope, all of
them under `/v1/accounts/{code}/`, and only with its own account's code there.

A token is not stored: `cgct_<secret id>.<payload>.<signature>`, the payload the base64url
text `<minting key id>:<expiry, epoch seconds>:<account code>` and the signature the base64url
HMAC-SHA256 of `cgct2.<secret id>.<payload>` under the signing secret of that id, which every
app instance shares (Postgres `token_secrets`, migrations 020 and 023). So checking one costs
an HMAC and no round trip, and a token minted by one instance is good on every other. A token
dies at its expiry, once the key that minted it is revoked (the key cache notices within
`KEY_CACHE_TTL_S`), or once its secret is retired.

Tokens minted before secrets could rotate are `cgct_<payload>.<signature>` (one dot, no
secret id, signed over `cgct1.<payload>`): they stand for secret 1 and verify while it does.
The different signed prefix keeps the two shapes apart: no signature of one is one of the
other.

Rotation (`creditgate tokens rotate-secret`, `rotate_secret`) writes a secret with the next id,
which signs every new token. The older secrets keep verifying until `retired_at`: without
`--retire-now`, `RETIRE_GRACE_S` later (the longest a token lives, plus the longest a process
may still mint with the older secret), so no customer is signed out; with it, at once. Each
process (`CustomerTokens`) re-reads the table when a token names an id newer than any it has
read (at most once a second, however many such tokens arrive) and otherwise whenever its copy
is older than `refresh_s` (`CREDITGATE_TOKEN_SECRETS_TTL_S`, 30 s like the key cache): a new
secret is known everywhere at once, a retired one refused everywhere within `refresh_s`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from app.auth.keys import Principal, Scope
from app.db import Conn
from app.settings import TOKEN_SECRETS_TTL_MAX_S, Seconds

PREFIX = "cgct_"
_CONTEXT = b"cgct2."
_LEGACY_CONTEXT = b"cgct1."  # tokens with no secret id, minted before migration 023
LEGACY_SECRET_ID = 1
MIN_TTL_S, DEFAULT_TTL_S, MAX_TTL_S = 60, 900, 86_400
# How long a process trusts its copy of the secrets table by default (like the key cache);
# a deployment may set up to TOKEN_SECRETS_TTL_MAX_S (CREDITGATE_TOKEN_SECRETS_TTL_S).
SECRETS_TTL_S: Seconds = 30.0
# A plain rotation retires the older secrets this long after it: every token they signed has
# expired by then, including those minted by a process that had not read the rotation yet
# (up to TOKEN_SECRETS_TTL_MAX_S later), with a minute for the rotation's own transaction, a
# slow read and clocks a little apart (a token's expiry is the app's clock, `retired_at` the
# database's).
RETIRE_GRACE_S = MAX_TTL_S + int(TOKEN_SECRETS_TTL_MAX_S) + 60
# Tokens naming an id newer than any read make a process re-read at most this often.
UNKNOWN_ID_READ_GAP_S: Seconds = 1.0
_SECRET_ID = re.compile(r"[1-9][0-9]{0,4}")  # token_secrets.id is a smallint


@dataclass(frozen=True)
class Claims:
    key_id: int
    expires: int  # epoch seconds
    account: str


@dataclass(frozen=True)
class Signed:
    """A token taken apart, not checked yet: the secret id it names and what was signed."""

    secret_id: int
    payload: str
    signature: str
    message: bytes  # what the signature is the HMAC of


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _hmac(secret: bytes, message: bytes) -> str:
    return _b64(hmac.new(secret, message, hashlib.sha256).digest())


def _message(secret_id: int, payload: str) -> bytes:
    return _CONTEXT + f"{secret_id}.{payload}".encode()


def sign(secret: bytes, secret_id: int, claims: Claims) -> str:
    payload = _b64(f"{claims.key_id}:{claims.expires}:{claims.account}".encode())
    return f"{PREFIX}{secret_id}.{payload}.{_hmac(secret, _message(secret_id, payload))}"


class TokenRefused(Exception):
    """Why a customer token is not accepted (the 401's message)."""


INVALID = "not a valid customer token"


def split(token: str) -> Signed:
    """The parts of a token of either shape; TokenRefused when it has neither."""
    parts = token.removeprefix(PREFIX).split(".")
    if len(parts) == 2:  # minted before secrets rotated: secret 1
        payload, signature = parts
        return Signed(LEGACY_SECRET_ID, payload, signature, _LEGACY_CONTEXT + payload.encode())
    if len(parts) == 3 and _SECRET_ID.fullmatch(parts[0]):
        secret_id, payload, signature = int(parts[0]), parts[1], parts[2]
        return Signed(secret_id, payload, signature, _message(secret_id, payload))
    raise TokenRefused(INVALID)


def verify(secret: bytes, signed: Signed, now: float | None = None) -> Claims:  # float-ok: s
    """The claims of a well-signed, unexpired token; TokenRefused otherwise."""
    if not signed.payload or not hmac.compare_digest(signed.signature.encode(),
                                                     _hmac(secret, signed.message).encode()):
        raise TokenRefused(INVALID)
    try:
        key_id, expires, account = _unb64(signed.payload).decode().split(":", 2)
        claims = Claims(int(key_id), int(expires), account)
    except (ValueError, binascii.Error) as exc:  # signed by us, so never in practice
        raise TokenRefused(INVALID) from exc
    if claims.expires <= (time.time() if now is None else now):
        raise TokenRefused("customer token expired: ask the vendor's backend for a new one")
    return claims


# --- the secrets table ----------------------------------------------------------------------


@dataclass(frozen=True)
class SecretRow:
    """A signing secret as `creditgate tokens secrets` shows it (never the secret itself)."""

    id: int
    created_at: datetime
    retired_at: datetime | None


async def create_first_secret(conn: Conn) -> None:
    """Write a secret when none verifies (a new database; or every one retired by hand): the
    next id, so two processes doing it at once write one. A rotation takes the same id under
    its lock and wins."""
    await conn.execute(
        "INSERT INTO token_secrets (id, secret) "
        "SELECT coalesce(max(id), 0) + 1, $1 FROM token_secrets "
        "HAVING count(*) FILTER (WHERE retired_at IS NULL) = 0 "
        "ON CONFLICT (id) DO NOTHING", secrets.token_bytes(32))


async def rotate_secret(conn: asyncpg.Connection, *, retire_now: bool) -> int:
    """Write a new signing secret (the next id) and return its id. The older secrets stop
    verifying now (`retire_now`, after a leak) or RETIRE_GRACE_S from now (a secret already
    retiring keeps its earlier end)."""
    async with conn.transaction():
        # serialises rotations (each takes max(id) + 1); readers are not blocked
        await conn.execute("LOCK TABLE token_secrets IN SHARE ROW EXCLUSIVE MODE")
        if retire_now:
            await conn.execute("UPDATE token_secrets SET retired_at = now() "
                               "WHERE retired_at IS NULL OR retired_at > now()")
        else:
            await conn.execute(
                "UPDATE token_secrets SET retired_at = now() + make_interval(secs => $1) "
                "WHERE retired_at IS NULL", RETIRE_GRACE_S)
        return int(await conn.fetchval(
            "INSERT INTO token_secrets (id, secret) "
            "SELECT coalesce(max(id), 0) + 1, $1 FROM token_secrets RETURNING id",
            secrets.token_bytes(32)))


async def list_secrets(conn: Conn) -> list[SecretRow]:
    """Every secret, oldest first, without the secret."""
    return [SecretRow(r["id"], r["created_at"], r["retired_at"]) for r in await conn.fetch(
        "SELECT id, created_at, retired_at FROM token_secrets ORDER BY id")]


@dataclass(frozen=True)
class _Secret:
    secret: bytes | None  # None: retired when read (its bytes are not even kept)
    retires: Seconds | None  # monotonic instant it stops verifying; None: not retiring


class CustomerTokens:
    """One process's copy of the signing secrets, for minting and checking tokens.

    The copy is trusted for `refresh_s`; past that the next token checked or minted re-reads
    it first. A token naming an id newer than the newest read re-reads it at once (coalesced:
    at most one such read per UNKNOWN_ID_READ_GAP_S, the callers waiting for it), so a forged
    id costs at most one query a second and a new secret's tokens are never refused.
    """

    def __init__(self, refresh_s: Seconds = SECRETS_TTL_S) -> None:
        self.refresh_s = refresh_s
        self._secrets: dict[int, _Secret] = {}
        self._newest = 0  # the highest id in the table at the last read, retired or not
        self._read_at: Seconds = -float("inf")  # float-ok: monotonic start of the last read
        self._unknown_read_at: Seconds = -float("inf")  # float-ok: same, for unknown ids
        self._lock = asyncio.Lock()

    def _fresh(self, now: Seconds) -> bool:
        return now < self._read_at + self.refresh_s

    def accepts(self, secret_id: int) -> bool:
        """Whether a token of this secret may be taken without reading anything: the copy is
        fresh and the secret verifies (no coroutine: the cached-token path)."""
        now = time.monotonic()
        found = self._secrets.get(secret_id)
        return found is not None and found.secret is not None and self._fresh(now) and \
            (found.retires is None or found.retires > now)

    async def _read(self, conn: Conn, asked: Seconds, *, unknown_id: bool = False) -> None:
        """Re-read the table unless a read started since `asked` (monotonic)."""
        async with self._lock:
            if self._read_at >= asked:
                return
            if unknown_id:
                wait = self._unknown_read_at + UNKNOWN_ID_READ_GAP_S - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    if self._read_at >= asked:
                        return
            started = time.monotonic()
            rows = await conn.fetch(
                "SELECT id, CASE WHEN retired_at IS NULL OR retired_at > now() THEN secret END "
                "AS secret, extract(epoch FROM retired_at - now())::float8 AS retires_in "
                "FROM token_secrets")
            self._secrets = {
                r["id"]: _Secret(None if r["secret"] is None else bytes(r["secret"]),
                                 None if r["retires_in"] is None else started + r["retires_in"])
                for r in rows}
            self._newest = max(self._secrets, default=0)
            self._read_at = started
            if unknown_id:
                self._unknown_read_at = started

    async def _current(self, conn: Conn) -> None:
        now = time.monotonic()
        if not self._fresh(now):
            await self._read(conn, now)

    def _signing(self) -> tuple[int, bytes] | None:
        """The newest secret not retiring, from the copy."""
        live = [(i, s.secret) for i, s in self._secrets.items()
                if s.secret is not None and s.retires is None]
        return max(live) if live else None

    async def signing_secret(self, conn: Conn) -> tuple[int, bytes]:
        """The newest secret not retiring (written first when there is none) and its id."""
        await self._current(conn)
        found = self._signing()
        if found is None:
            await create_first_secret(conn)
            await self._read(conn, time.monotonic())
            found = self._signing()
        if found is None:
            raise RuntimeError("no customer-token signing secret could be written")
        return found

    async def mint(self, conn: Conn, key_id: int, account: str, ttl_s: int,
                   now: float | None = None) -> tuple[str, int]:  # float-ok: seconds
        """A token for `account` and its expiry (epoch seconds)."""
        expires = int(time.time() if now is None else now) + ttl_s
        secret_id, secret = await self.signing_secret(conn)
        return sign(secret, secret_id, Claims(key_id, expires, account)), expires

    async def _secret_for(self, conn: Conn, secret_id: int) -> bytes:
        await self._current(conn)
        if secret_id > self._newest:  # newer than any read: a rotation this process missed?
            await self._read(conn, time.monotonic(), unknown_id=True)
        found = self._secrets.get(secret_id)
        if found is None:
            raise TokenRefused(INVALID)
        if found.secret is None or (found.retires is not None
                                    and found.retires <= time.monotonic()):
            raise TokenRefused("customer token signed with a retired secret: ask the vendor's "
                               "backend for a new one")
        return found.secret

    async def principal(self, conn: Conn, token: str) -> tuple[Principal, int, int]:
        """The principal a token stands for (its `key_id` is the minting key's: the caller
        checks that key is still alive), the token's expiry (epoch seconds) and its secret's
        id (the caller re-checks `accepts` before taking it again); TokenRefused when it is not
        valid."""
        signed = split(token)
        claims = verify(await self._secret_for(conn, signed.secret_id), signed)
        return Principal(claims.key_id, Scope.customer, claims.account), claims.expires, \
            signed.secret_id
