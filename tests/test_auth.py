"""Every declared route states its scope and enforces it; keys are stored hashed."""

from __future__ import annotations

import re
import uuid
from typing import Any

import asyncpg
import httpx
from starlette.routing import Route

from app.auth.keys import KEY_SCOPES, Scope, hash_key
from app.http import Endpoint, PathApp
from app.main import ENDPOINTS

PUBLIC_ROUTES = {"/healthz", "/readyz", "/openapi.json"}
# routes that take no API key because they authenticate otherwise (a signature); adding one
# here is a deliberate decision
SIGNED_ROUTES = {("POST", "/v1/stripe/webhook")}


def _url(endpoint: Endpoint) -> str:
    # nothing by this name exists, so a request that gets past auth changes nothing
    return re.sub(r"{\w+}", "no-such-0", endpoint.path)


def _problem(response: httpx.Response, status: int, what: str) -> dict[str, Any]:
    assert response.status_code == status, (what, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json"), what
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["field"] == "Authorization", (what, body)
    return body


async def test_every_route_needs_a_key_of_its_scope(
    app: Any, client: httpx.AsyncClient, keys: dict[str, str]
) -> None:
    declared = {(e.method, e.path) for e in ENDPOINTS}
    served = {(m, r.path) for r in app.routes if isinstance(r, Route)
              for m in (r.endpoint.apps if isinstance(r.endpoint, PathApp) else r.methods or ())
              if m not in ("HEAD", "OPTIONS")}
    # the app serves nothing that is not declared with a scope (or one of the public probes)
    assert {(m, p) for m, p in served if p not in PUBLIC_ROUTES} == declared

    for_scope = {s: {"Authorization": f"Bearer {keys[s.value]}"} for s in KEY_SCOPES}
    # a customer token reads its own account only: it is walked with that account in the path
    # (and refused everywhere else, including its routes for another account)
    own = f"walk-{uuid.uuid4().hex[:8]}"
    admin = for_scope[Scope.admin]
    assert (await client.post("/v1/accounts", headers=admin,
                              json={"code": own, "name": "walk"})).status_code == 201
    minted = await client.post(f"/v1/accounts/{own}/customer-tokens", headers=admin, json={})
    assert minted.status_code == 201, minted.text
    for_scope[Scope.customer] = {"Authorization": f"Bearer {minted.json()['token']}"}
    walked = 0
    for endpoint in ENDPOINTS:
        what = f"{endpoint.method} {endpoint.path}"
        url, body = _url(endpoint), {} if endpoint.method in ("POST", "PATCH", "PUT") else None
        if not endpoint.scopes:
            assert (endpoint.method, endpoint.path) in SIGNED_ROUTES, f"{what} declares no scope"
            response = await client.request(endpoint.method, url, json=body)
            assert 400 <= response.status_code < 500, (what, "unsigned", response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            walked += 1
            continue

        async def send(headers: dict[str, str], method: str = endpoint.method, url: str = url,
                       body: Any = body) -> httpx.Response:
            return await client.request(method, url, headers=headers, json=body)

        _problem(await send({}), 401, f"{what} without a key")
        for bad in ("Bearer cg_admin_not-a-real-key", "Basic " + keys["admin"], keys["admin"],
                    "Bearer ", "Bearer cgct_Zm9yZ2Vk.c2lnbmF0dXJl"):
            _problem(await send({"Authorization": bad}), 401, f"{what} with {bad[:12]!r}")
        for scope in Scope:
            response = await send(for_scope[scope])
            if scope == Scope.customer and scope in endpoint.scopes:
                # another account's path: refused; its own: past auth
                _problem(response, 403, f"{what} with a token of another account")
                response = await send(for_scope[scope], url=endpoint.path.replace("{code}", own))
                assert response.status_code not in (401, 403), (what, scope, response.text)
            elif scope in endpoint.scopes:
                # the right key gets past auth: whatever the answer, it is not about the key
                assert response.status_code not in (401, 403), (what, scope, response.text)
            else:
                _problem(response, 403, f"{what} with a {scope.value} key")
        walked += 1
    assert walked == len(ENDPOINTS) > 0

    for path in ("/healthz", "/openapi.json"):
        response = await client.get(path)
        assert response.status_code == 200, (path, response.text)


async def test_api_key_is_stored_only_as_its_hash(
    keys: dict[str, str], db: asyncpg.Connection
) -> None:
    for scope, key in keys.items():
        rows = await db.fetch("SELECT * FROM api_keys WHERE key_hash = $1", hash_key(key))
        assert len(rows) == 1 and rows[0]["scope"] == scope
        assert bytes(rows[0]["key_hash"]) != key.encode()
    everything = await db.fetch("SELECT * FROM api_keys")
    dump = " ".join(repr(v) for row in everything for v in row.values())
    for key in keys.values():
        assert key not in dump and key.encode().hex() not in dump
        secret = key.split("_", 2)[2]
        assert secret not in dump and secret[4:] not in dump
