"""The audit trail: each write to the configuration surface is recorded with its key, route,
body and outcome, before the change runs; reads and the hot path are not."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from app import audit
from app.auth.keys import hash_key
from app.config import service as config_service
from app.settings import Settings
from tests.conftest import Api
from tests.fresh import fresh_app


async def _rows(db: asyncpg.Connection, needle: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM audit_log WHERE path LIKE '%' || $1 || '%' "
                          "OR body LIKE '%' || $1 || '%' ORDER BY id", needle)


async def _key_id(db: asyncpg.Connection, key: str) -> int:
    return int(await db.fetchval("SELECT id FROM api_keys WHERE key_hash = $1", hash_key(key)))


async def test_writes_are_recorded_with_key_body_and_outcome_reads_are_not(
        api: Api, db: asyncpg.Connection, keys: dict[str, str]) -> None:
    n = await api.setup()
    code = f"prod-{uuid.uuid4().hex[:8]}"
    await api.call("POST", "/v1/products", expect=201, json={"code": code, "name": "Prod"})
    await api.call("POST", "/v1/products", expect=409, json={"code": code, "name": "Again"})
    await api.call("PATCH", f"/v1/products/{code}", json={"name": "Renamed"},
                   headers={"Idempotency-Key": f"k-{code}"})
    await api.call("PATCH", f"/v1/products/{code}", json={"name": "Renamed"},
                   headers={"Idempotency-Key": f"k-{code}"})  # a replay: recorded too
    await api.call("GET", f"/v1/products/{code}")
    rows = await _rows(db, code)
    admin_id = await _key_id(db, keys["admin"])
    assert [(r["method"], r["path"], r["status"], r["api_key_id"]) for r in rows] == [
        ("POST", "/v1/products", 201, admin_id), ("POST", "/v1/products", 409, admin_id),
        ("PATCH", f"/v1/products/{code}", 200, admin_id),
        ("PATCH", f"/v1/products/{code}", 200, admin_id)]
    assert '"Again"' in rows[1]["body"] and rows[2]["idempotency_key"] == f"k-{code}"
    assert all(r["finished_at"] is not None for r in rows)

    # the hot path, reads and token mints are not audited; a runtime key's reversal is
    since = await db.fetchval("SELECT max(id) FROM audit_log")
    await api.usage(n["account"], n["api"], "1.00", uid=f"u-{code}")
    await api.check(n["account"], n["api"])
    await api.call("POST", f"/v1/accounts/{n['account']}/customer-tokens", scope="runtime",
                   expect=201, json={})
    await api.grant(n["account"], "5.00")
    await api.call("POST", f"/v1/accounts/{n['account']}/usage-events/u-{code}/reverse",
                   scope="runtime", expect=201, json={})
    rows = [r for r in await _rows(db, n["account"]) if r["id"] > since]
    assert [(r["method"], r["path"].rsplit("/", 1)[-1], r["api_key_id"]) for r in rows] == [
        ("POST", "grants", admin_id), ("POST", "reverse", await _key_id(db, keys["runtime"]))]


async def test_the_audit_log_lists_newest_first_by_key(
        api: Api, db: asyncpg.Connection, keys: dict[str, str]) -> None:
    codes = [f"list-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for code in codes:
        await api.call("POST", "/v1/products", expect=201, json={"code": code, "name": code})
    admin_id = await _key_id(db, keys["admin"])
    first = await api.call("GET", "/v1/audit-log", params={"limit": 2, "key_id": admin_id})
    second = await api.call("GET", "/v1/audit-log", params={"limit": 2, "key_id": admin_id,
                                                            "cursor": first["next_cursor"]})
    newest = first["data"] + second["data"][:1]
    assert [e["body"] for e in newest] == [f'{{"code":"{c}","name":"{c}"}}'
                                           for c in reversed(codes)]
    assert {(e["key_id"], e["key_scope"], e["status"]) for e in newest} == {
        (admin_id, "admin", 201)}
    assert newest[0]["key_prefix"] and keys["admin"].startswith(newest[0]["key_prefix"])
    other = await api.call("GET", "/v1/audit-log", params={"key_id": 2**62})
    assert other["data"] == []
    await api.call("GET", "/v1/audit-log", scope="runtime", expect=403)
    bad = await api.call("GET", "/v1/audit-log", params={"key_id": "x"}, expect=422)
    assert bad["field"] == "query.key_id"


async def test_no_change_without_its_row_and_a_crash_is_recorded(
        api: Api, client: httpx.AsyncClient, db: asyncpg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    code = f"down-{uuid.uuid4().hex[:8]}"
    real_begin = audit.begin

    async def store_down(*args: Any, **kwargs: Any) -> int:
        raise asyncpg.PostgresConnectionError("connection lost")

    monkeypatch.setattr(audit, "begin", store_down)
    await api.call("POST", "/v1/products", expect=503, json={"code": code, "name": "x"})
    monkeypatch.setattr(audit, "begin", real_begin)
    await api.call("GET", f"/v1/products/{code}", expect=404)  # nothing was made

    async def bug(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(config_service, "create_product", bug)
    failed = await client.post("/v1/products", headers=api.admin,
                               json={"code": code, "name": "x"})
    assert failed.status_code == 500
    assert [r["status"] for r in await _rows(db, code)] == [500]


async def test_rows_past_the_retention_are_purged_oldest_first(
        servers: tuple[str, str], settings: Settings) -> None:
    async with fresh_app(servers, settings) as f:  # an audit trail of its own
        codes = [f"kept-{uuid.uuid4().hex[:8]}" for _ in range(4)]
        for code in codes:
            await f.api.call("POST", "/v1/products", expect=201, json={"code": code, "name": "x"})
        ids = [r["id"] for r in await f.db.fetch("SELECT id FROM audit_log ORDER BY id")]
        assert len(ids) == 4
        await f.db.execute("UPDATE audit_log SET at = now() - interval '40 days' "
                           "WHERE id = ANY($1::int8[])", ids[:3])
        assert await audit.purge_old(f.db, 0) == 0  # the default keeps every row
        assert await audit.purge_old(f.db, 60) == 0
        assert await audit.purge_old(f.db, 30, batch=2) == 2  # at most a batch per pass
        assert await audit.purge_old(f.db, 30, batch=2) == 1
        assert await audit.purge_old(f.db, 30, batch=2) == 0
        left = await f.db.fetch("SELECT id, body FROM audit_log")
        assert [r["id"] for r in left] == ids[3:] and codes[3] in left[0]["body"]
