"""The audit trail: who wrote what to the configuration surface, and how it ended.

`EndpointApp` writes a row for each authenticated, well-formed request to an audited route
(`Endpoint.audited`: the writes an admin key may make, except minting customer tokens) before
the handler runs, and completes it with the answer's status after. A store that cannot take
the row fails the request (503) before anything changes. Bodies are kept as sent, up to
16 KiB; answers are not kept (some hold secrets shown once).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
from pydantic import BaseModel, Field

from app.db import Conn
from app.schemas import ListQuery, Page

if TYPE_CHECKING:
    from app.auth.keys import Principal

MAX_BODY = 16 * 1024


async def begin(conn: Conn, principal: Principal, method: str, path: str,
                idempotency_key: str | None, body: bytes) -> int:
    return int(await conn.fetchval(
        """INSERT INTO audit_log (api_key_id, method, path, idempotency_key, body)
           VALUES ($1, $2, $3, $4, $5) RETURNING id""",
        principal.key_id, method, path, idempotency_key,
        body[:MAX_BODY].decode(errors="replace")))


async def purge_old(conn: Conn, retention_d: int, batch: int = 1_000) -> int:
    """Worker: delete rows older than `retention_d` days (0: keep every row), oldest first, at
    most `batch` per pass; how many went. Only the oldest `batch` rows are looked at (ids grow
    with time), so a pass costs the same however long the trail is."""
    if retention_d <= 0:
        return 0
    status = await conn.execute(
        """DELETE FROM audit_log WHERE id IN (
               SELECT id FROM (SELECT id, at FROM audit_log ORDER BY id LIMIT $2) oldest
               WHERE at < now() - make_interval(days => $1))""", retention_d, batch)
    return int(status.split()[-1])


async def finish(conn: Conn, audit_id: int, status: int) -> None:
    await conn.execute("UPDATE audit_log SET status = $2, finished_at = now() WHERE id = $1",
                       audit_id, status)


class AuditQuery(ListQuery):
    key_id: int | None = Field(default=None, ge=1, le=2**63 - 1,
                               description="only this API key's writes")


class AuditEntry(BaseModel):
    id: int
    at: datetime
    key_id: int
    key_prefix: str
    key_scope: str
    method: str
    path: str
    idempotency_key: str | None
    body: str = Field(description="the request body as sent (up to 16 KiB)")
    status: int | None = Field(description="the answer's HTTP status; null: the process "
                                           "stopped before it answered")
    finished_at: datetime | None


class AuditPage(Page[AuditEntry]):
    pass


async def entries(conn: Conn, before_id: int, limit: int,
                  key_id: int | None) -> list[asyncpg.Record]:
    """Newest first."""
    return await conn.fetch(
        """SELECT l.*, k.prefix AS key_prefix, k.scope AS key_scope
           FROM audit_log l JOIN api_keys k ON k.id = l.api_key_id
           WHERE ($1 = 0 OR l.id < $1) AND ($3::int8 IS NULL OR l.api_key_id = $3)
           ORDER BY l.id DESC LIMIT $2""", before_id, limit, key_id)


def entry_out(row: asyncpg.Record) -> AuditEntry:
    return AuditEntry(id=row["id"], at=row["at"], key_id=row["api_key_id"],
                      key_prefix=row["key_prefix"], key_scope=row["key_scope"],
                      method=row["method"], path=row["path"],
                      idempotency_key=row["idempotency_key"], body=row["body"],
                      status=row["status"], finished_at=row["finished_at"])
