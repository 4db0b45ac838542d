"""Customer tokens: the end customer's browser reads its own account, and nothing else."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from app.auth.keys import Scope, create_api_key, hash_key
from app.settings import REPO_ROOT, Settings
from tests.conftest import Api
from tests.procs import run_apps


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


async def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`creditgate <args>` in a process of its own, against the test database."""
    env = {**os.environ, "DATABASE_URL": settings.database_url,
           "CREDITGATE_MIGRATIONS_DIR": str(settings.migrations_dir)}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", "from app.cli import main; raise SystemExit(main())",
                         *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60)


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
    revoked = await _cli(settings, "keys", "revoke", str(key_id))
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in _refused(await read(orphan), 401)
    listed = await _cli(settings, "keys", "list")
    mine = [line for line in listed.stdout.splitlines() if line.endswith(" minter")]
    assert listed.returncode == 0 and mine[-1].split()[0] == str(key_id), listed.stdout
    assert minter[:12] in mine[-1] and minter not in listed.stdout  # the prefix, never the key
    again = await _cli(settings, "keys", "revoke", str(key_id))  # not live any more
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
