"""Customer tokens: the end customer's browser reads its own account, and nothing else."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.auth.keys import Scope, create_api_key, hash_key
from app.auth.tokens import rotate_secret
from app.settings import Settings
from tests.conftest import Api
from tests.fresh import Fresh, fresh_app, migrations_before
from tests.procs import cli, run_apps


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _mint(api: Api, account: str, scope: str = "runtime", expect: int = 201,
                headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    result: dict[str, Any] = await api.call("POST", f"/v1/accounts/{account}/customer-tokens",
                                            scope=scope, expect=expect, headers=headers,
                                            json=body)
    return result


def _refused(response: httpx.Response, status: int, field: str = "Authorization") -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["field"] == field, response.text
    return str(response.json()["detail"])


async def test_a_customer_token_reads_its_own_account_and_nothing_else(
        api: Api, client: httpx.AsyncClient) -> None:
    own, other = await api.setup(), await api.setup()
    await api.grant(own["account"], "10.00")
    await api.usage(own["account"], own["api"], "2.50")
    before = datetime.now(UTC).timestamp()
    minted = await _mint(api, own["account"])
    assert minted["account"] == own["account"] and minted["token"].startswith("cgct_")
    expires = datetime.fromisoformat(minted["expires_at"]).timestamp()
    assert before + 899 <= expires <= datetime.now(UTC).timestamp() + 901  # the default 900 s
    token = _bearer(minted["token"])

    # its own account: live balances (the same answer the backend gets), bill-to-date, bills
    path = f"/v1/accounts/{own['account']}"
    live = await client.get(f"{path}/balances", headers=token)
    assert live.status_code == 200, live.text
    assert live.json() == await api.live(own["account"])
    assert live.json()["totals"][0]["available"] == "7.50"
    assert (await client.get(f"{path}/usage", headers=token)).status_code == 200
    bills = await client.get(f"{path}/bills", headers=token)
    assert bills.status_code == 200 and bills.json()["data"] == []

    # another account's, every write, and every admin or runtime read: refused
    detail = _refused(await client.get(f"/v1/accounts/{other['account']}/balances",
                                       headers=token), 403)
    assert own["account"] in detail
    for method, url, body in [
            ("POST", "/v1/usage", {"uid": "u1", "account": own["account"], "product": own["api"],
                                   "amount": "1", "timestamp": minted["expires_at"]}),
            ("POST", "/v1/check", {"account": own["account"], "product": own["api"]}),
            ("GET", path, None), ("GET", f"{path}/ledger", None),
            ("POST", f"{path}/grants", {"amount": "100.00"}),
            ("POST", f"{path}/customer-tokens", {})]:
        _refused(await client.request(method, url, headers=token, json=body), 403)
    assert await api.available(own["account"]) == "7.50"


async def test_minting_stores_nothing_and_refuses_bad_input(
        api: Api, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    n = await api.setup()
    key = f"mint-{uuid.uuid4().hex}"
    first = await _mint(api, n["account"], scope="admin", headers={"Idempotency-Key": key})
    # an admin write with an Idempotency-Key, but its answer is a credential: never stored,
    # so the same key mints a new token rather than replaying the first
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE key = $1", key) == 0
    again = await api.client.post(f"/v1/accounts/{n['account']}/customer-tokens", json={},
                                  headers={**api.admin, "Idempotency-Key": key})
    assert again.status_code == 201 and "idempotent-replayed" not in again.headers
    assert first["token"] not in " ".join(
        repr(v) for row in await db.fetch("SELECT * FROM idempotency_keys") for v in row.values())

    longest = await _mint(api, n["account"], ttl_s=86_400)
    assert datetime.fromisoformat(longest["expires_at"]).timestamp() > time.time() + 86_300
    url = f"/v1/accounts/{n['account']}/customer-tokens"
    for body, field in [({"ttl_s": 59}, "ttl_s"), ({"ttl_s": 86_401}, "ttl_s"),
                        ({"ttl_s": "soon"}, "ttl_s"), ({"ttl_s": 1.5}, "ttl_s"),
                        ({"account": "x"}, "account")]:
        _refused(await client.post(url, headers=api.runtime, json=body), 422, field)
    _refused(await client.post("/v1/accounts/no-such-account/customer-tokens",
                               headers=api.runtime, json={}), 404, "code")


async def test_a_forged_expired_or_orphaned_token_is_refused(
        api: Api, app: Any, client: httpx.AsyncClient, db: asyncpg.Connection,
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    own, other = await api.setup(), await api.setup()
    token = (await _mint(api, own["account"]))["token"]
    secret_id, payload, signature = token.removeprefix("cgct_").split(".")
    assert secret_id == str(await db.fetchval("SELECT max(id) FROM token_secrets"))

    def read(token: str, account: str = own["account"]) -> Any:
        return client.get(f"/v1/accounts/{account}/balances", headers=_bearer(token))

    assert (await read(token)).status_code == 200
    # the same signature on another account's payload, a changed signature, no signature
    claims = base64.urlsafe_b64decode(payload + "==").decode()
    forged = base64.urlsafe_b64encode(claims.replace(own["account"], other["account"])
                                      .encode()).rstrip(b"=").decode()
    for bad in (f"cgct_{secret_id}.{forged}.{signature}",
                f"cgct_{secret_id}.{payload}.{signature[:-2]}AA",
                f"cgct_{secret_id}.{payload}", f"cgct_{payload}.{signature}", "cgct_"):
        _refused(await read(bad, other["account"] if forged in bad else own["account"]), 401)

    tokens = app.state.ctx.keys.tokens
    principal_key = int(claims.split(":")[0])
    expired, _ = await tokens.mint(app.state.ctx.pool, principal_key, own["account"], 60,
                                   now=time.time() - 61)
    assert "expired" in _refused(await read(expired), 401)
    # a token read once is remembered, but only until it expires
    brief, _ = await tokens.mint(app.state.ctx.pool, principal_key, own["account"], 60,
                                 now=time.time() - 58)
    assert (await read(brief)).status_code == 200
    await asyncio.sleep(2.1)
    assert "expired" in _refused(await read(brief), 401)

    # a token dies with the key that minted it
    monkeypatch.setattr("app.http.KEY_CACHE_TTL_S", 0.0)
    minter = await create_api_key(db, Scope.runtime, "minter")
    orphan = (await client.post(f"/v1/accounts/{own['account']}/customer-tokens", json={},
                                headers=_bearer(minter))).json()["token"]
    assert (await read(orphan)).status_code == 200
    key_id = await db.fetchval("SELECT id FROM api_keys WHERE key_hash = $1", hash_key(minter))
    revoked = await cli(settings, "keys", "revoke", str(key_id))
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in _refused(await read(orphan), 401)
    listed = await cli(settings, "keys", "list")
    mine = [line for line in listed.stdout.splitlines() if line.endswith(" minter")]
    assert listed.returncode == 0 and mine[-1].split()[0] == str(key_id), listed.stdout
    assert minter[:12] in mine[-1] and minter not in listed.stdout  # the prefix, never the key
    again = await cli(settings, "keys", "revoke", str(key_id))  # not live any more
    assert again.returncode == 1 and f"no live API key with id {key_id}" in again.stderr
    assert (await read(token)).status_code == 200  # other keys' tokens are unaffected


async def test_tokens_work_on_every_instance_and_browsers_of_allowed_origins_may_call(
        api: Api, settings: Settings, client: httpx.AsyncClient) -> None:
    """Two app processes share the signing secret (Postgres): a token minted by one is good on
    the other and on this test's in-process app; CORS answers only the configured origin."""
    n = await api.setup()
    await api.grant(n["account"], "4.00")
    origin = "https://app.example.com"
    path = f"/v1/accounts/{n['account']}/balances"
    async with run_apps(settings, 2, env={"CREDITGATE_CORS_ORIGINS": f"{origin}/, https://b.test"}
                        ) as apps:
        async with apps[0].client() as one, apps[1].client() as two:
            minted = await one.post(f"/v1/accounts/{n['account']}/customer-tokens",
                                    headers=api.runtime, json={"ttl_s": 120})
            assert minted.status_code == 201, minted.text
            token = _bearer(minted.json()["token"])
            for reader in (one, two, client):
                read = await reader.get(path, headers=token)
                assert read.status_code == 200 and \
                    read.json()["totals"][0]["available"] == "4.00", read.text

            # the browser's preflight, then the call: allowed origin only
            asked = {"Origin": origin, "Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "authorization"}
            ok = await two.options(path, headers=asked)
            assert ok.status_code == 204, ok.text
            assert ok.headers["access-control-allow-origin"] == origin
            assert ok.headers["access-control-allow-headers"] == "authorization"
            assert ok.headers["access-control-allow-methods"] == "GET"
            _refused(await two.options(path, headers={**asked, "Origin": "https://evil.test"}),
                     403, "Origin")
            read = await two.get(path, headers={**token, "Origin": origin})
            assert read.status_code == 200
            assert read.headers["access-control-allow-origin"] == origin
            assert read.headers["vary"] == "origin"
            elsewhere = await two.get(path, headers={**token, "Origin": "https://evil.test"})
            assert "access-control-allow-origin" not in elsewhere.headers
            # only the customer routes speak CORS: never the ones that take API keys
            runtime = await two.post("/v1/check", headers={**api.runtime, "Origin": origin},
                                     json={"account": n["account"], "product": n["api"]})
            assert runtime.status_code == 200
            assert "access-control-allow-origin" not in runtime.headers
        assert apps.tracebacks() == ""
    # the in-process app has no origins configured: no CORS headers, and no preflight
    plain = await client.get(path, headers={**token, "Origin": origin})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
    _refused(await client.options(path, headers=asked), 403, "Origin")


# --- rotation of the signing secret -------------------------------------------------------
# Each test gets a database of its own (rotating with --retire-now ends every token signed
# before, which the session's other tests must not see) and an in-process app on it.


@pytest.fixture
async def fresh(servers: tuple[str, str], settings: Settings) -> AsyncIterator[Fresh]:
    async with fresh_app(servers, settings) as opened:
        yield opened


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hmac(secret: bytes, message: str) -> str:
    return _b64(hmac.new(secret, message.encode(), hashlib.sha256).digest())


def _legacy_token(secret: bytes, key_id: int, account: str, ttl_s: int = 600) -> str:
    """A token as minted before secrets rotated (`cgct_<payload>.<signature>`, no secret id,
    HMAC over `cgct1.<payload>`), built here rather than by the app's code."""
    payload = _b64(f"{key_id}:{int(time.time()) + ttl_s}:{account}".encode())
    return f"cgct_{payload}.{_hmac(secret, f'cgct1.{payload}')}"


def _signed(secret: bytes, secret_id: int, key_id: int, account: str, ttl_s: int = 600) -> str:
    """A token of the current shape signed here with `secret` (e.g. a leaked one)."""
    payload = _b64(f"{key_id}:{int(time.time()) + ttl_s}:{account}".encode())
    return f"cgct_{secret_id}.{payload}.{_hmac(secret, f'cgct2.{secret_id}.{payload}')}"


def _secret_id(token: str) -> int:
    return int(token.removeprefix("cgct_").split(".")[0])


async def _status(client: httpx.AsyncClient, account: str, token: str) -> int:
    read = await client.get(f"/v1/accounts/{account}/balances", headers=_bearer(token))
    assert read.status_code in (200, 401), read.text
    return read.status_code


async def _until(what: str, done: Callable[[], Awaitable[bool]], within_s: float) -> float:
    """Poll `done` until it holds; the seconds it took (fails after `within_s`)."""
    start = time.monotonic()
    while not await done():
        assert time.monotonic() - start < within_s, f"{what}: not within {within_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_tokens_minted_before_secret_ids_verify_against_secret_1(
        servers: tuple[str, str], settings: Settings, tmp_path: Path) -> None:
    """A database migrated up to 022 with the secret the old code wrote: after migration 023
    that secret keeps id 1 and signs, and tokens in the old shape verify against it until it
    is retired."""
    old_secret = os.urandom(32)

    async def old_code_wrote_its_secret(db: asyncpg.Connection) -> None:
        assert await db.fetchval("SELECT to_regclass('token_secrets') IS NOT NULL")
        assert not await db.fetchval("SELECT count(*) FROM schema_migrations WHERE version = 23")
        await db.execute("INSERT INTO token_secrets (id, secret) VALUES (1, $1)", old_secret)

    async with fresh_app(servers, settings, before_app=old_code_wrote_its_secret,
                         migrations=migrations_before(settings, 23, tmp_path)) as f:
        [row] = await f.db.fetch("SELECT id, secret, retired_at FROM token_secrets")
        assert (row["id"], bytes(row["secret"]), row["retired_at"]) == (1, old_secret, None)
        own, other = await f.api.setup(), await f.api.setup()
        old = _legacy_token(old_secret, f.runtime_key_id, own["account"])
        assert await _status(f.client, own["account"], old) == 200
        assert await _status(f.client, own["account"], old) == 200  # the remembered token
        # the old shape is held to its signature and to its account like the new one
        payload, signature = old.removeprefix("cgct_").split(".")
        _refused(await f.client.get(f"/v1/accounts/{other['account']}/balances",
                                    headers=_bearer(old)), 403)
        claims = base64.urlsafe_b64decode(payload + "==").decode()
        moved = _b64(claims.replace(own["account"], other["account"]).encode())
        assert await _status(f.client, other["account"], f"cgct_{moved}.{signature}") == 401
        assert await _status(f.client, own["account"],
                             _legacy_token(os.urandom(32), f.runtime_key_id,
                                           own["account"])) == 401
        # an old-shape signature is not one of the new shape naming secret 1, nor back
        assert await _status(f.client, own["account"], f"cgct_1.{payload}.{signature}") == 401
        new_sig = _hmac(old_secret, f"cgct2.1.{payload}")
        assert await _status(f.client, own["account"], f"cgct_1.{payload}.{new_sig}") == 200
        assert await _status(f.client, own["account"], f"cgct_{payload}.{new_sig}") == 401

        # the app signs with the secret it found (no second secret written)
        minted = await _mint(f.api, own["account"])
        assert _secret_id(minted["token"]) == 1
        assert await f.db.fetchval("SELECT count(*) FROM token_secrets") == 1

        # a plain rotation keeps secret 1 verifying, so the old token too
        await rotate_secret(f.db, retire_now=False)
        f.tokens.refresh_s = 0.0  # re-read at every token: no waiting for the bound here
        assert await _status(f.client, own["account"], old) == 200
        assert _secret_id((await _mint(f.api, own["account"]))["token"]) == 2
        # once secret 1 is retired, the old shape is refused with it
        await rotate_secret(f.db, retire_now=True)
        refused = await f.client.get(f"/v1/accounts/{own['account']}/balances",
                                     headers=_bearer(old))
        assert "retired" in _refused(refused, 401)


async def test_a_rotation_reaches_every_process_and_retire_now_ends_old_tokens_everywhere(
        fresh: Fresh) -> None:
    """Two app processes (secrets re-read at least every second) and the in-process app
    (every 30 s, the default). A plain rotation: new tokens name the new secret and verify
    everywhere at once, old tokens keep working. `--retire-now`: every token signed before,
    remembered by every process, is refused everywhere within the bound."""
    f = fresh
    n = await f.api.setup()
    await f.api.grant(n["account"], "3.00")
    path = f"/v1/accounts/{n['account']}/balances"
    assert f.tokens.refresh_s == 30.0  # from Settings

    async with run_apps(f.settings, 2, env={"CREDITGATE_TOKEN_SECRETS_TTL_S": "1"}) as apps:
        async with apps[0].client() as one, apps[1].client() as two:
            readers = {"app0": one, "app1": two, "in-process": f.client}

            async def mint_on_one() -> str:
                minted = await one.post(f"/v1/accounts/{n['account']}/customer-tokens",
                                        headers=f.api.runtime, json={"ttl_s": 600})
                assert minted.status_code == 201, minted.text
                return str(minted.json()["token"])

            async def statuses(token: str) -> dict[str, int]:
                return {name: await _status(c, n["account"], token)
                        for name, c in readers.items()}

            first = await mint_on_one()
            assert _secret_id(first) == 1
            assert await statuses(first) == {name: 200 for name in readers}

            rotated = await cli(f.settings, "tokens", "rotate-secret")
            assert rotated.returncode == 0, rotated.stderr
            assert rotated.stdout.strip() == "2"
            retires = await f.db.fetchval(
                "SELECT extract(epoch FROM retired_at - now()) FROM token_secrets WHERE id = 1")
            # every token it signed expires first, even one minted 5 minutes from now
            assert 86_400 + 350 < retires <= 86_400 + 360
            assert await f.db.fetchval(
                "SELECT retired_at FROM token_secrets WHERE id = 2") is None

            # the processes mint with secret 2 once they re-read (within 1 s) ...
            second = ""

            async def minted_with_2() -> bool:
                nonlocal second
                second = await mint_on_one()
                return _secret_id(second) == 2

            await _until("app0 mints with the new secret", minted_with_2, 5.0)
            # ... and every process takes its tokens at once: the in-process app's copy is
            # fresh for 30 s more, but a token naming a newer id makes it read again
            assert await statuses(second) == {name: 200 for name in readers}
            # the old secret still verifies, in processes that have read the rotation too
            await asyncio.sleep(1.1)
            assert await statuses(first) == {name: 200 for name in readers}
            assert (await two.get(path, headers=_bearer(first))).json()["totals"][0][
                "available"] == "3.00"

            # a leak: retire every secret now, in the in-process app within 1 s too
            f.tokens.refresh_s = 1.0
            assert await statuses(first) == await statuses(second) == \
                {name: 200 for name in readers}  # each one remembered by every process
            retired = await cli(f.settings, "tokens", "rotate-secret", "--retire-now")
            assert retired.returncode == 0, retired.stderr
            assert retired.stdout.strip() == "3"

            async def all_refused() -> bool:
                return set((await statuses(first)).values()) == \
                    set((await statuses(second)).values()) == {401}

            # the bound is 1 s (plus a read and a request per poll)
            await _until("old tokens refused everywhere", all_refused, 1.0 + 3.0)
            for client in readers.values():
                assert "retired" in _refused(await client.get(path, headers=_bearer(second)),
                                             401)

            async def minted_with_3() -> bool:
                return _secret_id(await mint_on_one()) == 3

            await _until("app0 mints with secret 3", minted_with_3, 5.0)
            third = await mint_on_one()
            assert await statuses(third) == {name: 200 for name in readers}
        assert apps.tracebacks() == ""


async def test_a_forged_or_retired_secret_id_is_refused(
        fresh: Fresh, monkeypatch: pytest.MonkeyPatch) -> None:
    f = fresh
    own = await f.api.setup()
    token = (await _mint(f.api, own["account"]))["token"]
    assert _secret_id(token) == 1
    _, payload, signature = token.removeprefix("cgct_").split(".")
    assert await _status(f.client, own["account"], token) == 200
    for bad_id in ("2", "0", "01", "-1", "x", "", "99999", "1e0", " 1"):
        forged = f"cgct_{bad_id}.{payload}.{signature}"
        assert await _status(f.client, own["account"], forged) == 401, bad_id
    assert await _status(f.client, own["account"], f"{token}.{signature}") == 401

    # a token naming an id newer than any read makes the process read the table again, but
    # many of them at once make one read (a forged id cannot turn into a query per request)
    reads: set[float] = set()  # float-ok: monotonic instants of reads
    original = f.tokens._read

    async def counted(*args: Any, **kwargs: Any) -> None:
        await original(*args, **kwargs)
        reads.add(f.tokens._read_at)

    monkeypatch.setattr(f.tokens, "_read", counted)
    newer_ids = [f"cgct_{n}.{payload}.{signature}" for n in range(2, 32)]
    started = time.monotonic()
    answers = await asyncio.gather(*(_status(f.client, own["account"], t) for t in newer_ids))
    assert answers == [401] * len(newer_ids)
    assert len(reads) <= 2 and time.monotonic() - started < 2.5, reads
    assert await _status(f.client, own["account"], token) == 200

    # after a rotation secret 2 exists, and a token naming it must be signed with it
    await rotate_secret(f.db, retire_now=False)
    two = await f.secret(2)
    assert await _status(f.client, own["account"], f"cgct_2.{payload}.{signature}") == 401
    assert await _status(f.client, own["account"],
                         _signed(two, 2, f.runtime_key_id, own["account"])) == 200

    # secret 1 leaked: once retired now, nothing signed with it is taken, whatever id or
    # shape the forger writes (the id is part of what is signed)
    leaked = await f.secret(1)
    await rotate_secret(f.db, retire_now=True)
    f.tokens.refresh_s = 0.0
    for forged_token in (_signed(leaked, 1, f.runtime_key_id, own["account"]),
                         _signed(leaked, 2, f.runtime_key_id, own["account"]),
                         _signed(leaked, 3, f.runtime_key_id, own["account"]),
                         _legacy_token(leaked, f.runtime_key_id, own["account"]), token):
        assert await _status(f.client, own["account"], forged_token) == 401, forged_token
    fresh_token = (await _mint(f.api, own["account"]))["token"]
    assert _secret_id(fresh_token) == 3
    assert await _status(f.client, own["account"], fresh_token) == 200


async def test_the_cli_rotates_and_lists_secrets_without_showing_them(fresh: Fresh) -> None:
    f = fresh
    empty = await cli(f.settings, "tokens", "secrets")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.splitlines()[0].split()[:2] == ["id", "created"]
    assert len(empty.stdout.splitlines()) == 1  # no secret until a token is minted

    own = await f.api.setup()
    await _mint(f.api, own["account"])  # writes secret 1
    for new_id, args in enumerate((("rotate-secret",), ("rotate-secret",),
                                   ("rotate-secret", "--retire-now"), ("rotate-secret",)), 2):
        done = await cli(f.settings, "tokens", *args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(new_id)
        assert f"secret {new_id} signs new tokens" in done.stderr
        assert ("retired now" in done.stderr) == ("--retire-now" in args), done.stderr
    listed = await cli(f.settings, "tokens", "secrets")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    states = {int(row[0]): row[-1] for row in rows}
    # 1, 2 and 3 retired by the --retire-now that wrote 4; 4 retiring since 5 was written
    assert states == {1: "retired", 2: "retired", 3: "retired", 4: "retiring", 5: "signing"}, \
        listed.stdout
    db_rows = await f.db.fetch("SELECT id, secret, retired_at FROM token_secrets ORDER BY id")
    assert [r["id"] for r in db_rows] == [1, 2, 3, 4, 5]
    assert db_rows[4]["retired_at"] is None
    for row in db_rows:
        secret = bytes(row["secret"])
        for shown in (secret.hex(), _b64(secret), base64.b64encode(secret).decode()):
            assert shown not in listed.stdout and shown[:16] not in listed.stdout
    # each row shows its creation and retirement (UTC)
    four = next(line for line in listed.stdout.splitlines() if line.split()[0] == "4")
    assert f"{db_rows[3]['retired_at'].astimezone(UTC):%Y-%m-%d %H:%M:%S}" in four
