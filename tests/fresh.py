"""A database of a test's own, migrated (optionally in two steps, with the test's writes in
between), and an in-process app on it: for tests that must not share the session's database
(a secret rotation, a migration of existing data)."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from app.auth.keys import KEY_SCOPES, create_api_key, hash_key
from app.auth.tokens import CustomerTokens
from app.db import migrate
from app.main import create_app
from app.settings import Settings
from tests.conftest import Api, _with_database


@dataclass
class Fresh:
    settings: Settings
    app: Any
    client: httpx.AsyncClient
    api: Api
    db: asyncpg.Connection
    runtime_key_id: int

    @property
    def tokens(self) -> CustomerTokens:
        tokens: CustomerTokens = self.app.state.ctx.keys.tokens
        return tokens

    async def secret(self, secret_id: int) -> bytes:
        return bytes(await self.db.fetchval("SELECT secret FROM token_secrets WHERE id = $1",
                                            secret_id))


@contextlib.asynccontextmanager
async def fresh_app(servers: tuple[str, str], settings: Settings, *,
                    before_app: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
                    migrations: Path | None = None) -> AsyncIterator[Fresh]:
    """A new database migrated from `migrations` (default: all; then `before_app` runs on
    it and the rest are applied), and an in-process app with a Redis prefix of its own."""
    name = f"creditgate_own_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(servers[0])
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(servers[0], name)
    db = None
    try:
        await migrate(url, migrations or settings.migrations_dir)
        db = await asyncpg.connect(url)
        if before_app is not None:
            await before_app(db)
        await migrate(url, settings.migrations_dir)
        fresh_settings = dataclasses.replace(
            settings, database_url=url, run_workers=False,
            redis_prefix=f"{settings.redis_prefix}r{uuid.uuid4().hex[:6]}")
        keys = {scope.value: await create_api_key(db, scope, "tests") for scope in KEY_SCOPES}
        runtime_key_id = await db.fetchval("SELECT id FROM api_keys WHERE key_hash = $1",
                                           hash_key(keys["runtime"]))
        application = create_app(fresh_settings)
        async with application.router.lifespan_context(application), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=application),
                base_url="http://creditgate") as client:
            yield Fresh(fresh_settings, application, client, Api(client, keys), db,
                        runtime_key_id)
    finally:
        if db is not None:
            await db.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def migrations_before(settings: Settings, version: int, folder: Path) -> Path:
    """`folder` holding a copy of the migrations numbered below `version`."""
    for path in settings.migrations_dir.glob("*.sql"):
        if int(path.name.split("_")[0]) < version:
            (folder / path.name).write_text(path.read_text())
    return folder
