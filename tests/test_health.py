"""Liveness and readiness."""

from __future__ import annotations

import httpx


async def test_healthz_answers_without_a_key(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_readyz_reports_postgres_redis_and_current_migrations(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "checks": {
        "postgres": "ok", "redis": "ok", "migrations": "current"}}


async def test_readyz_is_503_when_a_migration_is_pending(client: httpx.AsyncClient, app: object,
                                                         tmp_path: object) -> None:
    from pathlib import Path

    from app.settings import REPO_ROOT

    ctx = app.state.ctx  # type: ignore[attr-defined]
    folder = Path(str(tmp_path))
    for migration in (REPO_ROOT / "migrations").glob("*.sql"):
        (folder / migration.name).write_text(migration.read_text())
    (folder / "999_future.sql").write_text("SELECT 1;")
    original = ctx.settings
    ctx.settings = type(original)(**{**original.__dict__, "migrations_dir": folder})
    try:
        response = await client.get("/readyz")
    finally:
        ctx.settings = original
    assert response.status_code == 503
    assert response.json()["checks"]["migrations"] == {"pending": ["999_future.sql"]}
