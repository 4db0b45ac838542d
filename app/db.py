"""Postgres pool and the migration runner."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# what SQL helpers accept: a connection (plain or from a pool) or the pool itself
Connection = asyncpg.Connection | PoolConnectionProxy
Conn = Connection | asyncpg.Pool
# statements on a range of xids (migrations 032, 033) are planned with the values, so the BRIN
# index finds the few recent pages; a generic plan could read the whole table
CUSTOM_PLANS = "set_config('plan_cache_mode', 'force_custom_plan', true)"


async def xid_window(conn: Connection, cursor: str, written: str) -> tuple[int, int] | None:
    """For a pass that sums the rows written by the transactions since a cursor's horizon
    (usage and ledger rollups), inside the caller's transaction: the old horizon and the new
    one, the xmin of a snapshot (every transaction below it has ended), with the cursor row
    locked; None when nothing new was written (`written`: an EXISTS over `$1 <= xid < $2`,
    checked before any lock, so an idle pass writes nothing) or another process holds the
    cursor. The rest of the transaction is planned with its parameters' values."""
    row = await conn.fetchrow(
        f"""SELECT {CUSTOM_PLANS}, horizon,
                   pg_snapshot_xmin(pg_current_snapshot())::text::int8 AS xmin
            FROM {cursor} WHERE id = 1""")
    assert row is not None  # its migration wrote it
    new = row["xmin"]
    if new <= row["horizon"] or not await conn.fetchval(written, row["horizon"], new):
        return None
    # the horizon again, locked: another pass may have moved it meanwhile
    old = await conn.fetchval(f"SELECT horizon FROM {cursor} WHERE id = 1 FOR UPDATE SKIP LOCKED")
    if old is None or new <= old:
        return None
    return old, new


class Where:
    """A WHERE clause of the filters a caller was given. Each condition's `{}` are its values,
    numbered on as the statement's next parameters; a statement holds only the filters present,
    so Postgres plans it with the index a filter needs (`$n IS NULL OR …` would not, once it
    chose a generic plan)."""

    def __init__(self, *args: object) -> None:
        self.args: list[object] = list(args)
        self.conditions: list[str] = []

    def add(self, condition: str, *values: object) -> None:
        first = len(self.args) + 1
        self.args += values
        self.conditions.append(condition.format(*(f"${first + i}" for i in range(len(values)))))

    def __str__(self) -> str:
        return " AND ".join(self.conditions)

# Any constant works; it only has to be the same for every migrating process.
MIGRATION_LOCK_ID = 0x63726564  # "cred"
_NAME = re.compile(r"^(\d+)_[\w-]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(folder: Path) -> list[Migration]:
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise RuntimeError(f"migration file name must be NNN_name.sql: {path.name}")
        found.append(Migration(int(match.group(1)), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError("two migrations share a version number")
    return sorted(found, key=lambda m: m.version)


async def migrate(dsn: str, folder: Path) -> list[str]:
    """Apply pending migrations in order, each once, under an advisory lock; return their names."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            done = []
            for migration in load_migrations(folder):
                if migration.version in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        migration.version, migration.name, migration.checksum,
                    )
                done.append(migration.name)
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()


async def pending_migrations(conn: Conn, folder: Path) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied = set()
    if exists:
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [m.name for m in load_migrations(folder) if m.version not in applied]


class LeanConnection(asyncpg.Connection):
    """A pool connection returned without asyncpg's reset query (`pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`): one more round trip, and Postgres work, on every
    release of every connection, for session state this app never creates (its advisory
    locks are transaction-scoped, it sets no session variables, keeps no cursors and listens
    to nothing). An open transaction is still rolled back on release (asyncpg does that
    whatever the reset query)."""

    def get_reset_query(self) -> str:
        return ""


@asynccontextmanager
async def exclusive(dsn: str, lock_class: int, name: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold a transaction-scoped advisory lock (class, hashtext(name)) on a connection of its
    own: work under it may then wait for the pool (a journal commit) without starving it, as
    a lock held on a pool connection could. The lock goes with the connection, also when the
    process dies."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1::int4, hashtext($2))",
                               lock_class, name)
            yield conn
    finally:
        await conn.close()


# JIT compilation off: this app's statements are short, and on a large ledger Postgres's cost
# estimates cross `jit_above_cost`, where compiling took ~300 ms of a 1 ms query here.
SERVER_SETTINGS = {"jit": "off"}


async def create_pool(dsn: str, size: int) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=size,
                                     connection_class=LeanConnection,
                                     server_settings=SERVER_SETTINGS)
    assert pool is not None
    return pool
