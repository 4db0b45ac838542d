"""Idempotent writes: `Idempotency-Key` on admin writes, usage `uid`s, check-and-consume keys."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import asyncpg
import httpx

from app.auth.keys import hash_key
from tests.conftest import Api, now_iso


def _key() -> str:
    return f"idem-{uuid.uuid4().hex}"


async def _post(api: Api, path: str, body: dict[str, Any], key: str | None) -> httpx.Response:
    headers = {**api.admin, "content-type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return await api.client.post(path, content=json.dumps(body).encode(), headers=headers)


async def _admin_key_id(db: asyncpg.Connection, keys: dict[str, str]) -> int:
    key_id = await db.fetchval("SELECT id FROM api_keys WHERE key_hash = $1",
                               hash_key(keys["admin"]))
    assert key_id is not None
    return int(key_id)


async def _count(db: asyncpg.Connection, sql: str, *args: Any) -> int:
    return int(await db.fetchval(sql, *args))


async def test_same_key_and_body_replays_account_creation(
    api: Api, db: asyncpg.Connection
) -> None:
    names = await api.setup()
    key, code = _key(), f"acct-{uuid.uuid4().hex[:8]}"
    body = {"code": code, "name": "Replay Inc.", "credit_type": names["credit_type"]}
    first = await _post(api, "/v1/accounts", body, key)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    accounts = await _count(db, "SELECT count(*) FROM accounts")

    again = await _post(api, "/v1/accounts", body, key)
    assert again.status_code == 201, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert again.headers["content-type"].startswith("application/json")
    assert await _count(db, "SELECT count(*) FROM accounts") == accounts

    # without the key the same body is a new request: the account exists already
    plain = await _post(api, "/v1/accounts", body, None)
    assert plain.status_code == 409 and plain.json()["field"] == "code"


async def test_same_key_and_body_does_not_apply_a_grant_twice(
    api: Api, db: asyncpg.Connection
) -> None:
    names = await api.setup()
    acct = names["account"]
    path, key, body = f"/v1/accounts/{acct}/grants", _key(), {"amount": "7.50"}
    first = await _post(api, path, body, key)
    assert first.status_code == 201, first.text
    account_id = await db.fetchval("SELECT id FROM accounts WHERE code = $1", acct)
    counted = ("SELECT (SELECT count(*) FROM balances WHERE account_id = $1) * 1000 + "
               "(SELECT count(*) FROM ledger_entries WHERE account_id = $1)")
    before = await _count(db, counted, account_id)

    for _ in range(3):
        again = await _post(api, path, body, key)
        assert again.status_code == 201, again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
    assert await _count(db, counted, account_id) == before == 1001
    assert await api.available(acct) == "7.50"
    balances = await api.call("GET", f"/v1/balances?account={acct}")
    assert [b["id"] for b in balances["data"]] == [first.json()["id"]]

    # a fresh key is a fresh grant
    other = await _post(api, path, body, _key())
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert "idempotent-replayed" not in other.headers
    assert await api.available(acct) == "15.00"


async def test_same_key_with_another_body_or_route_is_rejected(
    api: Api, db: asyncpg.Connection
) -> None:
    names = await api.setup()
    acct = names["account"]
    path, key = f"/v1/accounts/{acct}/grants", _key()
    first = await _post(api, path, {"amount": "1.00"}, key)
    assert first.status_code == 201, first.text

    for other_path, other_body in ((path, {"amount": "2.00"}),
                                   (path, {"amount": "1.00", "priority": 5}),
                                   ("/v1/products", {"code": _key(), "name": "x"})):
        response = await _post(api, other_path, other_body, key)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["field"] == "Idempotency-Key"
        assert response.json()["code"] == "idempotency_key_reused"
    assert await api.available(acct) == "1.00"
    assert await _count(db, "SELECT count(*) FROM products WHERE code = $1", key) == 0


async def test_same_key_while_the_first_request_runs_is_a_conflict(
    api: Api, db: asyncpg.Connection, keys: dict[str, str]
) -> None:
    names = await api.setup()
    acct = names["account"]
    path, key, body = f"/v1/accounts/{acct}/grants", _key(), {"amount": "3.00"}
    raw = json.dumps(body).encode()
    fingerprint = hashlib.sha256(f"POST {path}\n".encode() + raw).digest()
    key_id = await _admin_key_id(db, keys)
    await db.execute(
        """INSERT INTO idempotency_keys (api_key_id, key, request_hash, status_code, locked_at)
           VALUES ($1, $2, $3, NULL, now())""", key_id, key, fingerprint)

    response = await _post(api, path, body, key)
    assert response.status_code == 409, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["field"] == "Idempotency-Key"
    assert await api.available(acct) == "0"

    # a request abandoned long ago (its process died) no longer holds the key
    await db.execute("UPDATE idempotency_keys SET locked_at = now() - interval '10 minutes' "
                     "WHERE api_key_id = $1 AND key = $2", key_id, key)
    taken_over = await _post(api, path, body, key)
    assert taken_over.status_code == 201, taken_over.text
    assert "idempotent-replayed" not in taken_over.headers
    assert await api.available(acct) == "3.00"
    replay = await _post(api, path, body, key)
    assert replay.headers["idempotent-replayed"] == "true" and replay.json() == taken_over.json()
    assert await api.available(acct) == "3.00"


async def test_malformed_idempotency_key_is_rejected(api: Api) -> None:
    names = await api.setup()
    for key in ("", "k" * 256):
        response = await _post(api, f"/v1/accounts/{names['account']}/grants",
                               {"amount": "1.00"}, key)
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "Idempotency-Key"
    assert await api.available(names["account"]) == "0"


async def test_failed_request_releases_its_key(api: Api) -> None:
    names = await api.setup()
    path, key = f"/v1/accounts/{names['account']}/grants", _key()
    body = {"amount": "1.00", "credit_type": "not-yet"}
    failed = await _post(api, path, body, key)
    assert failed.status_code == 422 and failed.json()["field"] == "credit_type"
    # the same key and body run for real again: nothing was stored for a problem
    again = await _post(api, path, body, key)
    assert again.status_code == 422 and "idempotent-replayed" not in again.headers


async def _usage_rows(db: asyncpg.Connection, acct: str) -> list[tuple[str, str]]:
    rows = await db.fetch(
        """SELECT u.uid, u.amount FROM usage_events u JOIN accounts a ON a.id = u.account_id
           WHERE a.code = $1 ORDER BY u.uid""", acct)
    return [(r["uid"], f"{r['amount']:f}") for r in rows]


async def _debits(db: asyncpg.Connection, acct: str) -> int:
    return await _count(
        db, """SELECT count(*) FROM ledger_entries e JOIN accounts a ON a.id = e.account_id
               WHERE a.code = $1 AND e.kind IN ('debit', 'overage')""", acct)


async def test_replayed_usage_uid_is_a_duplicate_and_debits_once(
    api: Api, db: asyncpg.Connection
) -> None:
    names = await api.setup()
    acct, product = names["account"], names["api"]
    await api.grant(acct, "10.00")

    first = await api.usage(acct, product, "2.00", uid="evt-1")
    assert first["status"] == "accepted" and first["available"] == "8.00"
    for amount in ("2.00", "5.00"):  # a replay is known by its uid, whatever else it says
        again = await api.usage(acct, product, amount, uid="evt-1")
        assert again["status"] == "duplicate" and again["uid"] == "evt-1"
    assert await api.available(acct) == "8.00"

    def ev(uid: str, amount: str = "1.00") -> dict[str, Any]:
        return {"uid": uid, "account": acct, "product": product, "amount": amount,
                "timestamp": now_iso()}

    batch = await api.call("POST", "/v1/usage", scope="runtime",
                           json={"events": [ev("evt-1"), ev("evt-2"), ev("evt-3")]})
    assert [r["status"] for r in batch["results"]] == ["duplicate", "accepted", "accepted"]
    assert (batch["accepted"], batch["duplicates"], batch["rejected"]) == (2, 1, 0)
    assert await api.available(acct) == "6.00"

    replay = await api.call("POST", "/v1/usage", scope="runtime",
                            json={"events": [ev("evt-2"), ev("evt-3"), ev("evt-4")]})
    assert [r["status"] for r in replay["results"]] == ["duplicate", "duplicate", "accepted"]
    assert await api.available(acct) == "5.00"

    # the same uid twice inside one batch counts once
    twice = await api.call("POST", "/v1/usage", scope="runtime",
                           json={"events": [ev("evt-5", "0.50"), ev("evt-5", "0.50")]})
    assert sorted(r["status"] for r in twice["results"]) == ["accepted", "duplicate"]
    assert await api.available(acct) == "4.50"

    single = await api.usage(acct, product, "1.00", uid="evt-4")
    assert single["status"] == "duplicate"
    assert await api.available(acct) == "4.50"

    assert await _usage_rows(db, acct) == [("evt-1", "2.00"), ("evt-2", "1.00"),
                                           ("evt-3", "1.00"), ("evt-4", "1.00"),
                                           ("evt-5", "0.50")]
    assert await _debits(db, acct) == 5


async def test_check_and_consume_with_the_same_key_consumes_once(
    api: Api, db: asyncpg.Connection
) -> None:
    names = await api.setup()
    acct, product = names["account"], names["api"]
    await api.grant(acct, "10.00")

    first = await api.check(acct, product, amount="3.00", consume=True, idempotency_key="req-1")
    assert (first["allowed"], first["consumed"], first["duplicate"]) == (True, True, False)
    assert first["available"] == "7.00"
    again = await api.check(acct, product, amount="3.00", consume=True, idempotency_key="req-1")
    assert (again["allowed"], again["consumed"], again["duplicate"]) == (True, False, True)
    assert await api.available(acct) == "7.00"

    # the key may also come as the Idempotency-Key header
    for expected in ((True, False), (False, True)):
        out = await api.call("POST", "/v1/check", scope="runtime",
                             headers={"Idempotency-Key": "req-2"},
                             json={"account": acct, "product": product, "amount": "1.50",
                                   "consume": True})
        assert (out["consumed"], out["duplicate"]) == expected and out["allowed"]
    assert await api.available(acct) == "5.50"
    assert await _debits(db, acct) == 2


async def test_a_key_older_than_the_ttl_is_purged_and_then_free(
        api: Api, app: Any, db: asyncpg.Connection) -> None:
    from app.idempotency import purge_expired

    names = await api.setup()

    def account(code: str) -> dict[str, Any]:
        return {"code": code, "name": "Purge Inc.", "credit_type": names["credit_type"]}

    old, recent = _key(), _key()
    assert (await _post(api, "/v1/accounts", account(f"acct-{uuid.uuid4().hex[:8]}"),
                        old)).status_code == 201
    assert (await _post(api, "/v1/accounts", account(f"acct-{uuid.uuid4().hex[:8]}"),
                        recent)).status_code == 201
    ttl = app.state.ctx.settings.idempotency_key_ttl_h
    await db.execute("UPDATE idempotency_keys SET created_at = now() - make_interval(hours => $2)"
                     " - interval '1 minute' WHERE key = $1", old, ttl)
    # (the app's own workers purge too, and may have taken it first: the rows tell)
    await purge_expired(app.state.ctx)
    kept = {r["key"] for r in await db.fetch(
        "SELECT key FROM idempotency_keys WHERE key = ANY($1)", [old, recent])}
    assert kept == {recent}
    # the purged key is free: another body under it is a new request, not a 422
    again = await _post(api, "/v1/accounts", account(f"acct-{uuid.uuid4().hex[:8]}"), old)
    assert again.status_code == 201 and "idempotent-replayed" not in again.headers
    # the kept one still guards its request
    mismatch = await _post(api, "/v1/accounts", account(f"acct-{uuid.uuid4().hex[:8]}"), recent)
    assert mismatch.status_code == 422 and mismatch.json()["field"] == "Idempotency-Key"
